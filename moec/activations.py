"""The expert activations moec recognizes: one definition, read by every pass, op, target and kernel.

`ACTIVATIONS` is also the kernels' activation id order (plugins/: id = index) and the plugin field's
documented values; targets map these names to their own (ONNX Runtime's `activation_type`, TensorRT's
`MoEActType`, the plugin's reference subgraph) and refuse the rest with a reason. The names import
without torch (the plugin contract and the memory planner read them); the functions import it.
"""

from __future__ import annotations

import math

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "identity", "swiglu", "relu2",
               "swiglu_softcap")  # append only: kernel ids
GATED_ONLY = ("swiglu", "swiglu_softcap")  # defined on (gate, up) pairs only
PLAIN_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a not in GATED_ONLY)


def apply_activation(u, activation: str):
    import torch.nn.functional as F

    if activation == "silu":
        return F.silu(u)
    if activation == "gelu_tanh":
        return F.gelu(u, approximate="tanh")
    if activation == "gelu":
        return F.gelu(u)
    if activation == "relu":
        return F.relu(u)
    if activation == "identity":
        return u
    if activation == "relu2":  # squared ReLU (Nemotron-H)
        return F.relu(u).square()
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def gated_activation(gate, up, activation: str, alpha: float, beta: float, limit: float):
    """act(gate) * up, or a gated form of its own, which reads (alpha, beta, limit) as documented here:

    swiglu: gate = min(gate, limit); up = clamp(up, -limit, limit);
            out = gate * sigmoid(alpha * gate) * (up + beta). limit = inf disables the clamp (GPT-OSS).
    swiglu_softcap: out = softcap(gate, alpha) * sigmoid(gate) * softcap(up, limit), softcap(x, c) =
            c * tanh(x / c): the sigmoid sees the raw gate, the caps bound the linear factors (Inkling 2).
    """
    import torch

    if activation == "swiglu_softcap":
        return alpha * torch.tanh(gate / alpha) * torch.sigmoid(gate) * (limit * torch.tanh(up / limit))
    if activation == "swiglu":
        if math.isfinite(limit):
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
        return gate * torch.sigmoid(alpha * gate) * (up + beta)
    return apply_activation(gate, activation) * up


def activate(u, activation: str, gated: bool, alpha: float, beta: float, limit: float):
    """The experts' hidden activations from their fc1 output: u [..., 2I] (gate columns, then up) when `gated`,
    else u [..., I]."""
    if gated:
        gate, up = u.chunk(2, dim=-1)
        return gated_activation(gate, up, activation, alpha, beta, limit)
    return apply_activation(u, activation)

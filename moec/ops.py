"""The moec op vocabulary: torch.library custom ops with reference and fake kernels.

Three ops, each opaque to torch.export (so a fused layer survives capture as one
node) and each with a plain PyTorch reference implementation (so every graph
that contains them stays runnable and can be validated against the original):

- ``moec::route``   logits -> (topk_ids, topk_weights). Softmax or sigmoid scores,
  optional selection bias, grouped top-k, renormalization, routed scaling.
- ``moec::experts`` hidden, ids, weights, stacked expert weights -> output.
  Canonical weight layout: ``w_gate_up [E, 2I, H]`` (gate rows, then up rows) or
  ``[E, I, H]`` for plain FFNs; ``w_down [E, H, I]``.
- ``moec::ort_moe`` exactly the semantics of ONNX Runtime's ``com.microsoft.MoE``
  (softmax over all experts, top-k, optional renormalization, fc1 rows
  interleaved gate/up for swiglu). Lowering for the onnxruntime target produces it;
  its ONNX translation is one ``MoE`` node.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "identity", "swiglu")


def apply_activation(u: torch.Tensor, activation: str) -> torch.Tensor:
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
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, beta: float, limit: float
) -> torch.Tensor:
    """act(gate) * up, with the clamped 'swiglu' variant (GPT-OSS) when activation == 'swiglu'.

    swiglu: gate = min(gate, limit); up = clamp(up, -limit, limit);
            out = gate * sigmoid(alpha * gate) * (up + beta). limit = inf disables the clamp.
    """
    if activation == "swiglu":
        if math.isfinite(limit):
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
        return gate * torch.sigmoid(alpha * gate) * (up + beta)
    return apply_activation(gate, activation) * up


# ----------------------------------------------------------------------------- route


def route_reference(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    scoring: str,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scale: float,
    select_on_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over scores (+ selection bias), or over raw logits when `select_on_logits`.

    Both orders agree in exact arithmetic; in fp32 saturated scores tie (sigmoid(20) ==
    sigmoid(35) == 1.0), so the rule must be the model's own (Llama4 picks on logits).
    """
    logits = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"moec.route: unknown scoring {scoring!r} (softmax|sigmoid)")
    choice = logits if select_on_logits else scores
    if bias is not None:
        choice = choice + bias.float()
    if n_group > 1:
        num_experts = logits.shape[-1]
        grouped = choice.view(-1, n_group, num_experts // n_group)
        # DeepSeek-V3 ranks groups by the sum of their two best scores.
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights = weights * scale
    return ids, weights


@torch.library.custom_op("moec::route", mutates_args=())
def route(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    scoring: str,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scale: float,
    select_on_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return route_reference(logits, bias, scoring, top_k, renormalize, n_group, topk_group, scale, select_on_logits)


@route.register_fake
def _route_fake(logits, bias, scoring, top_k, renormalize, n_group, topk_group, scale, select_on_logits):
    tokens = logits.shape[0]
    return (
        logits.new_empty((tokens, top_k), dtype=torch.int64),
        logits.new_empty((tokens, top_k), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- experts


def experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    alpha: float,
    beta: float,
    limit: float,
    weight_on_input: bool,
) -> torch.Tensor:
    """Loop over the experts that received tokens; exact in fp32 (no weight gathering)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    num_experts = w_gate_up.shape[0]
    x_all = hidden.float()
    weights = topk_weights.float()
    for e in torch.unique(topk_ids).tolist():
        if e < 0 or e >= num_experts:
            continue
        token_idx, slot = torch.where(topk_ids == e)
        w = weights[token_idx, slot].unsqueeze(-1)
        x = x_all[token_idx]
        if weight_on_input:
            x = x * w
        u = F.linear(x, w_gate_up[e].float(), None if b_gate_up is None else b_gate_up[e].float())
        if gated:
            gate, up = u.chunk(2, dim=-1)
            h = gated_activation(gate, up, activation, alpha, beta, limit)
        else:
            h = apply_activation(u, activation)
        y = F.linear(h, w_down[e].float(), None if b_down is None else b_down[e].float())
        if not weight_on_input:
            y = y * w
        out.index_add_(0, token_idx, y)
    return out.to(hidden.dtype)


@torch.library.custom_op("moec::experts", mutates_args=())
def experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    alpha: float,
    beta: float,
    limit: float,
    weight_on_input: bool,
) -> torch.Tensor:
    return experts_reference(
        hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
        activation, gated, alpha, beta, limit, weight_on_input,
    )


@experts.register_fake
def _experts_fake(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                  activation, gated, alpha, beta, limit, weight_on_input):
    return torch.empty_like(hidden)


# ----------------------------------------------------------------------------- trt_experts


@torch.library.custom_op("moec::trt_experts", mutates_args=())
def trt_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor,
    b_down: torch.Tensor,
    s_gate_up: torch.Tensor,
    z_gate_up: torch.Tensor,
    s_down: torch.Tensor,
    z_down: torch.Tensor,
    accumulator: torch.Tensor,
    activation: str,
    gated: bool,
    alpha: float,
    beta: float,
    limit: float,
    weight_on_input: bool,
    has_bias: bool,
    quant_bits: int,
    has_zero_points: bool,
    aot: bool,
) -> torch.Tensor:
    """The TensorRT experts plugin's contract (moec/plugin_spec.py): accumulator + experts, in fp32.

    Unused inputs are 1-element placeholders; quantized weights are packed codes (moec.quant.dequantize_codes).
    `aot` only marks the exported node for TensorRT's AOT implementation."""
    from moec.quant import dequantize_codes

    hsize = hidden.shape[-1]
    if quant_bits:
        inter = w_down.shape[2] * 8 // quant_bits
        w1 = dequantize_codes(w_gate_up, s_gate_up, z_gate_up if has_zero_points else None, quant_bits, hsize)
        w2 = dequantize_codes(w_down, s_down, z_down if has_zero_points else None, quant_bits, inter)
    else:
        w1, w2 = w_gate_up, w_down
    out = experts_reference(
        hidden.float(), topk_ids, topk_weights, w1.float(), w2.float(), b_gate_up.float() if has_bias else None,
        b_down.float() if has_bias else None, activation, gated, alpha, beta, limit, weight_on_input,
    )
    return accumulator + out


@trt_experts.register_fake
def _trt_experts_fake(hidden, *args):
    return torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)


# ----------------------------------------------------------------------------- matmul_nbits


@torch.library.custom_op("moec::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """ONNX Runtime's com.microsoft.MatMulNBits: x @ dequantize(W).T (+ bias), W [N, K] block-quantized.

    packed ``uint8 [N, K/block, block*bits/8]``, scales ``[N * K/block]``, zero points ``uint8
    [N * ceil(K/block * bits/8)]`` packed like the codes (None: 2^(bits-1))."""
    from moec.quant import matmul_nbits_dequantize

    w = matmul_nbits_dequantize(packed, scales, zero_points, bits, block_size, in_features, out_features)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, packed, scales, zero_points, bias, in_features, out_features, bits, block_size,
                       accuracy_level):
    return x.new_empty(x.shape[:-1] + (out_features,))


# ----------------------------------------------------------------------------- ort_moe


def interleave_gate_up(w_gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] gate rows then up rows -> rows interleaved (gate_0, up_0, gate_1, ...)."""
    e, two_i = w_gate_up.shape[:2]
    gate, up = w_gate_up[:, : two_i // 2], w_gate_up[:, two_i // 2:]
    return torch.stack([gate, up], dim=2).reshape(w_gate_up.shape)


def deinterleave_gate_up(fc1: torch.Tensor) -> torch.Tensor:
    return torch.cat([fc1[:, 0::2], fc1[:, 1::2]], dim=1)


def ort_moe_reference(
    hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize, activation_type,
    alpha, beta, limit,
) -> torch.Tensor:
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    gated = activation_type == "swiglu"
    # ONNX Runtime's "gelu" expert activation is the tanh approximation.
    activation = "gelu_tanh" if activation_type == "gelu" else activation_type
    w_gate_up = deinterleave_gate_up(fc1) if gated else fc1
    b_gate_up = None
    if fc1_bias is not None:
        b_gate_up = deinterleave_gate_up(fc1_bias.unsqueeze(-1)).squeeze(-1) if gated else fc1_bias
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = experts_reference(
        flat, ids, weights, w_gate_up, fc2, b_gate_up, fc2_bias,
        activation, gated, alpha, beta, limit, False,
    )
    return out.reshape(hidden.shape)


@torch.library.custom_op("moec::ort_moe", mutates_args=())
def ort_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    fc1: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    k: int,
    normalize: bool,
    activation_type: str,
    alpha: float,
    beta: float,
    limit: float,
) -> torch.Tensor:
    return ort_moe_reference(
        hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize, activation_type,
        alpha, beta, limit,
    )


@ort_moe.register_fake
def _ort_moe_fake(hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize,
                  activation_type, alpha, beta, limit):
    return torch.empty_like(hidden)


# ----------------------------------------------------------------------------- ort_qmoe


@torch.library.custom_op("moec::ort_qmoe", mutates_args=())
def ort_qmoe(
    hidden: torch.Tensor,
    router_probs: torch.Tensor,
    router_weights: torch.Tensor,
    fc1: torch.Tensor,
    fc1_scales: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2: torch.Tensor,
    fc2_scales: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    fc1_zero_points: Optional[torch.Tensor],
    fc2_zero_points: Optional[torch.Tensor],
    k: int,
    activation_type: str,
    alpha: float,
    beta: float,
    limit: float,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """ONNX Runtime's QMoE with router_weights: top-k on router_probs, weights gathered from router_weights.

    The reference computes with fp32 activations; `accuracy_level` 4 lets ORT quantize them (faster,
    ~1% further error), which only the artifact's verification tolerance accounts for."""
    from moec.quant import qmoe_dequantize

    hidden_size = hidden.shape[-1]
    inter = fc2.shape[-1] * 8 // bits
    w1 = qmoe_dequantize(fc1, fc1_scales, fc1_zero_points, bits, block_size, hidden_size)
    w2 = qmoe_dequantize(fc2, fc2_scales, fc2_zero_points, bits, block_size, inter)
    ids = torch.topk(router_probs.float(), k, dim=-1)[1]
    weights = router_weights.float().gather(1, ids)
    gated = activation_type == "swiglu"
    activation = "gelu_tanh" if activation_type == "gelu" else activation_type
    w_gate_up = deinterleave_gate_up(w1) if gated else w1
    b_gate_up = None
    if fc1_bias is not None:
        b_gate_up = deinterleave_gate_up(fc1_bias.unsqueeze(-1)).squeeze(-1) if gated else fc1_bias
    flat = hidden.reshape(-1, hidden_size)
    out = experts_reference(flat, ids, weights, w_gate_up, w2, b_gate_up, fc2_bias, activation, gated,
                            alpha, beta, limit, False)
    return out.reshape(hidden.shape)


@ort_qmoe.register_fake
def _ort_qmoe_fake(hidden, *args):
    return torch.empty_like(hidden)

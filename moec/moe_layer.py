"""The canonical fused MoE layer: specs (what a layer computes) and the module that computes it.

A recognized MoE layer becomes a `FusedMoE`: router Linear -> ``moec.route`` ->
``moec.experts`` (+ a dense shared expert, optionally sigmoid-gated). Weights are
held once, in the canonical layout (``w_gate_up [E, 2I, H]`` gate rows then up
rows, ``w_down [E, H, I]``). The same module, with a different `ExpertsBackend`,
is what target lowering rewrites.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moec import ops  # noqa: F401  (registers torch.ops.moec.*)
from moec.quant import QuantizedWeight


@dataclass(frozen=True)
class RouteSpec:
    """How tokens pick experts. `None` in a LayerSpec means routing is kept as the model wrote it."""

    scoring: str  # "softmax" | "sigmoid"
    top_k: int
    renormalize: bool
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    has_selection_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: selection only
    select_on: str = "scores"  # "scores" | "logits": what top-k ranks (they differ once fp32 saturates)


@dataclass(frozen=True)
class ExpertsSpec:
    num_experts: int
    hidden: int
    intermediate: int
    activation: str  # moec.activations.ACTIVATIONS
    gated: bool
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = math.inf
    has_bias: bool = False
    weight_on_input: bool = False  # Llama4 scales the expert input, not its output


@dataclass(frozen=True)
class OutputSpec:
    """What the original module returned, so the replacement returns the same thing."""

    flatten: bool = False  # returns [T, H] for a [B, S, H] input (Llama4)
    aux: tuple[str, ...] = ()  # extra tuple items: "logits" | "topk_weights" | "topk_ids" | "dense_scores"


@dataclass(frozen=True)
class LayerSpec:
    route: Optional[RouteSpec]
    experts: ExpertsSpec
    shared: bool = False
    shared_gate: bool = False
    output: OutputSpec = field(default_factory=OutputSpec)
    post_norm: bool = False  # a norm the module applies to its output (A.X-K1's post_mlp_layernorm)
    output_bias: bool = False  # an [H] vector the module adds to its output (JetMoE)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not math.isfinite(self.experts.limit):
            d["experts"]["limit"] = None
        return d


@dataclass(frozen=True)
class QuantizedExperts:
    """A fused layer's expert weights as integer codes, in the canonical layout (gate|up rows, down)."""

    gate_up: QuantizedWeight  # [E, 2I, H] (or [E, I, H])
    down: QuantizedWeight  # [E, H, I]


def pick_router_outputs(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """From a kept router's outputs, take (topk_ids [T,k] int64, topk_weights [T,k] float)."""
    items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    ids = [t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    floats = [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(ids) != 1:
        raise ValueError("kept router must return exactly one integer tensor of expert ids")
    weights = [t for t in floats if t.shape == ids[0].shape]
    if len(weights) != 1:
        raise ValueError("kept router must return exactly one float tensor shaped like its ids")
    return ids[0], weights[0]


def split_experts_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """(hidden [T, H], ids [T, k], weights [T, k]) from an experts module's call, ids and weights in either order;
    or why the call is not one."""
    values = list(args) + list(kwargs.values())
    if len(values) != 3 or not all(isinstance(a, torch.Tensor) for a in values):
        return "an experts module must be called with (hidden states, expert ids, expert weights)"
    hidden, ids, weights = values
    if ids.is_floating_point() and not weights.is_floating_point():
        ids, weights = weights, ids
    if (not hidden.is_floating_point() or ids.is_floating_point() or not weights.is_floating_point()
            or hidden.dim() != 2 or ids.dim() != 2 or ids.shape != weights.shape):
        return "an experts module must be called with (hidden [T, H], expert ids [T, k], expert weights [T, k])"
    return hidden, ids, weights


class GivenRouting(nn.Module):
    """The router of experts fused on their own: it hands back the routing their caller decided
    (ExpertsOnly sets it for the duration of one call)."""

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k  # experts per token, as the caller routes
        self.decision: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, flat: torch.Tensor):
        if self.decision is None:
            raise RuntimeError("GivenRouting called outside ExpertsOnly: no routing was given")
        return self.decision


class FusedMoE(nn.Module):
    """route + experts (+ shared expert) in canonical form; runnable and exportable.

    `quantized` holds the experts' integer codes once they are quantized (quantize_experts, or the
    checkpoint's own codes); the float weights are then their dequantized values, so the module
    stays the exact reference for the quantized artifact."""

    def __init__(
        self,
        spec: LayerSpec,
        router_weight: Optional[torch.Tensor],
        router_bias: Optional[torch.Tensor],
        selection_bias: Optional[torch.Tensor],
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        b_gate_up: Optional[torch.Tensor],
        b_down: Optional[torch.Tensor],
        shared: Optional[nn.Module] = None,
        shared_gate: Optional[nn.Module] = None,
        router: Optional[nn.Module] = None,
        quantized: Optional[QuantizedExperts] = None,
        post_norm: Optional[nn.Module] = None,
        output_bias: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.spec = spec
        self.quantized = quantized
        self.full_precision: Optional[str] = None  # why a quantizing compile keeps this layer unquantized (--quant auto)
        # experts read one at a time (moec.stream_experts.StreamedExperts), called instead of the stacked op: an
        # out-of-core compile's reference for a layer whose experts are never all in memory (the weights stay meta)
        self.stream: Optional[Callable] = None
        self.router = router  # only when routing is kept as written (spec.route is None)
        self.router_weight = _param(router_weight)
        self.router_bias = _param(router_bias)
        if selection_bias is not None:
            self.register_buffer("selection_bias", selection_bias.detach())
        else:
            self.selection_bias = None
        self.w_gate_up = _param(w_gate_up)
        self.w_down = _param(w_down)
        self.b_gate_up = _param(b_gate_up)
        self.b_down = _param(b_down)
        self.shared = shared
        self.shared_gate = shared_gate
        self.post_norm = post_norm  # kept as the model wrote it
        self.output_bias = _param(output_bias)

    def routing(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        r = self.spec.route
        if r is None:
            ids, weights = pick_router_outputs(self.router(flat))
            return ids, weights, None
        logits = F.linear(flat, self.router_weight, self.router_bias)
        ids, weights = torch.ops.moec.route(
            logits, self.selection_bias, r.scoring, r.top_k, r.renormalize, r.n_group, r.topk_group, r.scale,
            r.select_on == "logits",
        )
        return ids, weights, logits

    def routed(self, flat, ids, weights) -> torch.Tensor:
        if self.stream is not None:
            return self.stream(flat, ids, weights.to(flat.dtype))
        x = self.spec.experts
        return torch.ops.moec.experts(
            flat, ids, weights.to(flat.dtype), self.w_gate_up, self.w_down, self.b_gate_up, self.b_down,
            x.activation, x.gated, x.alpha, x.beta, x.limit, x.weight_on_input,
        )

    def shared_output(self, flat: torch.Tensor) -> Optional[torch.Tensor]:
        if self.shared is None:
            return None
        s = self.shared(flat)
        if self.shared_gate is not None:
            s = torch.sigmoid(self.shared_gate(flat)) * s
        return s

    def compute(self, flat: torch.Tensor):
        """[T, H] -> (out [T, H], topk_ids, topk_weights, router logits or None)."""
        ids, weights, logits = self.routing(flat)
        out = self.routed(flat, ids, weights)
        s = self.shared_output(flat)
        if s is not None:
            out = out + s
        return out, ids, weights, logits

    def forward(self, hidden: torch.Tensor):
        out, ids, weights, logits = self.compute(hidden.reshape(-1, self.spec.experts.hidden))
        return self.finish(hidden, out, ids, weights, logits)

    def finish(self, hidden, out, ids, weights, logits):
        """The module's own output from the combined expert output `out` [T, H]: its post-norm, its shape,
        and the extra items it returned."""
        o = self.spec.output
        if self.output_bias is not None:
            out = out + self.output_bias
        if self.post_norm is not None:
            out = self.post_norm(out)
        if not o.flatten:
            out = out.reshape(hidden.shape)
        if not o.aux:
            return out
        extra = []
        for name in o.aux:
            if name == "logits":
                extra.append(logits)
            elif name == "topk_weights":
                extra.append(weights)
            elif name == "topk_ids":
                extra.append(ids)
            elif name == "dense_scores":
                extra.append(torch.zeros_like(logits).scatter(1, ids, weights.to(logits.dtype)))
        return (out, *extra)


class ExpertsOnly(nn.Module):
    """An experts module fused on its own, where the routing is decided outside it (a decoder layer that
    calls router and experts itself, Gemma 4; a block moec can't replace whole, DeepSeek-V4's hash-routed
    layers): called like the original, `experts(hidden [T, H], ids [T, k], weights [T, k])`, it runs `layer`
    (a FusedMoE, or a target's lowering of it) with a GivenRouting router."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        split = split_experts_args(args, kwargs)
        if isinstance(split, str):
            raise TypeError(split)
        hidden, ids, weights = split
        given = self.layer.router
        given.decision = (ids, weights)
        try:
            return self.layer(hidden)
        finally:
            given.decision = None


class LoweredMoE(nn.Module):
    """Base of a target's rewrite of a FusedMoE: keeps its routing and shared expert as they are.

    Subclasses add the experts in the target's form; `keep_experts=True` keeps the canonical weights.
    """

    def __init__(self, fused: FusedMoE, keep_experts: bool = False):
        super().__init__()
        self.spec = fused.spec
        names = ["router", "router_weight", "router_bias", "shared", "shared_gate", "post_norm", "output_bias"]
        if keep_experts:
            names += ["w_gate_up", "w_down", "b_gate_up", "b_down"]
        for name in names:
            setattr(self, name, getattr(fused, name))
        # a buffer, not a plain attribute: named in state dicts (an out-of-core compile looks tensors up by name)
        self.register_buffer("selection_bias", fused.selection_bias)

    def shared_output(self, flat: torch.Tensor) -> Optional[torch.Tensor]:
        return FusedMoE.shared_output(self, flat)

    def finish(self, hidden, out, ids, weights, logits):
        return FusedMoE.finish(self, hidden, out, ids, weights, logits)


def _param(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    if t is None:
        return None
    if isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach(), requires_grad=False)

"""Helpers shared by the targets' lowering passes: routing as plain ops, the exact dense fallback,
and the loop that rewrites every FusedMoE."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moec.activations import activate
from moec.moe_layer import FusedMoE, GivenRouting, LayerSpec, LoweredMoE, pick_router_outputs
from moec.ops import route_reference
from moec.passes.layers import iter_fused, set_submodule
from moec.passes.outcomes import LoweringOutcome


class DenseMoE(LoweredMoE):
    """Exact fallback in plain ONNX-exportable ops: every expert runs on every token."""

    def __init__(self, fused: FusedMoE, reason: str):
        super().__init__(fused, keep_experts=True)
        self.reason = reason

    def forward(self, hidden: torch.Tensor):
        flat = hidden.reshape(-1, self.spec.experts.hidden)
        ids, weights, logits = route_outside(self, flat)
        out = dense_experts(flat, ids, weights, self.w_gate_up, self.w_down, self.b_gate_up, self.b_down, self.spec)
        s = self.shared_output(flat)
        if s is not None:
            out = out + s
        return self.finish(hidden, out, ids, weights, logits)


def route_outside(layer, flat):
    """Routing as plain torch ops (exports to TopK & co.), from a FusedMoE-like layer."""
    r = layer.spec.route
    if r is None:
        ids, weights = pick_router_outputs(layer.router(flat))
        if isinstance(layer.router, GivenRouting):
            ids, weights = distinct_routing(ids, weights, layer.spec.experts.num_experts)
        return ids, weights, None
    logits = F.linear(flat, layer.router_weight, layer.router_bias)
    ids, weights = route_reference(logits, layer.selection_bias, r.scoring, r.top_k, r.renormalize,
                                   r.n_group, r.topk_group, r.scale, r.select_on == "logits")
    return ids, weights, logits


def distinct_routing(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A caller's routing in the form kernels assume: k distinct experts per token. The caller may name an
    expert twice (LongCat-Flash's zero experts land on real ones), or no expert (an id of E, which its
    experts skip). Each named expert's weights are summed onto its first slot; the other slots get an
    expert the token does not name, with weight 0."""
    valid = (ids >= 0) & (ids < num_experts)
    ids = torch.where(valid, ids, 0)
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    k = ids.shape[1]
    summed = torch.zeros(ids.shape[0], num_experts, dtype=weights.dtype, device=ids.device).scatter_add(1, ids, weights)
    repeat = torch.stack([torch.zeros_like(ids[:, 0], dtype=torch.bool)]  # k is small and static
                         + [(ids[:, :j] == ids[:, j:j + 1]).any(dim=-1) for j in range(1, k)], dim=1)
    named = torch.zeros(ids.shape[0], num_experts, dtype=torch.int64, device=ids.device).scatter(
        1, ids, torch.ones_like(ids, dtype=torch.int64))
    # experts the token does not name first (ties by index): the r-th repeated slot takes the r-th of them
    order = named * num_experts + torch.arange(num_experts, device=ids.device)
    free = torch.topk(order, num_experts, dim=-1, largest=False).indices
    rank = (torch.cumsum(repeat.to(torch.int64), dim=-1) - 1).clamp(min=0)
    ids = torch.where(repeat, free.gather(1, rank), ids)
    weights = torch.where(repeat, torch.zeros_like(weights), summed.gather(1, ids))
    return ids, weights


def mix_signed(mix: Callable[..., torch.Tensor], weights: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
    """`mix(*operands, weights)` for weights of either sign, where `mix` is linear in its weights but takes only
    non-negative ones (ONNX Runtime's MoE and QMoE): the positive part, minus the negative part run only when
    some weight is negative (torch.cond: an ONNX If, no cost otherwise)."""
    def negative(w, *ops):
        return mix(*ops, (-w).clamp(min=0.0))

    def none(w, *ops):
        return torch.zeros_like(ops[0])

    return mix(*operands, weights.clamp(min=0.0)) - torch.cond((weights < 0).any(), negative, none,
                                                               (weights, *operands))


def dense_experts(flat, ids, weights, w_gate_up, w_down, b_gate_up, b_down, spec: LayerSpec) -> torch.Tensor:
    x = spec.experts
    tokens, num_experts = flat.shape[0], w_gate_up.shape[0]
    dense_w = torch.zeros(tokens, num_experts, dtype=flat.dtype, device=flat.device).scatter(1, ids, weights.to(flat.dtype))
    selected = torch.zeros(tokens, num_experts, dtype=flat.dtype, device=flat.device).scatter(1, ids, torch.ones_like(weights, dtype=flat.dtype))
    per_expert_w = dense_w.transpose(0, 1).unsqueeze(-1)  # [E, T, 1]
    inputs = flat.unsqueeze(0).expand(num_experts, -1, -1)
    if x.weight_on_input:
        inputs = inputs * per_expert_w
    u = torch.bmm(inputs, w_gate_up.transpose(1, 2))
    if b_gate_up is not None:
        u = u + b_gate_up.unsqueeze(1)
    h = activate(u, x.activation, x.gated, x.alpha, x.beta, x.limit)
    y = torch.bmm(h, w_down.transpose(1, 2))
    if b_down is not None:
        y = y + b_down.unsqueeze(1)
    scale = selected.transpose(0, 1).unsqueeze(-1) if x.weight_on_input else per_expert_w
    return (y * scale).sum(dim=0)


Lower = Callable[[str, FusedMoE, int], "tuple[nn.Module, str] | str"]
DENSE_LABEL = "dense ONNX ops (all experts)"


def lower_each(module: nn.Module, lower: Lower,
               dense_label: Callable[[FusedMoE], str] = lambda fused: DENSE_LABEL) -> list[LoweringOutcome]:
    """Rewrite every FusedMoE: `lower(path, fused, top_k)` returns (new module, description) where the
    target's op expresses the layer exactly, or the reason it can't; then the layer becomes a DenseMoE,
    described by `dense_label(fused)`."""
    layers: list[LoweringOutcome] = []
    # Paths, not modules: holding every old layer until the loop ends would keep a second
    # copy of all expert weights alive (each lowered layer re-lays its weights).
    for path in [p for p, _ in iter_fused(module)]:
        fused = module.get_submodule(path)
        top_k = fused.spec.route.top_k if fused.spec.route is not None else kept_router_top_k(fused)
        lowered = lower(path, fused, top_k)
        if isinstance(lowered, str):
            set_submodule(module, path, DenseMoE(fused, lowered))
            layers.append(LoweringOutcome(path, dense_label(fused), lowered))
        else:
            new, description = lowered
            set_submodule(module, path, new)
            layers.append(LoweringOutcome(path, description))
        del fused
    return layers


def kept_router_top_k(fused: FusedMoE) -> int:
    """How many experts a kept router picks per token (the width of its ids output)."""
    if isinstance(fused.router, GivenRouting):
        return fused.router.top_k  # as the caller routed when the experts were fused
    with torch.no_grad():
        probe = torch.zeros(1, fused.spec.experts.hidden, dtype=fused.w_down.dtype, device=fused.w_down.device)
        ids, _ = pick_router_outputs(fused.router(probe))
    return int(ids.shape[-1])

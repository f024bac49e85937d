"""lower_moe_onnxruntime: rewrite each FusedMoE for ONNX Runtime's ``com.microsoft.MoE``.

Matches: every `FusedMoE` left by fuse_moe.
Produces: an `OrtMoE` module whose experts run as ``moec.ort_moe`` (exported as one
  ``com.microsoft.MoE`` node), with weights laid out once for ORT (fc1 rows
  interleaved gate/up for swiglu; routed scaling folded into fc2):
  - softmax routing without selection bias or groups, renormalized: the router logits
    feed MoE directly;
  - any other routing (sigmoid, selection bias, grouped top-k, a kept router, routing given by the caller):
    routing runs as ONNX ops and MoE gets ``Where(selected, log(w), -inf)``. With
    renormalized weights MoE's own renormalization reproduces them; without, a
    zero "slack" expert with logit ``log(C - sum(w))`` makes the renormalization
    denominator the constant C, which is folded into fc2 (exact; costs one zero
    expert per token); with routing given by the caller (ids may repeat, weights have no bound or sign)
    C is each token's per-expert weight sum, multiplied back onto its output, and negative weights go
    through a second MoE inside an ONNX If taken only when some weight is negative. ``normalize_routing_weights`` is always 1: ORT 1.31's CPU kernel
    is wrong with 0 when its input and output are intermediate tensors (in place).
Refuses (the layer becomes `DenseMoE` (moec/passes/lowering.py): plain ONNX ops over all experts, exact but
  E/k times the expert FLOPs; the reason goes in the report): erf-GELU or gated
  non-SiLU activations, and routing weights applied to the expert *input* (Llama4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moec.moe_layer import FusedMoE, GivenRouting, LayerSpec, LoweredMoE
from moec.ops import interleave_gate_up, route_reference
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import EXPERTS_LOWERED
from moec.passes.lowering import lower_each, mix_signed, route_outside
from moec.targets.onnxruntime import ops  # noqa: F401  (registers torch.ops.moec.ort_moe)

_PLAIN_ACTS = {"silu": "silu", "gelu_tanh": "gelu", "relu": "relu", "identity": "identity"}


@dataclass(frozen=True)
class OrtPlan:
    activation_type: str
    alpha: float
    beta: float
    limit: float
    native_routing: bool  # router logits straight into MoE
    normalize: bool
    slack: float  # 0: no slack expert; else the constant C
    fold: float  # multiplier folded into fc2
    # Routing given by the caller (experts fused on their own): the weights have no known bound, so each
    # token's weight sum is divided out for MoE's renormalization and multiplied back onto its output.
    per_token: bool = False

    def describe(self) -> str:
        how = "router logits" if self.native_routing else (
            "pseudo-logits with slack expert" if self.slack else "pseudo-logits")
        return f"com.microsoft.MoE ({self.activation_type}, {how})"


def plan_layer(spec: LayerSpec, top_k: int, given: bool = False) -> OrtPlan | str:
    """An exact ORT MoE mapping for the layer, or the reason there is none."""
    x = spec.experts
    if x.weight_on_input:
        return "routing weights scale the expert input (ORT MoE scales expert outputs)"
    if x.gated:
        if x.activation == "swiglu":
            act, alpha, beta, limit = "swiglu", x.alpha, x.beta, x.limit
        elif x.activation == "silu":
            act, alpha, beta, limit = "swiglu", 1.0, 0.0, math.inf
        else:
            return f"gated activation '{x.activation}' (ORT MoE fuses only SiLU/SwiGLU gates)"
    else:
        if x.activation not in _PLAIN_ACTS:
            return f"activation '{x.activation}' (ORT MoE's gelu is the tanh approximation)"
        act, alpha, beta, limit = _PLAIN_ACTS[x.activation], 1.0, 0.0, math.inf
    # ORT 1.31's CPU MoE is wrong (relative error 1.0) with normalize_routing_weights=0 when its
    # input and output are intermediate tensors, as in any real model; so moec always
    # emits normalize=1 and expresses un-normalized weights through the slack expert.
    r = spec.route
    native = (r is not None and r.scoring == "softmax" and not r.has_selection_bias and r.n_group <= 1
              and r.select_on == "scores")  # ORT ranks its own softmax probabilities
    if native and (r.renormalize or r.top_k == x.num_experts):  # a full softmax already sums to 1
        return OrtPlan(act, alpha, beta, limit, True, True, 0.0, r.scale)
    if r is not None and r.renormalize:
        return OrtPlan(act, alpha, beta, limit, False, True, 0.0, r.scale)
    if r is None and given:
        return OrtPlan(act, alpha, beta, limit, False, True, 1.0, 1.0, per_token=True)
    if r is None:
        # A kept router (e.g. PhiMoE's sparse mixer) yields k weights, each a probability <= 1.
        return OrtPlan(act, alpha, beta, limit, False, True, float(top_k), float(top_k))
    bound = (r.top_k if r.scoring == "sigmoid" else 1.0) * r.scale
    return OrtPlan(act, alpha, beta, limit, False, True, float(bound), float(bound))


class OrtMoE(LoweredMoE):
    """A FusedMoE whose experts run as com.microsoft.MoE."""

    def __init__(self, fused: FusedMoE, plan: OrtPlan, top_k: int):
        super().__init__(fused)
        self.plan, self.top_k = plan, top_k
        gated = plan.activation_type == "swiglu"
        with torch.no_grad():
            fc1 = interleave_gate_up(fused.w_gate_up) if gated else fused.w_gate_up
            fc1_b = fused.b_gate_up
            if fc1_b is not None and gated:
                fc1_b = interleave_gate_up(fc1_b.unsqueeze(-1)).squeeze(-1)
            fc2 = fused.w_down * plan.fold if plan.fold != 1.0 else fused.w_down
            fc2_b = fused.b_down
            if fc2_b is not None and plan.fold != 1.0:
                fc2_b = fc2_b * plan.fold
            if plan.slack:
                fc1, fc2 = _append_zero_expert(fc1), _append_zero_expert(fc2)
                fc1_b = None if fc1_b is None else _append_zero_expert(fc1_b)
                fc2_b = None if fc2_b is None else _append_zero_expert(fc2_b)
        self.fc1 = nn.Parameter(fc1.detach(), requires_grad=False)
        self.fc2 = nn.Parameter(fc2.detach(), requires_grad=False)
        self.fc1_bias = None if fc1_b is None else nn.Parameter(fc1_b.detach(), requires_grad=False)
        self.fc2_bias = None if fc2_b is None else nn.Parameter(fc2_b.detach(), requires_grad=False)

    def router_input(self, flat: torch.Tensor):
        """(logits for MoE, ids, weights, router logits) — ids/weights only when routed outside."""
        if self.plan.native_routing:
            logits = F.linear(flat, self.router_weight, self.router_bias)
            return logits, None, None, logits
        ids, weights, logits = route_outside(self, flat)
        w = weights.float()
        if not self.plan.slack:
            w = w / self.plan.fold  # MoE renormalizes; the scale lives in fc2
        pseudo = torch.full((flat.shape[0], self.fc1.shape[0]), float("-inf"), dtype=torch.float32, device=flat.device)
        pseudo = pseudo.scatter(1, ids, torch.log(w))
        if self.plan.slack:
            remaining = (self.plan.slack - w.sum(dim=-1, keepdim=True)).clamp(min=0.0)
            pseudo = torch.cat([pseudo[:, :-1], torch.log(remaining)], dim=-1)
        return pseudo.to(flat.dtype), ids, weights, logits

    def given_mixture(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Experts under routing given by the caller (made distinct by route_outside), whose weights may be 0
        or below 0 (a learned per-expert scale): the positive part through MoE and, when some weight is
        negative, the negative part through a second MoE (an ONNX If: no cost when none is)."""
        num_experts = self.fc1.shape[0] - 1  # the slack expert is last; route_outside made the ids distinct
        per_expert = torch.zeros(flat.shape[0], num_experts, dtype=torch.float32, device=flat.device).scatter(
            1, ids, weights.float())
        return mix_signed(self.mixture, per_expert, flat)

    def mixture(self, flat: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """sum_e per_expert[t, e] * expert_e(x_t) for non-negative weights: MoE renormalises them, so each
        token's sum is divided out (the slack expert takes a token weighed nowhere) and multiplied back."""
        total = per_expert.sum(dim=-1, keepdim=True)
        scale = total.clamp(min=torch.finfo(torch.float32).tiny)
        pseudo = torch.cat([torch.log(per_expert), torch.log(scale - total)], dim=-1)
        p = self.plan
        out = torch.ops.moec.ort_moe(flat, pseudo.to(flat.dtype), self.fc1, self.fc1_bias, self.fc2, self.fc2_bias,
                                     self.top_k + 1, p.normalize, p.activation_type, p.alpha, p.beta, p.limit)
        return out * scale.to(out.dtype)

    def forward(self, hidden: torch.Tensor):
        flat = hidden.reshape(-1, self.spec.experts.hidden)
        p = self.plan
        if p.per_token:
            ids, weights, logits = route_outside(self, flat)
            out = self.given_mixture(flat, ids, weights)
        else:
            moe_logits, ids, weights, logits = self.router_input(flat)
            k = self.top_k + (1 if p.slack else 0)
            out = torch.ops.moec.ort_moe(
                flat, moe_logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias,
                k, p.normalize, p.activation_type, p.alpha, p.beta, p.limit,
            )
        s = self.shared_output(flat)
        if s is not None:
            out = out + s
        if self.spec.output.aux and ids is None:
            r = self.spec.route
            ids, weights = route_reference(logits, None, r.scoring, r.top_k, r.renormalize, 1, 1, r.scale, False)
        return self.finish(hidden, out, ids, weights, logits)


def _append_zero_expert(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros_like(t[:1])], dim=0)


def lower_to_moe(path: str, fused: FusedMoE, top_k: int) -> tuple[nn.Module, str] | str:
    plan = plan_layer(fused.spec, top_k, given=isinstance(fused.router, GivenRouting))
    return plan if isinstance(plan, str) else (OrtMoE(fused, plan, top_k), plan.describe())


class LowerMoEForOnnxRuntime(Pass):
    name = "lower_moe_onnxruntime"
    ensures = (EXPERTS_LOWERED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        layers = lower_each(module, lower_to_moe)
        return PassResult(module, bool(layers), {}, layers)

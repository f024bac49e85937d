"""lower_moe_qmoe: rewrite each quantized FusedMoE as ONNX Runtime's ``com.microsoft.QMoE``.

Matches: every `FusedMoE` carrying ``quantized`` codes (from quantize_experts); a layer --quant auto kept at
  full precision is lowered as the fp32 compile lowers it (lower_moe_onnxruntime.lower_to_moe).
Produces: an `OrtQMoE` whose experts run as ``moec.ort_qmoe`` (one QMoE node): packed codes, scales
  and zero points exactly as quantize_experts made them (fc1 rows interleaved gate/up for swiglu — a
  row permutation, so no value changes). Routing of any kind runs as ONNX ops; QMoE selects the
  experts from a 0/1 mask (``router_probs``) and mixes with the exact weights (input 14,
  ``router_weights``), so neither renormalization nor the slack expert is needed.
Refuses (the layer keeps fp32 experts as dense ONNX ops, with the reason): activations QMoE can't
  compute exactly (erf-GELU, gated non-SiLU) and input-weighted routing.
"""

from __future__ import annotations

import torch
from torch import nn

from moec.moe_layer import FusedMoE, GivenRouting, LoweredMoE
from moec.ops import interleave_gate_up
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import EXPERTS_LOWERED, EXPERTS_QUANTIZED
from moec.passes.lowering import DENSE_LABEL, lower_each, mix_signed, route_outside
from moec.quant import QuantizedWeight, pack, packed_shapes
from moec.targets.onnxruntime import ops  # noqa: F401  (registers torch.ops.moec.ort_qmoe)
from moec.targets.onnxruntime.lower_moe_onnxruntime import lower_to_moe, plan_layer


def _interleave_rows(q: QuantizedWeight) -> QuantizedWeight:
    zps = None if q.zero_points is None else interleave_gate_up(q.zero_points)
    return QuantizedWeight(interleave_gate_up(q.codes), interleave_gate_up(q.scales), zps, q.spec)


def _buffers(module: nn.Module, prefix: str, q: QuantizedWeight) -> None:
    if q.codes.is_meta:  # an out-of-core compile's graph: the packed layout's shapes, no bytes
        w, s, z = packed_shapes(q)
        module.register_buffer(prefix, torch.empty(w, dtype=torch.uint8, device="meta"))
        module.register_buffer(f"{prefix}_scales", torch.empty(s, dtype=torch.float32, device="meta"))
        module.register_buffer(f"{prefix}_zero_points", None if z is None else torch.empty(z, dtype=torch.uint8,
                                                                                               device="meta"))
        return
    p = pack(q)
    module.register_buffer(f"{prefix}", torch.from_numpy(p.weight))
    module.register_buffer(f"{prefix}_scales", torch.from_numpy(p.scales))
    module.register_buffer(f"{prefix}_zero_points", None if p.zero_points is None else torch.from_numpy(p.zero_points))


class OrtQMoE(LoweredMoE):
    def __init__(self, fused: FusedMoE, activation_type: str, alpha: float, beta: float, limit: float, top_k: int,
                 accuracy_level: int = 0):
        super().__init__(fused)
        self.accuracy_level, self.top_k = accuracy_level, top_k
        q1, q2 = fused.quantized.gate_up, fused.quantized.down
        gated = activation_type == "swiglu"
        _buffers(self, "fc1", _interleave_rows(q1) if gated else q1)
        _buffers(self, "fc2", q2)
        self.bits, self.block_size = q1.spec.bits, q1.spec.block_size or 0
        b1 = fused.b_gate_up
        self.fc1_bias = None if b1 is None else nn.Parameter(
            (interleave_gate_up(b1.unsqueeze(-1)).squeeze(-1) if gated else b1).detach(), requires_grad=False)
        self.fc2_bias = fused.b_down
        self.act = (activation_type, alpha, beta, limit)
        self.signed = isinstance(fused.router, GivenRouting)  # a caller's weights may be negative

    def qmoe(self, flat: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.ops.moec.ort_qmoe(
            flat, mask, dense, self.fc1, self.fc1_scales, self.fc1_bias, self.fc2, self.fc2_scales, self.fc2_bias,
            self.fc1_zero_points, self.fc2_zero_points, self.top_k, *self.act, self.bits, self.block_size,
            self.accuracy_level,
        )

    def forward(self, hidden: torch.Tensor):
        flat = hidden.reshape(-1, self.spec.experts.hidden)
        ids, weights, logits = route_outside(self, flat)
        tokens, experts = flat.shape[0], self.fc1.shape[0]
        mask = torch.zeros(tokens, experts, dtype=flat.dtype, device=flat.device).scatter(1, ids, torch.ones_like(weights, dtype=flat.dtype))
        dense = torch.zeros(tokens, experts, dtype=flat.dtype, device=flat.device).scatter(1, ids, weights.to(flat.dtype))
        # QMoE mixes with non-negative weights only; a caller's weights may be negative
        out = mix_signed(self.qmoe, dense, flat, mask) if self.signed else self.qmoe(flat, mask, dense)
        s = self.shared_output(flat)
        if s is not None:
            out = out + s
        return self.finish(hidden, out, ids, weights, logits)


class LowerMoEForQMoE(Pass):
    name = "lower_moe_qmoe"
    requires = (EXPERTS_QUANTIZED,)
    ensures = (EXPERTS_LOWERED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        accuracy_level = int(ctx.options.get("accuracy_level", 0))

        def lower(path: str, fused: FusedMoE, top_k: int) -> tuple[nn.Module, str] | str:
            if fused.quantized is None:  # kept at full precision by --quant auto: the fp32 MoE
                return lower_to_moe(path, fused, top_k)
            plan = plan_layer(fused.spec, top_k)
            if isinstance(plan, str):
                return plan
            layer = OrtQMoE(fused, plan.activation_type, plan.alpha, plan.beta, plan.limit, top_k, accuracy_level)
            return layer, f"com.microsoft.QMoE ({fused.quantized.gate_up.spec.name}, {plan.activation_type})"

        # a layer --quant auto kept at full precision runs its own weights, not dequantized ones
        layers = lower_each(module, lower, lambda fused: DENSE_LABEL + ("" if fused.quantized is None else
                                                                         " (dequantized)"))
        return PassResult(module, bool(layers), {}, layers)

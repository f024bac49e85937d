"""quantize_experts: round-to-nearest weight-only quantization of every fused layer's expert weights.

Matches: every `FusedMoE` (after fuse_moe), when the compile asks for ``--quant int8|int4|int2``.
Produces: the same FusedMoE computing with the *dequantized* weights (so the graph stays runnable
  and is the exact reference for the quantized artifact), plus the quantized codes in the layer's
  declared ``FusedMoE.quantized`` for the lowering; per layer, the error against full precision on the layer's
  real inputs (relative L2, cosine) and the expert weight bytes before and after.
Folds: fused layers that already hold their checkpoint's codes (packed checkpoints, moec/checkpoint.py;
  PT2E-style Q/DQ Linears, fold_weight_qdq.py; fuse_moe stacks them) are not re-quantized; their codes
  go to the artifact unchanged.
Refuses (QuantError, before anything is written): a block size that doesn't divide the hidden or
  intermediate size, non-finite weights (naming the tensor), bits QMoE can't run.
This pass changes numerics on purpose: the pass manager records its error instead of failing it,
and ``--accuracy-budget`` bounds it.
"""

from __future__ import annotations

from torch import nn

from moec.moe_layer import QuantizedExperts
from moec.numerics import compare_tensors
from moec.passes.base import Pass, PassContext, PassResult, flatten_outputs
from moec.passes.conditions import EXPERTS_QUANTIZED, MOE_FUSED
from moec.passes.layers import capture_inputs, iter_fused
from moec.passes.outcomes import QuantizationOutcome
from moec.quant import QuantError, QuantSpec, dequantize, pack, quantize


def spec_from_options(options: dict) -> QuantSpec:
    bits = {"int8": 8, "int4": 4, "int2": 2}[options["quant"]]
    return QuantSpec(bits, options.get("block_size"), not options.get("asymmetric", False))


def packed_bytes(q) -> int:
    p = pack(q)
    return p.weight.nbytes + p.scales.nbytes + (0 if p.zero_points is None else p.zero_points.nbytes)


def _hidden_out(out):
    """The layer's hidden-state output (blocks like GPT-OSS's also return router scores)."""
    return flatten_outputs(out)[0].detach()


class QuantizeExperts(Pass):
    name = "quantize_experts"
    changes_numerics = True
    requires = (MOE_FUSED,)
    ensures = (EXPERTS_QUANTIZED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        spec = spec_from_options(ctx.options)
        paths = [p for p, _ in iter_fused(module)]
        inputs = capture_inputs(module, paths, ctx.probes[0])
        layers = []
        for path in paths:
            fused = module.get_submodule(path)
            captured = inputs.get(path)
            x = None if captured is None or isinstance(captured, str) else captured[1]
            before = None if x is None else _hidden_out(fused(x))
            if ctx.options.get("prequantized"):
                if fused.quantized is None:
                    raise QuantError(
                        f"{path}: the model's pre-quantized expert weights (packed checkpoint or Q/DQ layers) are "
                        "not in moec's canonical layout ([E, 2I, H] gate|up, [E, H, I]), or only some experts "
                        "carry codes; folding them would re-quantize. Not supported yet.")
                q_gate_up, q_down = fused.quantized.gate_up, fused.quantized.down
            else:
                q_gate_up = quantize(fused.w_gate_up, spec, f"{path}.w_gate_up")
                q_down = quantize(fused.w_down, spec, f"{path}.w_down")
            fp_bytes = fused.w_gate_up.numel() * 4 + fused.w_down.numel() * 4
            with_dq = [dequantize(q_gate_up), dequantize(q_down)]
            fused.w_gate_up = nn.Parameter(with_dq[0], requires_grad=False)
            fused.w_down = nn.Parameter(with_dq[1], requires_grad=False)
            fused.quantized = QuantizedExperts(q_gate_up, q_down)
            s = None if before is None else compare_tensors(before, _hidden_out(fused(x)))
            layers.append(QuantizationOutcome(
                path, spec.name, fp_bytes, packed_bytes(q_gate_up) + packed_bytes(q_down),
                None if s is None else s.rel_l2, None if s is None else s.cosine))
        return PassResult(module, bool(layers), {"spec": spec.name}, layers)

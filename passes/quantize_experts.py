"""quantize_experts: weight-only quantization of every fused layer's expert weights.

Matches: every `FusedMoE` (after fuse_moe), when the compile asks for ``--quant int8|int4|int2|auto``; with
  ``auto`` each layer gets its own precision, or stays at full precision (``FusedMoE.full_precision`` says why),
  chosen within ``--accuracy-budget`` by moec/mixed_precision.py from each layer's measured sensitivity.
Produces: the same FusedMoE computing with the *dequantized* weights (so the graph stays runnable
  and is the exact reference for the quantized artifact), plus the quantized codes in the layer's
  declared ``FusedMoE.quantized`` for the lowering; per layer, the error against full precision on the layer's
  real inputs (relative L2, cosine), the expert weight bytes before and after, and the method.
  Codes come from round-to-nearest, or with ``--calibration`` from GPTQ (moec/gptq.py) on the tokens the
  calibration data routes to each expert, per matrix where it beats round-to-nearest on held-out tokens;
  an expert that saw fewer than gptq.MIN_TOKENS of them is rounded to nearest. The outcome says which.
Folds: fused layers that already hold their checkpoint's codes (packed checkpoints, moec/checkpoint.py;
  PT2E-style Q/DQ Linears, fold_weight_qdq.py; fuse_moe stacks them) are not re-quantized; their codes
  go to the artifact unchanged.
Refuses (QuantError, before anything is written): a block size that doesn't divide the hidden or
  intermediate size, non-finite weights (naming the tensor), bits QMoE can't run; (CalibrationError) calibration
  data with fewer tokens reaching a layer than it has experts.
This pass changes numerics on purpose: the pass manager records its error instead of failing it,
and ``--accuracy-budget`` bounds it.
"""

from __future__ import annotations

import torch
from torch import nn

from moec.moe_layer import GivenRouting, QuantizedExperts
from moec.numerics import compare_tensors
from moec.mixed_precision import FULL, PRECISIONS, choose
from moec.passes.base import Pass, PassContext, PassResult, compare_outputs, flatten_outputs, worst
from moec.passes.conditions import EXPERTS_QUANTIZED, MOE_FUSED
from moec.gptq import quantize_layer
from moec.passes.layers import capture_inputs, iter_fused, layer_path
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
        paths = [p for p, _ in iter_fused(module)]
        inputs = capture_inputs(module, paths, ctx.probes[0])
        calibrated = bool(ctx.calibration) and not ctx.options.get("prequantized")
        calibration = calibration_inputs(module, paths, ctx.calibration) if calibrated else {}
        if ctx.options["quant"] == "auto":
            return self.auto(module, ctx, paths, inputs, calibration)
        spec = spec_from_options(ctx.options)
        layers = []
        for path in paths:
            fused = module.get_submodule(path)
            q_gate_up, q_down, method = self.codes(path, fused, spec, ctx, calibration)
            layers.append(give_codes(layer_path(module, path), fused, spec, q_gate_up, q_down,
                                     _layer_input(fused, inputs.get(path)), method))
        return PassResult(module, bool(layers), {"spec": spec.name}, layers)

    def codes(self, path: str, fused, spec: QuantSpec, ctx: PassContext, calibration: dict):
        """(gate_up codes, down codes, how they were chosen) for one layer at `spec`."""
        given = isinstance(fused.router, GivenRouting)  # its routing exists only inside its caller's call
        if ctx.options.get("prequantized"):
            if fused.quantized is None:
                raise QuantError(
                    f"{path}: the model's pre-quantized expert weights (packed checkpoint or Q/DQ layers) are "
                    "laid out in a way their codes can't follow to moec's canonical layout ([E, 2I, H] gate|up, "
                    "[E, H, I]), only some experts carry codes, or the codes don't give back exactly the weights the "
                    "layer was fused with; folding them would re-quantize. Not supported yet.")
            return fused.quantized.gate_up, fused.quantized.down, "the checkpoint's codes"
        if path in calibration and not given:
            tokens, experts = calibration[path].shape[0], fused.spec.experts.num_experts
            if tokens < experts:
                from moec.calibration import CalibrationError

                raise CalibrationError(
                    f"--calibration {ctx.options.get('calibration')}: {tokens} calibration tokens reach {path}, "
                    f"fewer than its {experts} experts; calibrated quantization needs data that reaches every "
                    "expert (more or longer sequences). Nothing was written.")
            ctx.log(f"  GPTQ {path} at {spec.name} ({tokens} calibration tokens)")
            q_gate_up, q_down, choice = quantize_layer(fused, calibration[path], spec, path)
            return q_gate_up, q_down, choice.describe()
        method = "round-to-nearest" + (" (routing given by the caller: not calibrated)" if given and calibration else "")
        return quantize(fused.w_gate_up, spec, f"{path}.w_gate_up"), quantize(fused.w_down, spec, f"{path}.w_down"), method

    def auto(self, module: nn.Module, ctx: PassContext, paths: list[str], inputs: dict, calibration: dict) -> PassResult:
        """--quant auto: each layer at the cheapest precision the budget allows (moec/mixed_precision.py)."""
        budget = float(ctx.options["accuracy_budget"])
        full = {p: (module.get_submodule(p).w_gate_up, module.get_submodule(p).w_down) for p in paths}
        codes: dict[tuple[str, str], tuple] = {}

        def layer_codes(path: str, precision: str):
            if (path, precision) not in codes:
                spec = spec_from_options({**ctx.options, "quant": precision})
                fused = module.get_submodule(path)
                fused.w_gate_up, fused.w_down = full[path]  # codes always from the full-precision weights
                codes[(path, precision)] = self.codes(path, fused, spec, ctx, calibration)
            return codes[(path, precision)]

        # the inputs and outputs the budget is checked against afterwards, so the choice holds there
        inputs_checked = list(ctx.verification) or list(ctx.probes)
        reference = list(ctx.budget_reference) if ctx.verification and ctx.budget_reference else None
        if reference is None:
            with torch.no_grad():
                reference = [module(*p) for p in inputs_checked]

        names = {path: layer_path(module, path) for path in paths}  # the choice is reported by layer name

        def error_of(choice: dict[str, str]) -> float:
            try:
                for path in paths:
                    precision = choice.get(names[path], FULL)
                    if precision != FULL:
                        fused = module.get_submodule(path)
                        q1, q2, _ = layer_codes(path, precision)
                        fused.w_gate_up = nn.Parameter(dequantize(q1), requires_grad=False)
                        fused.w_down = nn.Parameter(dequantize(q2), requires_grad=False)
                with torch.no_grad():
                    got = [module(*p) for p in inputs_checked]
            finally:
                for path in paths:
                    module.get_submodule(path).w_gate_up, module.get_submodule(path).w_down = full[path]
            return worst(compare_outputs(reference, got)).rel_l2

        weight_bytes = {}
        for path in paths:
            weight_bytes[names[path]] = {FULL: fp32_bytes(module.get_submodule(path))}
            for precision in PRECISIONS[:-1]:
                q1, q2, _ = layer_codes(path, precision)
                weight_bytes[names[path]][precision] = packed_bytes(q1) + packed_bytes(q2)
        plan = choose([names[p] for p in paths], weight_bytes, error_of, budget, ctx.log)
        layers = []
        for path in paths:
            fused, name = module.get_submodule(path), names[path]
            precision = plan.choice[name]
            if precision == FULL:
                fused.full_precision = f"--quant auto kept it at full precision (budget {budget:g})"
                b = weight_bytes[name][FULL]
                layers.append(QuantizationOutcome(name, FULL, b, b, 0.0, 1.0, method="kept at full precision"))
                continue
            q1, q2, method = layer_codes(path, precision)
            spec = spec_from_options({**ctx.options, "quant": precision})
            layers.append(give_codes(name, fused, spec, q1, q2, _layer_input(fused, inputs.get(path)), method))
        return PassResult(module, True, {"spec": "auto", "auto": plan.to_dict()}, layers)


def fp32_bytes(fused) -> int:
    return fused.w_gate_up.numel() * 4 + fused.w_down.numel() * 4


def _layer_input(fused, captured):
    """The layer's real input, for its own error (None for experts routed by their caller: no input of their own)."""
    if captured is None or isinstance(captured, str) or isinstance(fused.router, GivenRouting):
        return None
    return captured[1]


def give_codes(path: str, fused, spec: QuantSpec, q_gate_up, q_down, x=None,
               method: str = "round-to-nearest") -> QuantizationOutcome:
    """Give a fused layer its expert codes: from here on it computes with their dequantized weights (the exact
    reference of the artifact) and carries them for the lowering. The outcome has the bytes before and after and,
    given the layer's inputs `x`, its error against what it computed before."""
    with torch.no_grad():
        before = None if x is None else _hidden_out(fused(x))
        fp_bytes = fp32_bytes(fused)
        fused.w_gate_up = nn.Parameter(dequantize(q_gate_up), requires_grad=False)
        fused.w_down = nn.Parameter(dequantize(q_down), requires_grad=False)
        fused.quantized = QuantizedExperts(q_gate_up, q_down)
        s = None if before is None else compare_tensors(before, _hidden_out(fused(x)))
    return QuantizationOutcome(path, spec.name, fp_bytes, packed_bytes(q_gate_up) + packed_bytes(q_down),
                               None if s is None else s.rel_l2, None if s is None else s.cosine, method=method)


def calibration_inputs(module: nn.Module, paths: list[str], batches) -> dict:
    """Each fused layer's hidden-state inputs [T, H] over every calibration batch (the full-precision model's)."""
    seen: dict[str, list] = {}
    for batch in batches:
        for path, captured in capture_inputs(module, paths, batch).items():
            if not isinstance(captured, str):
                seen.setdefault(path, []).append(captured[1].reshape(-1, captured[1].shape[-1]))
    return {path: torch.cat(xs) for path, xs in seen.items()}

"""quantize_dense: weight-only block quantization of the non-expert Linear layers (--quant-dense).

Matches: every ``nn.Linear`` outside the experts (attention projections, shared experts, dense MLPs,
  the LM head), once quantize_experts has run.
Produces: a `DenseNBits` in its place, computing with the *dequantized* weight (so the graph stays
  the exact reference for the artifact) and exporting as one ONNX Runtime ``com.microsoft.MatMulNBits``
  node: ``uint8 [N, K/block, block*bits/8]`` codes (the same round-to-nearest codes and nibble order as
  the experts), ``[N * K/block]`` scales, packed zero points when asymmetric, the bias as input 5.
  Per layer: the error against full precision on the layer's real inputs and the bytes before/after.
  A pre-quantized checkpoint's Linear (compressed-tensors, GPTQ, AWQ: moec.fold_checkpoint attaches its codes,
  checked to dequantize to exactly its weight) gets its own codes instead, where MatMulNBits takes its blocks
  (per-channel codes are re-quantized in blocks); the report says "the checkpoint's codes".
  On the meta device (an out-of-core compile's graph, captured before any weight is read) the buffers are
  shapes only; that compile then quantizes each Linear as its layer streams (`quantize_linear`, the same
  codes) and verifies against `dense_reference`, the weight MatMulNBits computes with.
  With --calibration (in memory), each Linear's codes come from GPTQ on its inputs over the calibration data,
  solved in call order, and kept where they move the model's outputs on held-out calibration batches less than
  round-to-nearest's (`calibrated_codes`); how each Linear's codes were chosen is its outcome's method.
Refuses (kept fp32, with the reason in the report): routers and gates that choose experts (a flipped
  top-k is a discrete change, not a rounding error) and layers whose input size the block doesn't
  divide.
Like quantize_experts it changes numerics on purpose; ``--accuracy-budget`` bounds the total.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moec.moe_layer import FusedMoE
from moec.numerics import compare_tensors
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import DENSE_QUANTIZED, EXPERTS_QUANTIZED
from moec.passes.layers import capture_inputs, set_submodule
from moec.passes.outcomes import QuantizationOutcome
from moec.passes.quantize_experts import spec_from_options
from moec.quant import (BLOCK_SIZES, NBitsWeight, QuantizedWeight, QuantSpec, dequantize, nbits, quantize,
                        quantize_nbits)
from moec.targets.onnxruntime import ops  # noqa: F401  (registers torch.ops.moec.matmul_nbits)

# Linear layers whose outputs pick experts (transformers' names): quantizing them changes routing.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "shared_gate")


class DenseNBits(nn.Module):
    def __init__(self, linear: nn.Linear, spec: QuantSpec, accuracy_level: int, name: str,
                 codes: "Optional[QuantizedWeight | NBitsWeight]" = None):
        """Round-to-nearest codes at `spec`, or the given `codes` ([1, N, K], block-wise: a pre-quantized
        checkpoint's own, which dequantize to exactly the Linear's weight, or calibrated ones; or already
        MatMulNBits' tensors)."""
        super().__init__()
        if codes is not None:
            spec = codes.spec
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.block_size, self.accuracy_level = spec.bits, spec.block_size, accuracy_level
        if linear.weight.is_meta:  # shapes only: the codes are computed when the weight is read
            packed, scales, zero_points = _meta_buffers(linear.out_features, linear.in_features, spec)
        else:
            if codes is None:
                q = quantize_nbits(linear.weight, spec, name, reference=False)[0]
            else:  # calibrated codes out of core come in MatMulNBits' layout already
                q = codes if isinstance(codes, NBitsWeight) else nbits(codes)
            packed, scales = torch.from_numpy(q.packed), torch.from_numpy(q.scales)
            zero_points = None if q.zero_points is None else torch.from_numpy(q.zero_points)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.moec.matmul_nbits(x, self.packed, self.scales, self.zero_points, self.bias,
                                           self.in_features, self.out_features, self.bits, self.block_size,
                                           self.accuracy_level)

    def weight_bytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.numel()
        return self.packed.numel() + self.scales.numel() * 4 + zp


def _meta_buffers(n: int, k: int, spec: QuantSpec) -> tuple:
    """MatMulNBits' packed codes, scales and zero points for an [N, K] weight, as meta tensors (moec.quant.nbits'
    layout: zero points packed like the codes, each row's groups padded to whole bytes)."""
    groups, per = k // spec.block_size, 8 // spec.bits

    def meta(*shape, dtype=torch.uint8):
        return torch.empty(*shape, dtype=dtype, device="meta")

    zero_points = None if spec.symmetric else meta(n * -(-groups // per))
    return meta(n, groups, spec.block_size * spec.bits // 8), meta(n * groups, dtype=torch.float32), zero_points


def dense_spec(options: dict) -> QuantSpec:
    """The experts' bits and symmetry; MatMulNBits needs blocks, so per-row experts get block 32 here."""
    spec = spec_from_options(options)
    return QuantSpec(spec.bits, spec.block_size or 32, spec.symmetric)


def _router_paths(module: nn.Module) -> set[str]:
    """Linear layers inside fused layers' routers and shared-expert gates."""
    paths = set()
    for path, m in module.named_modules():
        if isinstance(m, FusedMoE):
            for name in ("router", "shared_gate"):
                sub = getattr(m, name, None)
                if isinstance(sub, nn.Module):
                    paths.update(f"{path}.{name}" + (f".{n}" if n else "") for n, _ in sub.named_modules())
    return paths


def _refusal(path: str, linear: nn.Linear, spec: QuantSpec, routers: set[str]) -> Optional[str]:
    if path in routers or path.rsplit(".", 1)[-1] in ROUTER_NAMES:
        return "chooses experts: kept fp32 (quantizing it would change routing decisions)"
    if linear.in_features % spec.block_size:
        return f"input size {linear.in_features} is not a multiple of the block size {spec.block_size}"
    return None


class QuantizeDense(Pass):
    name = "quantize_dense"
    changes_numerics = True
    requires = (EXPERTS_QUANTIZED,)  # it takes the experts' settings, and never re-quantizes their weights
    ensures = (DENSE_QUANTIZED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        spec = dense_spec(ctx.options)
        accuracy_level = int(ctx.options.get("accuracy_level", 0) or 0)
        routers = _router_paths(module)
        targets = [(p, m) for p, m in module.named_modules() if type(m) is nn.Linear]
        # no probes: the meta model of an out-of-core compile (shapes only, nothing to run)
        inputs = capture_inputs(module, [p for p, _ in targets], ctx.probes[0]) if ctx.probes else {}
        layers, kept, chosen = [], [], []
        for path, linear in targets:
            given = given_codes(ctx.weight_codes, linear)
            reason = _refusal(path, linear, given.spec if given else spec, routers)
            if reason:
                kept.append({"path": path, "reason": reason})
            else:
                chosen.append((path, linear, given))
        # with --calibration, GPTQ's codes for the Linears that have no codes of their own (calibrated_codes)
        calibrated = {} if not (ctx.calibration and ctx.probes) else calibrated_codes(
            module, [(p, m) for p, m, given in chosen if given is None], spec, ctx.calibration, accuracy_level, ctx.log)
        for path, linear, given in chosen:
            captured = inputs.get(path)
            x = captured[1] if captured is not None and not isinstance(captured, str) else None
            q, outcome = quantize_linear(path, linear, spec, accuracy_level, given, x, calibrated.get(path))
            layers.append(outcome)
            set_submodule(module, path, q)
        ctx.weight_codes.clear()  # the replaced Linears' weights and codes go with the entries
        return PassResult(module, bool(layers), {"kept_fp32": kept, "spec": spec.name}, layers)


def quantize_linear(path: str, linear: nn.Linear, spec: QuantSpec, accuracy_level: int, given: Optional[QuantizedWeight],
                    x: Optional[torch.Tensor], calibrated: Optional[tuple[QuantizedWeight, str]] = None,
                    method: str = "") -> tuple[DenseNBits, QuantizationOutcome]:
    """One Linear as MatMulNBits (the checkpoint's codes `given`, else `calibrated`'s (codes, how they were
    chosen), else round-to-nearest at `spec`, reported as `method`), and its outcome: bytes, and its error
    against the Linear on `x` (its real inputs; none on the meta device)."""
    if given is not None:
        codes, method = given, "the checkpoint's codes"
    elif calibrated is not None:
        codes, method = calibrated
    else:
        codes = None
    q = DenseNBits(linear, spec, accuracy_level, f"{path}.weight", codes)
    s = None if x is None or linear.weight.is_meta else compare_tensors(linear(x).detach(), q(x).detach())
    return q, QuantizationOutcome(path, (codes.spec if codes is not None else spec).name, linear.weight.numel() * 4,
                                  q.weight_bytes(), None if s is None else s.rel_l2, None if s is None else s.cosine,
                                  experts=False, method=method)


CALIBRATION_BYTES = 1 << 30  # the Linears' captured calibration inputs held at once


def calibrated_codes(module: nn.Module, targets: list[tuple[str, nn.Linear]], spec: QuantSpec, batches,
                     accuracy_level: int = 0, log=lambda m: None, outputs: str = "the model's outputs"
                     ) -> dict[str, tuple[QuantizedWeight, str]]:
    """Each Linear's codes with --calibration, by path: GPTQ's (moec.gptq.quantize_matrix) where they lower the
    model's output error on held-out calibration data, else round-to-nearest's, with how they were chosen.

    Sequential, as GPTQ's own runs are: the Linears are taken in the order the model calls them, a group of
    Linears sharing an input at a time (q/k/v), each solved on the inputs the model gives it with every Linear
    before it already quantized (one run of the fitting batches per group; at most CALIBRATION_BYTES of inputs
    captured). Then the group's GPTQ codes are kept only if the model's outputs on the held-out batches (every
    5th, or the last of fewer than 5; with one batch, that one) are closer to the module's own outputs before
    this pass with them than with round-to-nearest's. Why: lower error on each Linear's own outputs is not
    lower error on the logits. On a tiny Qwen3-MoE with correlated states GPTQ halves q_proj's and k_proj's own
    error, yet the logits moved 0.40 from fp32 against 0.28 with those two rounded to nearest (queries and keys
    are normalized per head and multiplied together after them). The module is left as it was; `outputs` names
    what it returns, for the report (out of core: one decoder layer's output)."""
    from moec.gptq import quantize_matrix
    from moec.passes.base import flatten_outputs
    from moec.passes.quantize_experts import calibration_inputs

    batches = list(batches)
    held_out = set(range(4, len(batches), 5)) or {len(batches) - 1}  # every 5th batch, else the last
    check = [b for i, b in enumerate(batches) if i in held_out]
    fit = [b for i, b in enumerate(batches) if i not in held_out] or batches  # one batch: both

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            return [flatten_outputs(module(*b))[0].detach().double() for b in check]

    reference = run()

    def error() -> float:
        return sum(float((o - r).square().sum()) for o, r in zip(run(), reference))

    order = list(capture_inputs(module, [p for p, _ in targets], fit[0]))  # recorded in the order they are called
    linears = dict(targets)
    pending = [p for p in order if p in linears] + [p for p, _ in targets if p not in order]
    tokens = sum(int(b[0].numel()) if not b[0].is_floating_point() else int(b[0][..., 0].numel()) for b in fit)
    out: dict[str, tuple[QuantizedWeight, str]] = {}

    def swap(codes: dict[str, QuantizedWeight]) -> None:
        for p, q in codes.items():
            set_submodule(module, p, DenseNBits(linears[p], spec, accuracy_level, f"{p}.weight", q))

    try:
        while pending:
            window, held = [], 0
            for p in pending:  # the next Linears whose inputs fit (at least one)
                held += tokens * linears[p].in_features * 4
                if window and held > CALIBRATION_BYTES:
                    break
                window.append(p)
            xs = calibration_inputs(module, window, fit)
            first = xs.get(window[0])
            group = [p for p in window if p in xs and first is not None and xs[p].shape == first.shape
                     and torch.equal(xs[p], first)] or [window[0]]
            log(f"  GPTQ {', '.join(group)} at {spec.name} ({tokens} calibration tokens)")
            solved = {p: quantize_matrix(linears[p].weight, xs[p], spec, f"{p}.weight") for p in group if p in xs}
            del xs, first
            if any(m == "gptq" for _, m in solved.values()):  # the group both ways, on the held-out batches
                nearest = {p: quantize(linears[p].weight.detach().unsqueeze(0), spec, f"{p}.weight") for p in solved}
                swap(nearest)
                err_nearest = error()
                swap({p: q for p, (q, _) in solved.items()})
                if error() > err_nearest:
                    swap(nearest)
                    solved = {p: (nearest[p], f"round-to-nearest (GPTQ's codes moved {outputs} more on held-out "
                                              "calibration data)") for p in solved}
            else:
                swap({p: q for p, (q, _) in solved.items()})
            out.update(solved)
            # a Linear the calibration never reached keeps round-to-nearest's codes (not in `out`)
            pending = [p for p in pending if p not in group]
    finally:
        for p, linear in linears.items():
            set_submodule(module, p, linear)
    return out


def dense_reference(linear: nn.Linear, spec: QuantSpec, given: Optional[QuantizedWeight], name: str,
                    in_place: bool = False) -> torch.Tensor:
    """The weight MatMulNBits computes with for this Linear (`quantize_linear`'s codes, dequantized): the
    artifact's exact reference; `in_place`: written over the Linear's weight (no second copy of a large head).
    The checkpoint's own codes dequantize to the weight itself."""
    if given is not None:
        return linear.weight.detach()
    weight = linear.weight.detach()
    return quantize_nbits(weight, spec, name, out=weight if in_place else None)[1]


def given_codes(table, linear: nn.Linear) -> Optional[QuantizedWeight]:
    """A pre-quantized checkpoint's own codes for this Linear from the WeightCodes table (`usable_codes`)."""
    return usable_codes(table.get(linear.weight), linear)


def usable_codes(given: Optional[QuantizedWeight], linear: nn.Linear) -> Optional[QuantizedWeight]:
    """`given` ([1, N, K]) when block-wise and dequantizing to exactly the Linear's weight now (per-channel codes
    can't be MatMulNBits', and anything else is re-quantized as usual)."""
    if given is None or given.spec.block_size not in BLOCK_SIZES:
        return None
    return given if torch.equal(dequantize(given)[0], linear.weight.detach()) else None

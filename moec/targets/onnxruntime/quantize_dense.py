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
from moec.quant import BLOCK_SIZES, QuantizedWeight, QuantSpec, dequantize, nbits, quantize_nbits
from moec.targets.onnxruntime import ops  # noqa: F401  (registers torch.ops.moec.matmul_nbits)

# Linear layers whose outputs pick experts (transformers' names): quantizing them changes routing.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "shared_gate")


class DenseNBits(nn.Module):
    def __init__(self, linear: nn.Linear, spec: QuantSpec, accuracy_level: int, name: str,
                 codes: Optional[QuantizedWeight] = None):
        """Round-to-nearest codes at `spec`, or the given `codes` ([1, N, K], block-wise: a pre-quantized
        checkpoint's own, which dequantize to exactly the Linear's weight)."""
        super().__init__()
        if codes is not None:
            spec = codes.spec
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.block_size, self.accuracy_level = spec.bits, spec.block_size, accuracy_level
        if linear.weight.is_meta:  # shapes only: the codes are computed when the weight is read
            packed, scales, zero_points = _meta_buffers(linear.out_features, linear.in_features, spec)
        else:
            q = nbits(codes) if codes is not None else quantize_nbits(linear.weight, spec, name, reference=False)[0]
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
        layers, kept = [], []
        for path, linear in targets:
            given = given_codes(ctx.weight_codes, linear)
            reason = _refusal(path, linear, given.spec if given else spec, routers)
            if reason:
                kept.append({"path": path, "reason": reason})
                continue
            captured = inputs.get(path)
            x = captured[1] if captured is not None and not isinstance(captured, str) else None
            q, outcome = quantize_linear(path, linear, spec, accuracy_level, given, x)
            layers.append(outcome)
            set_submodule(module, path, q)
        ctx.weight_codes.clear()  # the replaced Linears' weights and codes go with the entries
        return PassResult(module, bool(layers), {"kept_fp32": kept, "spec": spec.name}, layers)


def quantize_linear(path: str, linear: nn.Linear, spec: QuantSpec, accuracy_level: int, given: Optional[QuantizedWeight],
                    x: Optional[torch.Tensor]) -> tuple[DenseNBits, QuantizationOutcome]:
    """One Linear as MatMulNBits (the checkpoint's codes `given`, else round-to-nearest at `spec`), and its
    outcome: bytes, and its error against the Linear on `x` (its real inputs; none on the meta device)."""
    q = DenseNBits(linear, spec, accuracy_level, f"{path}.weight", given)
    s = None if x is None or linear.weight.is_meta else compare_tensors(linear(x).detach(), q(x).detach())
    return q, QuantizationOutcome(path, (given.spec if given else spec).name, linear.weight.numel() * 4,
                                  q.weight_bytes(), None if s is None else s.rel_l2, None if s is None else s.cosine,
                                  experts=False, method="the checkpoint's codes" if given else "")


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

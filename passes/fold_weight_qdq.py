"""fold_weight_qdq: take PT2E-style quantize/dequantize pairs off Linear weights, keeping the codes.

Matches: leaf modules whose forward is ``F.linear(x, dequantize_per_channel[_group](Q, scales,
  zero_points, ...), bias)`` in PyTorch's decomposed quantization ops (``quantized_decomposed``, what
  PT2E's convert and torchao's decomposed weight-only layers emit), where Q is an integer buffer, or
  ``quantize_per_channel[_group](W, ...)`` of a float one (an unfolded Q/DQ pair). Found by tracing
  each module's forward with torch.fx.
Produces: an ``nn.Linear`` whose weight is the dequantized weight, bit for bit what the Q/DQ graph
  computed, tagged with its codes in moec's unsigned convention (code - quant_min; zero point -
  quant_min; one scale per row or per group), recorded in the compile's WeightCodes, so that fuse_moe
  stacks them into the fused layer and quantize_experts writes them into QMoE unchanged instead of
  re-quantizing. Runs first, in its own stage (its quantization decides which passes follow), and the
  whole model's outputs are checked bit for bit unchanged.
Refuses (QuantError, before anything is written): code ranges other than 4 or 8 bits, groups QMoE
  can't take, a quantization axis other than the output rows, non-integer zero points, and layers
  quantized differently from each other (one QMoE spec per model).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from moec.passes.base import Pass, PassContext, PassResult, flatten_outputs
from moec.passes.conditions import WEIGHT_QDQ_FOLDED
from moec.passes.layers import set_submodule
from moec.passes.outcomes import FoldOutcome
from moec.quant import BLOCK_SIZES, QuantError, QuantizedWeight, QuantSpec, WeightCodes

_DEQUANT = ("dequantize_per_channel", "dequantize_per_channel_group")
_QUANT = ("quantize_per_channel", "quantize_per_channel_group")


def _decomposed(name: str):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return getattr(torch.ops.quantized_decomposed, name)


FORMAT = "PT2E quantize/dequantize on Linear weights"


@dataclass
class FoldResult:
    spec: Optional[QuantSpec] = None
    layers: list[str] = field(default_factory=list)


def _op_name(target) -> Optional[str]:
    """'dequantize_per_channel' for the op packet or its overloads ('….default'), else None."""
    name = (getattr(target, "__name__", "") or str(target)).split(".")[0]
    return name if name in _DEQUANT + _QUANT else None


def _trace(module: nn.Module) -> Optional[torch.fx.GraphModule]:
    tracer = torch.fx.Tracer()
    tracer.proxy_buffer_attributes = True  # buffers as get_attr nodes, or the DQ op is evaluated at trace time
    try:
        return torch.fx.GraphModule(module, tracer.trace(module))
    except Exception:  # not traceable: not the simple pattern this pass folds
        return None


def _value(gm: torch.fx.GraphModule, node) -> object:
    """A DQ argument's value: a module attribute, a constant, or a quantize op of those (evaluated)."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    if node.op == "call_function" and _op_name(node.target) in _QUANT:
        return node.target(*[_value(gm, a) for a in node.args], **{k: _value(gm, v) for k, v in node.kwargs.items()})
    raise LookupError(node.format_node())


def _match(module: nn.Module):
    """(dequant op name, its evaluated args, bias) when module's forward is linear(x, DQ(...), bias)."""
    if type(module).__module__.startswith("torch.nn") or list(module.children()):
        return None  # torch's own layers (Linear, Embedding, norms ...) and containers: nothing to fold
    gm = _trace(module)
    if gm is None:
        return None
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear)]
    if len(linears) != 1:
        return None
    lin = linears[0]
    w = lin.args[1] if len(lin.args) > 1 else lin.kwargs.get("weight")
    if not (isinstance(w, torch.fx.Node) and w.op == "call_function" and _op_name(w.target) in _DEQUANT):
        return None
    bias_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    try:
        args = [_value(gm, a) for a in w.args]
        kwargs = {k: _value(gm, v) for k, v in w.kwargs.items()}
        bias = _value(gm, bias_node) if bias_node is not None else None
    except LookupError:
        return None
    return _op_name(w.target), args, kwargs, bias


def _codes(name: str, args: list, kwargs: dict, path: str) -> tuple[QuantizedWeight, torch.Tensor]:
    """moec's QuantizedWeight [1, N, K] for one Q/DQ'd weight, and the weight the DQ op computes."""
    dequantized = _decomposed(name)(*args, **kwargs).float()
    q, scales, zps = args[0], args[1], args[2]
    if name == "dequantize_per_channel":
        axis, qmin, qmax = args[3], args[4], args[5]
        if axis != 0:
            raise QuantError(f"{path}: quantized along axis {axis}; QMoE takes one scale per output row (axis 0).")
        group = None
    else:
        qmin, qmax = args[3], args[4]
        group = kwargs.get("group_size", args[6] if len(args) > 6 else 128)
    n, k = q.shape
    levels = int(qmax) - int(qmin) + 1
    bits = max(1, math.ceil(math.log2(levels)))
    if bits not in (4, 8):
        raise QuantError(f"{path}: codes in [{qmin}, {qmax}] are {bits}-bit; QMoE folds 4- or 8-bit codes.")
    if group is not None and group != k and group not in BLOCK_SIZES:
        raise QuantError(f"{path}: quantization groups of {group} columns; QMoE takes "
                         f"{', '.join(map(str, BLOCK_SIZES))} or one scale per row.")
    zps = torch.as_tensor(zps)
    if zps.is_floating_point() and not torch.equal(zps, zps.round()):
        raise QuantError(f"{path}: zero points are not integers; QMoE's zero points are codes.")
    g = 1 if group is None or group == k else k // group
    codes = (q.to(torch.int32) - int(qmin)).reshape(1, n, k)
    zp = (zps.to(torch.int32) - int(qmin)).reshape(1, n, g) if zps.numel() > 1 else torch.full(
        (1, n, g), int(zps) - int(qmin), dtype=torch.int32)
    symmetric = bool((zp == (1 << (bits - 1))).all())
    spec = QuantSpec(bits, None if g == 1 else k // g, symmetric)
    scale = torch.as_tensor(scales).float().reshape(1, n, g)
    return QuantizedWeight(codes, scale, None if symmetric else zp, spec), dequantized


class FoldWeightQDQ(Pass):
    name = "fold_weight_qdq"
    ensures = (WEIGHT_QDQ_FOLDED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        result = fold_weight_qdq(module, ctx.probes[0] if ctx.probes else None, ctx.weight_codes)
        if not result.layers:
            return PassResult(module, False, {"format": FORMAT, "spec": None})
        layers = [FoldOutcome(path, result.spec) for path in result.layers]
        return PassResult(module, True, {"format": FORMAT, "spec": result.spec.name}, layers)


def fold_weight_qdq(model: nn.Module, probe: Optional[tuple] = None, codes: Optional[WeightCodes] = None) -> FoldResult:
    """Replace every matching Q/DQ Linear in `model` (in place), recording their codes in `codes`;
    `probe` checks the outputs unchanged."""
    result = FoldResult()
    found = [(path, match) for path, module in model.named_modules()
             if path and (match := _match(module)) is not None]
    if not found:
        return result
    before = None
    if probe is not None:
        with torch.no_grad():
            before = model(*probe)
    for path, (name, args, kwargs, bias) in found:
        q, weight = _codes(name, args, kwargs, path)
        if result.spec is not None and q.spec != result.spec:
            raise QuantError(f"{path}: quantized as {q.spec.name}, other layers as {result.spec.name}; moec "
                             "folds one quantization per model.")
        result.spec = q.spec
        n, k = weight.shape
        linear = nn.Linear(k, n, bias=bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if codes is not None:
            codes.attach(linear.weight, q)  # quantize_experts writes these codes, not new ones
        if bias is not None:
            linear.bias = nn.Parameter(torch.as_tensor(bias).detach().float(), requires_grad=False)
        set_submodule(model, path, linear)
        result.layers.append(path)
    if before is not None:
        with torch.no_grad():
            after = model(*probe)
        if not all(torch.equal(b, a) for b, a in zip(flatten_outputs(before), flatten_outputs(after))):
            raise QuantError("folding the quantize/dequantize pairs changed the model's outputs; not folded.")
    return result

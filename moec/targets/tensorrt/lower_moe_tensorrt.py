"""lower_moe_tensorrt: rewrite each FusedMoE for TensorRT: routing as ONNX ops, experts as one plugin.

Matches: every `FusedMoE` left by fuse_moe (and quantize_experts, when the compile asks for --quant).
Produces: a `TrtMoE` whose routing runs as ops TensorRT's ONNX parser supports (MatMul, Softmax or
  Sigmoid, TopK, GatherElements, ReduceSum, Div ...) and whose experts are one ``moec::trt_experts``
  op, exported as one plugin node (see `PLUGIN`): ``op_type`` = plugin name, attributes
  ``plugin_namespace`` / ``plugin_version`` plus the plugin fields and ``aot`` (1 with
  --tensorrt-aot, else 0: the plugin defines both implementations, and without the attribute
  TensorRT's parser would leave the choice to the plugin creator, which refuses), weights as inputs in moec's canonical layout (``w_gate_up [E, 2I, H]`` gate rows
  then up rows, ``w_down [E, H, I]``; quantized: packed codes, per-group scales, zero points), expert
  ids as int32 (TensorRT's TopK index type), a zero-filled fp32 accumulator the output aliases.
Refuses: quantization groups that are not a multiple of 16 columns (the kernels dequantize one
  scale per tile), and with --tensorrt-aot int4 down-projection groups not a multiple of 32
  (the one-launch kernel's limit; see plugins/moe_experts_fused.py). Every activation moec
  recognizes, biases and input-weighted routing (Llama4) are plugin fields.
The plugin's ONNX node is made in translations.py; its kernels and TensorRT registration live in plugins/.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moec.errors import MoecError
from moec.moe_layer import FusedMoE, LoweredMoE
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import EXPERTS_LOWERED
from moec.passes.lowering import lower_each, route_outside
from moec.quant import QuantizedWeight, pack
from moec.targets.tensorrt import ops  # noqa: F401  (registers torch.ops.moec.trt_experts)
from moec.targets.tensorrt.plugin_spec import PLUGIN, PluginSpec  # noqa: F401  (re-exported)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def plugin_quantized(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
    """(codes uint8 [E, N, K*bits/8], scales f32 [E, N, G], zero points uint8 [E, N, G] or None, group)."""
    e, n, k = q.shape
    g = q.scales.shape[-1]
    codes = torch.from_numpy(pack(q).weight)
    zps = None if q.zero_points is None else q.zero_points.to(torch.uint8)
    return codes, q.scales.float().reshape(e, n, g).contiguous(), zps, k // g


class TrtMoE(LoweredMoE):
    def __init__(self, fused: FusedMoE, aot: bool = False):
        quantized = fused.quantized
        super().__init__(fused, keep_experts=quantized is None)
        dtype = fused.w_gate_up.dtype
        self.aot = aot
        self.placeholder = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)
        self.register_buffer("placeholder_f32", torch.zeros(1, dtype=torch.float32))
        self.register_buffer("placeholder_u8", torch.zeros(1, dtype=torch.uint8))
        self.has_bias = fused.b_gate_up is not None or fused.b_down is not None
        if self.has_bias:  # the plugin takes both biases or neither
            e, rows, h = fused.w_gate_up.shape
            b1, b2 = fused.b_gate_up, fused.b_down
            self.b_gate_up = _frozen(b1 if b1 is not None else torch.zeros(e, rows, dtype=dtype))
            self.b_down = _frozen(b2 if b2 is not None else torch.zeros(e, h, dtype=dtype))
        self.quant_bits = 0
        self.groups = (0, 0)
        self.has_zero_points = False
        if quantized is not None:
            c1, s1, z1, g1 = plugin_quantized(quantized.gate_up)
            c2, s2, z2, g2 = plugin_quantized(quantized.down)
            self.quant_bits = quantized.gate_up.spec.bits
            self.groups = (g1, g2)
            self.has_zero_points = z1 is not None
            for name, t in (("w_gate_up", c1), ("w_down", c2), ("s_gate_up", s1), ("s_down", s2)):
                self.register_buffer(name, t)
            self.register_buffer("z_gate_up", z1 if z1 is not None else torch.zeros(1, dtype=torch.uint8))
            self.register_buffer("z_down", z2 if z2 is not None else torch.zeros(1, dtype=torch.uint8))

    def forward(self, hidden: torch.Tensor):
        flat = hidden.reshape(-1, self.spec.experts.hidden)
        ids, weights, logits = route_outside(self, flat)
        x = self.spec.experts
        quant = self.quant_bits != 0
        bias = self.has_bias
        accumulator = torch.zeros(flat.shape, dtype=torch.float32)
        out = torch.ops.moec.trt_experts(
            flat, ids.to(torch.int32), weights.to(flat.dtype), self.w_gate_up, self.w_down,
            self.b_gate_up if bias else self.placeholder, self.b_down if bias else self.placeholder,
            self.s_gate_up if quant else self.placeholder_f32, self.z_gate_up if quant else self.placeholder_u8,
            self.s_down if quant else self.placeholder_f32, self.z_down if quant else self.placeholder_u8,
            accumulator, x.activation, x.gated, x.alpha, x.beta, x.limit, x.weight_on_input, bias,
            self.quant_bits, self.has_zero_points, self.aot,
        ).to(flat.dtype)
        s = self.shared_output(flat)
        if s is not None:
            out = out + s
        return self.finish(hidden, out, ids, weights, logits)


PLUGIN_BITS = (4, 8)  # the code widths the plugin's kernels unpack (plugins/)


def check_quant_groups(path: str, layer: TrtMoE, aot: bool) -> None:
    """The plugin kernels unpack 4- and 8-bit codes and dequantize one scale per tile: groups must hold
    whole 16-column tiles."""
    if not layer.quant_bits:
        return
    if layer.quant_bits not in PLUGIN_BITS:  # e.g. a packed 2-bit checkpoint (--quant int2 is refused up front)
        raise MoecError(f"{path}: {layer.quant_bits}-bit expert codes; the TensorRT plugin's kernels unpack 4- and "
                        "8-bit codes. Use --target onnxruntime (QMoE runs 2-bit experts). Nothing was written.")
    for name, group in zip(("w_gate_up", "w_down"), layer.groups):
        if group % 16:
            raise MoecError(f"{path}.{name}: quantization groups of {group} columns; the TensorRT plugin's kernels "
                            "need multiples of 16. Use --block-size 16, 32, 64 or 128 (one dividing the layer's "
                            "dimensions), or --target onnxruntime.")
    if aot and layer.quant_bits == 4 and layer.groups[1] % 32:
        raise MoecError(f"{path}.w_down: --tensorrt-aot with int4 groups of {layer.groups[1]} columns; the "
                        "one-launch AOT kernel needs multiples of 32. Use a --block-size that is a multiple of "
                        "32, or drop --tensorrt-aot (the JIT plugin runs them).")


class LowerMoEForTensorRT(Pass):
    name = "lower_moe_tensorrt"
    ensures = (EXPERTS_LOWERED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        aot = bool(ctx.options.get("tensorrt_aot"))

        def lower(path: str, fused: FusedMoE, top_k: int) -> tuple[nn.Module, str]:
            layer = TrtMoE(fused, aot)  # every layer moec fuses is a plugin layer: no dense fallback
            check_quant_groups(path, layer, aot)
            kind = f"int{layer.quant_bits} " if layer.quant_bits else ""
            mode = "AOT" if aot else "JIT"
            return layer, f"{PLUGIN.namespace}::{PLUGIN.name} plugin v{PLUGIN.version} ({kind}{mode})"

        layers = lower_each(module, lower)
        return PassResult(module, bool(layers), {"plugin": PLUGIN.describe()}, layers)

"""The onnxruntime target: ONNX with ONNX Runtime's contrib MoE ops, run as it is by ONNX Runtime.

Fused layers become one ``com.microsoft.MoE`` node (fp32) or ``QMoE`` (--quant), or exact dense ops
where ORT's op can't express the layer (lower_moe_onnxruntime.py, lower_moe_qmoe.py); --quant-dense
adds ``MatMulNBits`` for the other Linear layers (quantize_dense.py); a KV-cache decoder's attention
becomes ``GroupQueryAttention`` (lower_attention.py). On the exported ONNX graph, rotary embeddings
become ``RotaryEmbedding`` (fuse_rotary.py) and residual adds with the RMSNorm after them
``SkipSimplifiedLayerNormalization`` (fuse_skip_norm.py). Ops: ops.py; their schemas and ONNX
translations: translations.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Optional, Sequence

from moec.targets.base import ActivationRounding, ExpertNode, GraphPass, Target


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    description = "ONNX for ONNX Runtime (com.microsoft MoE / QMoE / MatMulNBits)"
    own_options = {
        "quant_dense": "emits ONNX Runtime's com.microsoft.MatMulNBits for the other Linear layers",
        "accuracy_level": "sets ONNX Runtime QMoE's accuracy_level",
    }

    def lowering_passes(self, options) -> Sequence:
        passes = []
        if options.extra.get("quant_dense"):
            from moec.targets.onnxruntime.quantize_dense import QuantizeDense

            passes.append(QuantizeDense())
        if options.extra.get("quant"):
            from moec.targets.onnxruntime.lower_moe_qmoe import LowerMoEForQMoE

            passes.append(LowerMoEForQMoE())
        else:
            from moec.targets.onnxruntime.lower_moe_onnxruntime import LowerMoEForOnnxRuntime

            passes.append(LowerMoEForOnnxRuntime())
        from moec.targets.onnxruntime.lower_attention import LowerAttentionForGQA

        passes.append(LowerAttentionForGQA())  # a KV-cache decoder's attention; nothing otherwise
        return passes

    def translations(self) -> Mapping[Callable, Callable]:
        from moec.targets.onnxruntime.translations import translations

        return translations()

    def graph_passes(self) -> Sequence[GraphPass]:
        from moec.targets.onnxruntime import fuse_rotary, fuse_skip_norm

        return (GraphPass(fuse_rotary.NAME, fuse_rotary.fuse_rotary, "rotary embeddings -> RotaryEmbedding"),
                GraphPass(fuse_skip_norm.NAME, fuse_skip_norm.fuse_skip_norm,
                          "residual adds + RMSNorm -> SkipSimplifiedLayerNormalization"))

    def expert_nodes(self) -> Sequence[ExpertNode]:
        return (ExpertNode("com.microsoft", "MoE", 2, "k"), ExpertNode("com.microsoft", "QMoE", 2, "k"))

    def activation_rounding(self, options) -> Optional[ActivationRounding]:
        # ORT's block-wise int8 experts have no fp32 kernel, its 2-bit weights in blocks of 32 or more
        # (QMoE and MatMulNBits) run on its LUT GEMM (measured: 0.3-3.3% relative L2 against the dequantized
        # weights; per row and block 16 are exact), and accuracy_level 4 asks for int8 activations: then
        # ORT quantizes activations too, beyond what the dequantized reference models.
        x = options.extra
        if not x.get("quant"):
            return None
        block = x.get("block_size")
        if x["quant"] == "auto":  # each precision it chose (all it may choose, before it has)
            chosen = [p for p in x.get("quant_chosen", ("int2", "int4", "int8")) if p != "fp32"]
            return next((r for p in chosen if (r := self.activation_rounding(replace(options, extra={**x, "quant": p})))
                         is not None), None)
        if x.get("accuracy_level") == 4:
            return ActivationRounding("--accuracy-level 4 asks its 4-bit kernels for int8 activations",
                                      "the default accuracy level")
        if x["quant"] == "int2":
            from moec.targets.onnxruntime.quantize_dense import dense_spec

            if (block or 0) >= 32:
                return ActivationRounding(f"2-bit weights in blocks of {block} run on its LUT GEMM, which rounds "
                                          "activations to int8 per group", "--block-size 16 or per row (no --block-size)")
            if x.get("quant_dense") and (dense_spec(x).block_size or 0) >= 32:
                return ActivationRounding(f"the dense Linears' 2-bit weights in blocks of {dense_spec(x).block_size} "
                                          "run on its LUT GEMM, which rounds activations to int8 per group",
                                          "--block-size 16 for the dense Linears too")
        if x["quant"] == "int8" and block is not None:
            return ActivationRounding("block-wise int8 weights have no fp32 kernel: activations are rounded to int8",
                                      "int8 per row (no --block-size)")
        return None


TARGET = OnnxRuntimeTarget()

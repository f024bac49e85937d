"""How the onnxruntime target's ops appear in ONNX: contrib-op schemas and torch.onnx translations.

ONNX Runtime's contrib ops (com.microsoft) are not in onnx's schema registry; the subset moec emits is
declared here, mirroring the schemas ONNX Runtime 1.31/1.32 report (inputs, optionality, attribute names
and defaults). Each of moec/targets/onnxruntime/ops.py's ops becomes exactly one node.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import onnxscript
import torch
from onnx.defs import OpSchema

from moec.onnx_schemas import FLOATS, Input, attr, register, schema
from moec.targets.onnxruntime import ops  # noqa: F401  (registers torch.ops.moec.ort_*)

def _moe_attributes() -> list[OpSchema.Attribute]:
    a = OpSchema.AttrType
    return [
        attr("k", a.INT, 1),
        attr("normalize_routing_weights", a.INT, 0),
        attr("activation_type", a.STRING, "relu"),
        attr("use_sparse_mixer", a.INT, 0),
        attr("swiglu_fusion", a.INT, 0),
        attr("activation_alpha", a.FLOAT, 1.0),
        attr("activation_beta", a.FLOAT, 0.0),
        attr("swiglu_limit", a.FLOAT),
    ]


def moe_schema() -> OpSchema:
    inputs = [
        Input("input"), Input("router_probs"),
        Input("fc1_experts_weights"), Input("fc1_experts_bias", optional=True),
        Input("fc2_experts_weights"), Input("fc2_experts_bias", optional=True),
        Input("fc3_experts_weights", optional=True), Input("fc3_experts_bias", optional=True),
    ]
    return schema("MoE", "com.microsoft", inputs, _moe_attributes(), [("T", FLOATS, "")])


def qmoe_schema() -> OpSchema:
    a = OpSchema.AttrType
    inputs = [
        Input("input"), Input("router_probs"),
        Input("fc1_experts_weights", "T1"), Input("fc1_scales", "T2"), Input("fc1_experts_bias", optional=True),
        Input("fc2_experts_weights", "T1"), Input("fc2_scales", "T2"), Input("fc2_experts_bias", optional=True),
        Input("fc3_experts_weights", "T1", optional=True), Input("fc3_scales", "T2", optional=True),
        Input("fc3_experts_bias", optional=True),
        Input("fc1_zero_points", "T1", optional=True), Input("fc2_zero_points", "T1", optional=True),
        Input("fc3_zero_points", "T1", optional=True), Input("router_weights", optional=True),
    ]
    attributes = _moe_attributes() + [
        attr("expert_weight_bits", a.INT, 4),
        attr("block_size", a.INT, 0),
        attr("accuracy_level", a.INT, 0),
        attr("weights_prepacked", a.INT, -1),
        attr("quant_type", a.STRING, "int"),
    ]
    constraints = [("T", FLOATS, ""), ("T1", ["tensor(uint8)"], ""), ("T2", FLOATS, "")]
    return schema("QMoE", "com.microsoft", inputs, attributes, constraints)


def matmul_nbits_schema() -> OpSchema:
    a = OpSchema.AttrType
    inputs = [Input("A"), Input("B", "T1"), Input("scales"), Input("zero_points", "T1", optional=True),
              Input("g_idx", "T2", optional=True), Input("bias", optional=True)]
    attributes = [attr("K", a.INT), attr("N", a.INT), attr("bits", a.INT, 4), attr("block_size", a.INT),
                  attr("accuracy_level", a.INT, 0)]
    constraints = [("T", FLOATS, ""), ("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(int32)"], "")]
    return schema("MatMulNBits", "com.microsoft", inputs, attributes, constraints, outputs=("Y",))


def group_query_attention_schema() -> OpSchema:
    """The inputs up to head_sink and the attributes moec sets or could (ORT 1.32 has more: KV-cache
    quantization, Q/K norms, query_seqlens), in ORT's order."""
    a = OpSchema.AttrType
    inputs = [Input("query"), Input("key", optional=True), Input("value", optional=True),
              Input("past_key", optional=True), Input("past_value", optional=True),
              Input("seqlens_k", "M"), Input("total_sequence_length", "M"),
              Input("cos_cache", optional=True), Input("sin_cache", optional=True),
              Input("position_ids", "tensor(int64)", optional=True), Input("attention_bias", optional=True),
              Input("head_sink", optional=True)]
    attributes = [attr("num_heads", a.INT), attr("kv_num_heads", a.INT), attr("scale", a.FLOAT),
                  attr("causal", a.INT, 1), attr("local_window_size", a.INT, -1), attr("do_rotary", a.INT, 0),
                  attr("rotary_interleaved", a.INT, 0), attr("softcap", a.FLOAT, 0.0),
                  attr("smooth_softmax", a.INT)]
    constraints = [("T", FLOATS, ""), ("M", ["tensor(int32)"], "")]
    return schema("GroupQueryAttention", "com.microsoft", inputs, attributes, constraints,
                  outputs=("output", "present_key", "present_value"))


def register_ort_contrib_schemas() -> None:
    register(group_query_attention_schema())
    register(moe_schema())
    register(qmoe_schema())
    register(matmul_nbits_schema())


_MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _ort_moe_translation(hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize,
                         activation_type, alpha, beta, limit):
    attrs: dict[str, Any] = {"k": int(k), "normalize_routing_weights": int(bool(normalize)),
                             "activation_type": activation_type}
    if activation_type == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=float(alpha), activation_beta=float(beta))
        if math.isfinite(limit):
            attrs["swiglu_limit"] = float(limit)
    return _MSFT.MoE(hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, **attrs)


def _ort_qmoe_translation(hidden, router_probs, router_weights, fc1, fc1_scales, fc1_bias, fc2, fc2_scales,
                          fc2_bias, fc1_zero_points, fc2_zero_points, k, activation_type, alpha, beta, limit,
                          bits, block_size, accuracy_level):
    attrs: dict[str, Any] = {"k": int(k), "normalize_routing_weights": 0, "activation_type": activation_type,
                             "expert_weight_bits": int(bits), "weights_prepacked": 0,
                             "accuracy_level": int(accuracy_level)}
    if block_size:
        attrs["block_size"] = int(block_size)
    if activation_type == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=float(alpha), activation_beta=float(beta))
        if math.isfinite(limit):
            attrs["swiglu_limit"] = float(limit)
    return _MSFT.QMoE(hidden, router_probs, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias,
                      None, None, None, fc1_zero_points, fc2_zero_points, None, router_weights, **attrs)


def _matmul_nbits_translation(x, packed, scales, zero_points, bias, in_features, out_features, bits, block_size,
                              accuracy_level):
    return _MSFT.MatMulNBits(x, packed, scales, zero_points, None, bias, K=int(in_features), N=int(out_features),
                             bits=int(bits), block_size=int(block_size), accuracy_level=int(accuracy_level))


def _group_query_attention_translation(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                       attention_bias, head_sink, num_heads, kv_num_heads, scale):
    return _MSFT.GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                     None, None, None, attention_bias, head_sink, num_heads=int(num_heads),
                                     kv_num_heads=int(kv_num_heads), scale=float(scale), causal=0)


def translations() -> dict[Callable, Callable]:
    """torch op -> ONNX translation, for torch.onnx's custom_translation_table."""
    register_ort_contrib_schemas()
    return {
        torch.ops.moec.ort_moe.default: _ort_moe_translation,
        torch.ops.moec.ort_qmoe.default: _ort_qmoe_translation,
        torch.ops.moec.matmul_nbits.default: _matmul_nbits_translation,
        torch.ops.moec.ort_group_query_attention.default: _group_query_attention_translation,
    }

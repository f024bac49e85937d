"""How the tensorrt target's experts op appears in ONNX: the plugin node's schema and translation.

``moec::trt_experts`` becomes one node whose op_type, plugin_* attributes and fields TensorRT's ONNX
parser maps to the registered plugin (plugin_spec.PLUGIN; registration in plugins/tensorrt_plugin.py).
"""

from __future__ import annotations

import math
from typing import Callable

import onnxscript
import torch
from onnx.defs import OpSchema

from moec.onnx_schemas import FLOATS, Input, attr, register
from moec.targets.tensorrt import ops  # noqa: F401  (registers torch.ops.moec.trt_experts)
from moec.targets.tensorrt.plugin_spec import PLUGIN


def register_plugin_schema(plugin) -> None:
    """Schema for moec's TensorRT experts plugin node (see moec/targets/tensorrt/plugin_spec.PluginSpec)."""
    a = OpSchema.AttrType
    kinds = {"int": a.INT, "float": a.FLOAT, "string": a.STRING}
    attributes = [attr("plugin_namespace", a.STRING), attr("plugin_version", a.STRING), attr("aot", a.INT)]
    for name, kind in plugin.fields:
        attributes.append(attr(name, kinds[kind.split(":")[0].split(",")[0].split()[0]]))
    types = {"topk_ids": "I", "w_gate_up": "W", "w_down": "W", "s_gate_up": "S", "s_down": "S",
             "z_gate_up": "Z", "z_down": "Z", "accumulator": "S"}
    inputs = [Input(name, types.get(name, "T")) for name in plugin.inputs]
    constraints = [("T", FLOATS, ""), ("I", ["tensor(int32)", "tensor(int64)"], ""),
                   ("W", FLOATS + ["tensor(uint8)"], ""), ("S", ["tensor(float)"], ""), ("Z", ["tensor(uint8)"], "")]
    option = OpSchema.FormalParameterOption.Single
    register(OpSchema(plugin.name, plugin.domain, 1, f"{plugin.domain}::{plugin.name} as emitted by moec",
                      inputs=[OpSchema.FormalParameter(i.name, i.type_str, "", param_option=option) for i in inputs],
                      outputs=[OpSchema.FormalParameter("output", "S", "")],  # fp32, aliases `accumulator`
                      type_constraints=constraints, attributes=attributes))


def experts_plugin_translation(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, s_gate_up,
                               z_gate_up, s_down, z_down, accumulator, activation, gated, alpha, beta, limit,
                               weight_on_input, has_bias, quant_bits, has_zero_points, aot):
    """torch.onnx translation of moec::trt_experts: one plugin node."""
    register_plugin_schema(PLUGIN)
    op = onnxscript.values.Opset(PLUGIN.domain, 1)
    e, rows = w_gate_up.shape[:2]
    h = hidden.shape[-1]
    inter = w_down.shape[2] * 8 // quant_bits if quant_bits else w_down.shape[2]
    groups = (0, 0)
    if quant_bits:
        groups = (h // s_gate_up.shape[2], inter // s_down.shape[2])
    return getattr(op, PLUGIN.name)(
        hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, s_gate_up, z_gate_up, s_down, z_down,
        accumulator, plugin_namespace=PLUGIN.namespace, plugin_version=PLUGIN.version,
        num_experts=int(e), top_k=int(topk_ids.shape[1]), hidden_size=int(h), intermediate_size=int(inter),
        activation=activation, gated=int(bool(gated)), alpha=float(alpha), beta=float(beta),
        limit=float(limit) if math.isfinite(limit) else 0.0, weight_on_input=int(bool(weight_on_input)),
        has_bias=int(bool(has_bias)), quant_bits=int(quant_bits), group_size_gate_up=int(groups[0]),
        group_size_down=int(groups[1]), has_zero_points=int(bool(has_zero_points)), aot=int(bool(aot)),
    )


def translations() -> dict[Callable, Callable]:
    """torch op -> ONNX translation, for torch.onnx's custom_translation_table."""
    return {torch.ops.moec.trt_experts.default: experts_plugin_translation}

"""ONNX schemas for the non-standard ops moec emits, registered with onnx.defs.

onnxscript's tracer (used by torch.onnx's custom translation table) only builds
nodes whose schema onnx knows. ONNX Runtime's contrib ops (com.microsoft) are not
in onnx's registry, so we declare the subset we emit here, mirroring the schemas
ONNX Runtime 1.31 reports (inputs, optionality, attribute names and defaults).
Registration is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx.defs import OpSchema

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


@dataclass(frozen=True)
class Input:
    name: str
    type_str: str = "T"
    optional: bool = False


def _attr(name: str, kind: OpSchema.AttrType, default=None) -> OpSchema.Attribute:
    if default is None:
        return OpSchema.Attribute(name, kind, "", required=False)
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), "")


def _schema(name, domain, inputs, attributes, type_constraints, outputs=("output",)) -> OpSchema:
    option = OpSchema.FormalParameterOption
    return OpSchema(
        name,
        domain,
        1,
        f"{domain}::{name} as emitted by moec",
        inputs=[
            OpSchema.FormalParameter(i.name, i.type_str, "", param_option=option.Optional if i.optional else option.Single)
            for i in inputs
        ],
        outputs=[OpSchema.FormalParameter(o, "T", "") for o in outputs],
        type_constraints=type_constraints,
        attributes=attributes,
    )


def _moe_attributes() -> list[OpSchema.Attribute]:
    a = OpSchema.AttrType
    return [
        _attr("k", a.INT, 1),
        _attr("normalize_routing_weights", a.INT, 0),
        _attr("activation_type", a.STRING, "relu"),
        _attr("use_sparse_mixer", a.INT, 0),
        _attr("swiglu_fusion", a.INT, 0),
        _attr("activation_alpha", a.FLOAT, 1.0),
        _attr("activation_beta", a.FLOAT, 0.0),
        _attr("swiglu_limit", a.FLOAT),
    ]


def moe_schema() -> OpSchema:
    inputs = [
        Input("input"), Input("router_probs"),
        Input("fc1_experts_weights"), Input("fc1_experts_bias", optional=True),
        Input("fc2_experts_weights"), Input("fc2_experts_bias", optional=True),
        Input("fc3_experts_weights", optional=True), Input("fc3_experts_bias", optional=True),
    ]
    return _schema("MoE", "com.microsoft", inputs, _moe_attributes(), [("T", _FLOATS, "")])


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
        _attr("expert_weight_bits", a.INT, 4),
        _attr("block_size", a.INT, 0),
        _attr("accuracy_level", a.INT, 0),
        _attr("weights_prepacked", a.INT, -1),
        _attr("quant_type", a.STRING, "int"),
    ]
    constraints = [("T", _FLOATS, ""), ("T1", ["tensor(uint8)"], ""), ("T2", _FLOATS, "")]
    return _schema("QMoE", "com.microsoft", inputs, attributes, constraints)


def matmul_nbits_schema() -> OpSchema:
    a = OpSchema.AttrType
    inputs = [Input("A"), Input("B", "T1"), Input("scales"), Input("zero_points", "T1", optional=True),
              Input("g_idx", "T2", optional=True), Input("bias", optional=True)]
    attributes = [_attr("K", a.INT), _attr("N", a.INT), _attr("bits", a.INT, 4), _attr("block_size", a.INT),
                  _attr("accuracy_level", a.INT, 0)]
    constraints = [("T", _FLOATS, ""), ("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(int32)"], "")]
    return _schema("MatMulNBits", "com.microsoft", inputs, attributes, constraints, outputs=("Y",))


_REGISTERED: set[tuple[str, str]] = set()


def register(schema: OpSchema) -> None:
    key = (schema.domain, schema.name)
    if key in _REGISTERED:
        return
    try:
        onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)
    _REGISTERED.add(key)


def register_ort_contrib_schemas() -> None:
    register(moe_schema())
    register(qmoe_schema())
    register(matmul_nbits_schema())


def register_plugin_schema(plugin) -> None:
    """Schema for moec's TensorRT experts plugin node (see moec/plugin_spec.PluginSpec)."""
    a = OpSchema.AttrType
    kinds = {"int": a.INT, "float": a.FLOAT, "string": a.STRING}
    attributes = [_attr("plugin_namespace", a.STRING), _attr("plugin_version", a.STRING), _attr("aot", a.INT)]
    for name, kind in plugin.fields:
        attributes.append(_attr(name, kinds[kind.split(":")[0].split(",")[0].split()[0]]))
    types = {"topk_ids": "I", "w_gate_up": "W", "w_down": "W", "s_gate_up": "S", "s_down": "S",
             "z_gate_up": "Z", "z_down": "Z", "accumulator": "S"}
    inputs = [Input(name, types.get(name, "T")) for name in plugin.inputs]
    constraints = [("T", _FLOATS, ""), ("I", ["tensor(int32)", "tensor(int64)"], ""),
                   ("W", _FLOATS + ["tensor(uint8)"], ""), ("S", ["tensor(float)"], ""), ("Z", ["tensor(uint8)"], "")]
    option = OpSchema.FormalParameterOption.Single
    register(OpSchema(plugin.name, plugin.domain, 1, f"{plugin.domain}::{plugin.name} as emitted by moec",
                      inputs=[OpSchema.FormalParameter(i.name, i.type_str, "", param_option=option) for i in inputs],
                      outputs=[OpSchema.FormalParameter("output", "S", "")],  # fp32, aliases `accumulator`
                      type_constraints=constraints, attributes=attributes))

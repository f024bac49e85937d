"""Helpers to declare ONNX schemas for the non-standard ops targets emit, registered with onnx.defs.

onnxscript's tracer (used by torch.onnx's custom translation table) only builds nodes whose schema
onnx knows. Each target declares the schemas of its own ops next to their translations
(moec/targets/<name>/translations.py) with these helpers. Registration is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx.defs import OpSchema

FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


@dataclass(frozen=True)
class Input:
    name: str
    type_str: str = "T"
    optional: bool = False


def attr(name: str, kind: OpSchema.AttrType, default=None) -> OpSchema.Attribute:
    if default is None:
        return OpSchema.Attribute(name, kind, "", required=False)
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), "")


def schema(name, domain, inputs, attributes, type_constraints, outputs=("output",)) -> OpSchema:
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

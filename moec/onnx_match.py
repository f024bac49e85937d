"""Helpers for the passes that match and rewrite the exported ONNX graph (onnx_ir): rewrite_rsqrt and the
onnxruntime target's graph passes. Matching is structural and conservative: a helper answers None/False
whenever it cannot prove what is asked (an unknown constant, an unknown size)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import get_const_tensor

DEFAULT_DOMAINS = ("", "ai.onnx")


def producer(value: Optional[ir.Value], op_type: str) -> Optional[ir.Node]:
    """The node producing `value` when it is the default-domain `op_type`."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in DEFAULT_DOMAINS:
        return None
    return node


def const_array(value: Optional[ir.Value]) -> Optional[np.ndarray]:
    """`value`'s constant contents (an initializer or a Constant node), else None."""
    tensor = get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def const_ints(value: Optional[ir.Value]) -> Optional[list[int]]:
    array = const_array(value)
    return None if array is None or array.dtype.kind not in "iu" else [int(v) for v in array.reshape(-1)]


def const_scalar(value: Optional[ir.Value]) -> Optional[float]:
    array = const_array(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def same_dims(a, b) -> bool:
    """Dims known to be equal: equal ints, or the same named symbolic size (unknown sizes prove nothing)."""
    return len(a) == len(b) and all(
        x == y and (isinstance(x, int) or getattr(x, "value", None) is not None) for x, y in zip(a, b))


def take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere (graph outputs too), under old's name, shape and type."""
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name, shape, type_ = old.name, old.shape, old.type
    old.name = None  # names are unique in a graph: free it first
    new.name, new.shape, new.type = name, shape, type_

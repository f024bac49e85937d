"""Evaluate TensorRT-flavored ONNX in ONNX Runtime: replace each experts plugin node by its reference.

The artifact for `--target tensorrt` holds one plugin node per MoE layer, which only TensorRT (with
moec's plugin registered) can run. To check that artifact here, `substitute_plugins` rewrites a copy:
each plugin node becomes standard ONNX ops computing the plugin's contract exactly (packed codes
dequantized, every expert on every token, combined with the routing weights, added to the
accumulator), reading the node's own inputs and attributes. So the attributes and weight layouts
TensorRT will receive are what gets verified.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moec.targets.tensorrt.plugin_spec import PLUGIN


class _Builder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _activation(b: _Builder, u: str, activation: str) -> str:
    if activation == "silu":
        return b.op("Mul", [u, b.op("Sigmoid", [u])])
    if activation == "relu":
        return b.op("Relu", [u])
    if activation == "relu2":
        r = b.op("Relu", [u])
        return b.op("Mul", [r, r])
    if activation == "identity":
        return u
    if activation == "gelu":  # erf form
        inner = b.op("Erf", [b.op("Div", [u, b.const(math.sqrt(2.0))])])
        return b.op("Mul", [b.op("Mul", [u, b.const(0.5)]), b.op("Add", [inner, b.const(1.0)])])
    if activation == "gelu_tanh":
        cube = b.op("Mul", [b.op("Mul", [u, u]), u])
        inner = b.op("Add", [u, b.op("Mul", [cube, b.const(0.044715)])])
        t = b.op("Tanh", [b.op("Mul", [inner, b.const(math.sqrt(2.0 / math.pi))])])
        return b.op("Mul", [b.op("Mul", [u, b.const(0.5)]), b.op("Add", [t, b.const(1.0)])])
    raise ValueError(f"unknown plugin activation {activation!r}")


def _dequantize(b: _Builder, codes: str, scales: str, zero_points: str | None, bits: int, shape: tuple,
                group: int) -> str:
    """float [E, N, K] from the plugin's packed codes (4-bit: even column in the low nibble)."""
    e, n, k = shape
    c = codes
    if bits == 4:
        lo = b.op("BitwiseAnd", [c, b.const(15, np.uint8)])
        hi = b.op("BitShift", [c, b.const(4, np.uint8)], direction="RIGHT")
        last = b.const([-1], np.int64)
        c = b.op("Concat", [b.op("Unsqueeze", [lo, last]), b.op("Unsqueeze", [hi, last])], axis=-1)
    blocks = b.op("Reshape", [b.op("Cast", [c], to=TensorProto.FLOAT), b.const([e, n, k // group, group], np.int64)])
    last = b.const([-1], np.int64)
    zp = b.const(float(1 << (bits - 1))) if zero_points is None else b.op(
        "Unsqueeze", [b.op("Cast", [zero_points], to=TensorProto.FLOAT), last])
    w = b.op("Mul", [b.op("Sub", [blocks, zp]), b.op("Unsqueeze", [scales, last])])
    return b.op("Reshape", [w, b.const([e, n, k], np.int64)])


def _reference_subgraph(node: onnx.NodeProto, prefix: str) -> _Builder:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    act = attrs["activation"].decode() if isinstance(attrs["activation"], bytes) else attrs["activation"]
    e, inter, hsize = attrs["num_experts"], attrs["intermediate_size"], attrs["hidden_size"]
    gated, woi, has_bias = bool(attrs["gated"]), bool(attrs["weight_on_input"]), bool(attrs["has_bias"])
    x, ids, w, w1, w2, b1, b2, s1, z1, s2, z2, acc = list(node.input)
    if not has_bias:
        b1 = b2 = None
    b = _Builder(prefix)
    bits = attrs["quant_bits"]
    if bits:
        zps = (z1, z2) if attrs["has_zero_points"] else (None, None)
        rows = (2 if gated else 1) * inter
        w1 = _dequantize(b, w1, s1, zps[0], bits, (e, rows, hsize), attrs["group_size_gate_up"])
        w2 = _dequantize(b, w2, s2, zps[1], bits, (e, hsize, inter), attrs["group_size_down"])

    tokens = b.op("Gather", [b.op("Shape", [x]), b.const(0, np.int64)], axis=0)
    zeros_shape = b.op("Concat", [b.op("Unsqueeze", [tokens, b.const([0], np.int64)]), b.const([e], np.int64)], axis=0)
    zeros = b.op("ConstantOfShape", [zeros_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    ids64 = b.op("Cast", [ids], to=TensorProto.INT64)
    dense_w = b.op("ScatterElements", [zeros, ids64, w], axis=1)  # [T, E]
    selected = b.op("ScatterElements", [zeros, ids64, b.op("Add", [b.op("Mul", [w, b.const(0.0)]), b.const(1.0)])],
                    axis=1)

    if woi:
        xin = b.op("Einsum", [dense_w, x], equation="te,th->eth")
    else:
        xin = b.op("Expand", [b.op("Unsqueeze", [x, b.const([0], np.int64)]),
                              b.op("Concat", [b.const([e], np.int64), b.op("Shape", [x])], axis=0)])
    u = b.op("Einsum", [xin, w1], equation="eth,exh->etx")
    if b1:
        u = b.op("Add", [u, b.op("Unsqueeze", [b1, b.const([1], np.int64)])])
    if gated:
        gate = b.op("Slice", [u, b.const([0], np.int64), b.const([inter], np.int64), b.const([2], np.int64)])
        up = b.op("Slice", [u, b.const([inter], np.int64), b.const([2 * inter], np.int64), b.const([2], np.int64)])
        if act == "swiglu":
            limit = attrs["limit"]
            if limit > 0:
                gate = b.op("Min", [gate, b.const(limit)])
                up = b.op("Max", [b.op("Min", [up, b.const(limit)]), b.const(-limit)])
            sig = b.op("Sigmoid", [b.op("Mul", [gate, b.const(attrs["alpha"])])])
            h = b.op("Mul", [b.op("Mul", [gate, sig]), b.op("Add", [up, b.const(attrs["beta"])])])
        elif act == "swiglu_softcap":
            def softcap(t, cap):
                return b.op("Mul", [b.op("Tanh", [b.op("Div", [t, b.const(cap)])]), b.const(cap)])

            h = b.op("Mul", [b.op("Mul", [softcap(gate, attrs["alpha"]), b.op("Sigmoid", [gate])]),
                             softcap(up, attrs["limit"])])
        else:
            h = b.op("Mul", [_activation(b, gate, act), up])
    else:
        h = _activation(b, u, act)
    y = b.op("Einsum", [h, w2], equation="eti,ehi->eth")
    if b2:
        y = b.op("Add", [y, b.op("Unsqueeze", [b2, b.const([1], np.int64)])])
    combine = selected if woi else dense_w
    experts_out = b.op("Einsum", [combine, y], equation="te,eth->th")
    b.nodes.append(helper.make_node("Add", [acc, b.op("Cast", [experts_out], to=TensorProto.FLOAT)],
                                    [node.output[0]], name=f"{prefix}/accumulate"))
    return b


def substitute_plugins(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every moec experts plugin node replaced by its reference subgraph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_nodes, count = [], 0
    for i, node in enumerate(graph.node):
        if node.op_type == PLUGIN.name and node.domain == PLUGIN.domain:
            b = _reference_subgraph(node, f"moec_plugin_ref_{i}")
            new_nodes.extend(b.nodes)
            graph.initializer.extend(b.inits)
            count += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in out.opset_import if o.domain != PLUGIN.domain]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out, count

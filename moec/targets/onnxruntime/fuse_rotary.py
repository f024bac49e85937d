"""fuse_rotary: rotary position embeddings as ONNX Runtime's ``com.microsoft.RotaryEmbedding``.

Matches, in the exported ONNX graph (top level), the two ways transformers writes rotary embeddings
on a query or key ``x`` of shape ``[batch, heads, seq, head_dim]`` (heads and an even head_dim known):
  - rotate_half (Mixtral, Qwen3-MoE, OLMoE, Granite-MoE, ...):
    ``x * cos + concat(-x[..., h:], x[..., :h]) * sin`` with cos and sin ``[b, 1, seq, head_dim]``
    made by unsqueezing ``Cos``/``Sin`` of ``concat(freqs, freqs)`` (possibly times a constant scalar, a
    dtype cast): the two halves are the same values by construction, which is what makes the op exact;
  - halves (GPT-OSS): ``concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`` with ``x1, x2 = split(x)``
    and cos and sin ``[b, 1, seq, head_dim / 2]``.
Produces: one ``RotaryEmbedding(x, ids, cos_rows, sin_rows)`` node (interleaved=0) per match, in place of
  its 7-10 elementwise nodes. The cache rows are the model's own per-token cos/sin values reshaped to
  ``[b * seq, head_dim / 2]`` and ``ids[i, s] = i * seq + s`` (broadcast over the batch when the model's
  cos has batch 1), so the op multiplies by exactly the values the model computed, whatever its positions
  or rope scaling; those few nodes are built once per cos/sin and shared by every layer. ONNX Runtime's
  kernel agrees with the elementwise form to rounding (a fused multiply-add: < 1e-6 relative); the
  artifact is verified against eager PyTorch as always.
Refuses (leaves as it is): interleaved rotary (DeepSeek-V3's), partial rotary, cos/sin whose halves are
  not provably equal or that are not one row per token (seq and batch, or batch 1, as x's), unknown head
  counts or sizes, dtypes other than fp32/fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from moec.onnx_match import DEFAULT_DOMAINS, const_array, const_ints, producer, same_dims, take_over

NAME = "fuse_rotary"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass(frozen=True)
class _Match:
    """One rotary embedding: x rotated by cos/sin values of shape [b, seq, cache_width]."""

    root: ir.Node  # the node whose output is the rotated x
    x: ir.Value
    cos: ir.Value
    sin: ir.Value
    duplicated: bool  # cos/sin are [.., head_dim] with equal halves (else [.., head_dim / 2])


def _head_dim(x: ir.Value) -> Optional[int]:
    """x's head_dim when x is [batch, heads, seq, head_dim] with heads known and head_dim known and even."""
    if x.shape is None or len(x.shape) != 4 or x.dtype not in _FLOATS:
        return None
    heads, dim = x.shape[1], x.shape[3]
    if not isinstance(heads, int) or not isinstance(dim, int) or dim % 2:
        return None
    return dim


def _is_last_axis(axis: int, rank: int = 4) -> bool:
    return axis in (-1, rank - 1)


def _halves(first: ir.Value, second: ir.Value, dim: int) -> Optional[ir.Value]:
    """The x whose first and second halves on the last axis `first` and `second` are (Split or Slice)."""
    split = first.producer()
    if split is not None and split is second.producer() and split.op_type == "Split" and split.domain in DEFAULT_DOMAINS:
        axis = split.attributes.get_int("axis", 0)
        sizes = const_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        even = sizes == [dim // 2, dim // 2] or (sizes is None and split.attributes.get_int("num_outputs", 0) == 2)
        if (_is_last_axis(axis) and even and len(split.outputs) == 2 and split.outputs[0] is first
                and split.outputs[1] is second):
            return split.inputs[0]
        return None
    a, b = producer(first, "Slice"), producer(second, "Slice")
    if a is None or b is None or a.inputs[0] is not b.inputs[0]:
        return None

    def span(node: ir.Node) -> Optional[tuple[int, int]]:
        starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
        axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
        steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if not starts or not ends or len(starts) != 1 or axes is None or len(axes) != 1 or steps != [1]:
            return None
        return (starts[0], min(ends[0], dim)) if _is_last_axis(axes[0]) else None

    if span(a) == (0, dim // 2) and span(b) == (dim // 2, dim):
        return a.inputs[0]
    return None


def _unsqueezed(value: ir.Value) -> Optional[ir.Value]:
    """The [b, seq, w] tensor that `value` ([b, 1, seq, w]) unsqueezes at axis 1."""
    node = producer(value, "Unsqueeze")
    if node is None or const_ints(node.inputs[1]) != [1]:
        return None
    inner = node.inputs[0]
    return inner if inner.shape is not None and len(inner.shape) == 3 else None


def _per_token(cos: ir.Value, x: ir.Value) -> bool:
    """cos/sin ([b, seq, w]) hold one row per token of x ([batch, heads, seq, head_dim]): the same seq, and
    the same batch or 1 (broadcast), which is what the ids built from cos's shape index."""
    b, seq = cos.shape[0], cos.shape[1]
    return same_dims([seq], [x.shape[2]]) and (b == 1 or same_dims([b], [x.shape[0]]))


def _duplicated_halves(value: ir.Value) -> bool:
    """Whether `value` is provably cos or sin of concat(f, f) on the last axis (through scalar scales and casts)."""
    node = value.producer()
    while node is not None and node.domain in DEFAULT_DOMAINS:
        if node.op_type == "Cast":
            node = node.inputs[0].producer()
        elif node.op_type == "Mul":
            scalar = [i for i, v in enumerate(node.inputs) if (c := const_array(v)) is not None and c.size == 1]
            if len(scalar) != 1:
                return False
            node = node.inputs[1 - scalar[0]].producer()
        elif node.op_type in ("Cos", "Sin"):
            cat = producer(node.inputs[0], "Concat")
            return (cat is not None and len(cat.inputs) == 2 and cat.inputs[0] is cat.inputs[1]
                    and _is_last_axis(cat.attributes.get_int("axis", 0), 3))
        else:
            return False
    return False


def _mul_pair(node: Optional[ir.Node]) -> Optional[tuple[ir.Value, ir.Value]]:
    if node is None or node.op_type != "Mul" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
        return None
    return node.inputs[0], node.inputs[1]


def _match_rotate_half(add: ir.Node) -> Optional[_Match]:
    """x * cos + concat(-x2, x1) * sin."""
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS:
        return None
    for plain, rotated in ((0, 1), (1, 0)):
        p, r = _mul_pair(add.inputs[plain].producer()), _mul_pair(add.inputs[rotated].producer())
        if p is None or r is None:
            continue
        for cat_value, sin_value in ((r[0], r[1]), (r[1], r[0])):
            cat = producer(cat_value, "Concat")
            if cat is None or len(cat.inputs) != 2 or not _is_last_axis(cat.attributes.get_int("axis", 0)):
                continue
            neg = producer(cat.inputs[0], "Neg")
            if neg is None:
                continue
            for x, cos_value in ((p[0], p[1]), (p[1], p[0])):
                dim = _head_dim(x)
                if dim is None or _halves(cat.inputs[1], neg.inputs[0], dim) is not x:
                    continue
                cos, sin = _unsqueezed(cos_value), _unsqueezed(sin_value)
                if (cos is None or sin is None or cos.shape[2] != dim or sin.shape[2] != dim
                        or not _per_token(cos, x) or not _per_token(sin, x)
                        or not _duplicated_halves(cos) or not _duplicated_halves(sin)):
                    continue
                return _Match(add, x, cos, sin, duplicated=True)
    return None


def _match_halves(cat: ir.Node) -> Optional[_Match]:
    """concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), x1 and x2 the halves of x."""
    if cat.op_type != "Concat" or cat.domain not in DEFAULT_DOMAINS or len(cat.inputs) != 2:
        return None
    if not _is_last_axis(cat.attributes.get_int("axis", 0)):
        return None
    sub, add = producer(cat.inputs[0], "Sub"), producer(cat.inputs[1], "Add")
    if sub is None or add is None:
        return None
    m1, m2 = _mul_pair(sub.inputs[0].producer()), _mul_pair(sub.inputs[1].producer())
    if m1 is None or m2 is None:
        return None
    for x1, cos_value in ((m1[0], m1[1]), (m1[1], m1[0])):
        for x2, sin_value in ((m2[0], m2[1]), (m2[1], m2[0])):
            if x1.producer() is None or x1.producer() is not x2.producer():
                continue
            x = x1.producer().inputs[0]
            dim = _head_dim(x)
            if dim is None or _halves(x1, x2, dim) is not x:
                continue
            # the second half: x2 * cos + x1 * sin, either order
            want = {frozenset((x2, cos_value)), frozenset((x1, sin_value))}
            got = {frozenset(p) for p in (_mul_pair(add.inputs[0].producer()), _mul_pair(add.inputs[1].producer()))
                   if p is not None}
            if got != want:
                continue
            cos, sin = _unsqueezed(cos_value), _unsqueezed(sin_value)
            if (cos is None or sin is None or cos.shape[2] != dim // 2 or sin.shape[2] != dim // 2
                    or not _per_token(cos, x) or not _per_token(sin, x)):
                continue
            return _Match(cat, x, cos, sin, duplicated=False)
    return None


def _token_major(x: ir.Value) -> Optional[ir.Value]:
    """y when x = Transpose(y, perm=[0, 2, 1, 3]) with y [batch, seq, heads, head_dim]."""
    node = producer(x, "Transpose")
    if node is None or list(node.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    y = node.inputs[0]
    return y if y.shape is not None and len(y.shape) == 4 else None


def _flat(y: ir.Value, width: int) -> Optional[ir.Value]:
    """The [batch, seq, width] value y reshapes, if y is such a Reshape."""
    node = producer(y, "Reshape")
    if node is None:
        return None
    z = node.inputs[0]
    ok = z.shape is not None and len(z.shape) == 3 and z.shape[2] == width and same_dims(z.shape[:2], y.shape[:2])
    return z if ok else None


def _flattened_uses(rotated: ir.Value, width: int, graph: ir.Graph) -> list[ir.Value]:
    """The values made from `rotated` ([batch, heads, seq, head_dim]) by Transpose(perm=[0, 2, 1, 3]) then
    a Reshape to [batch, seq, width]: what attention reads, and exactly the 3-D rotary output."""
    found = []
    for use in list(rotated.uses()):
        node = use.node
        if (node.op_type != "Transpose" or node.domain not in DEFAULT_DOMAINS or node.graph is not graph
                or list(node.attributes.get_ints("perm", [])) != [0, 2, 1, 3]):
            continue
        for inner in list(node.outputs[0].uses()):
            out = inner.node.outputs[0]
            if (inner.node.op_type == "Reshape" and inner.node.domain in DEFAULT_DOMAINS and inner.idx == 0
                    and out.shape is not None and len(out.shape) == 3 and out.shape[2] == width
                    and same_dims(out.shape[:2], [rotated.shape[0], rotated.shape[2]])):
                found.append(out)
    return found


class _Tables:
    """Builds the new nodes (named fuse_rotary/N) and the RotaryEmbedding inputs derived from one cos/sin pair,
    those once and shared by every layer."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.made: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.count = 0
        self.consts: dict[tuple, ir.Value] = {}

    def _name(self) -> str:
        self.count += 1
        return f"{NAME}/{self.count}"

    def const(self, array: np.ndarray, before: ir.Node) -> ir.Value:
        """A Constant node (one per value: before the first node that asks for it)."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in self.consts:
            return self.consts[key]
        name = self._name()
        node = ir.node("Constant", inputs=[], attributes={"value": ir.tensor(array, name=name)}, name=name)
        self.graph.insert_before(before, node)
        node.outputs[0].name = name
        self.consts[key] = node.outputs[0]
        return node.outputs[0]

    def node(self, op: str, inputs: list, before: ir.Node, domain: str = "", **attributes) -> ir.Value:
        name = self._name()
        node = ir.node(op, inputs=inputs, attributes=attributes, domain=domain, name=name)
        self.graph.insert_before(before, node)
        node.outputs[0].name = name
        return node.outputs[0]

    def rows_and_ids(self, match: _Match, dim: int, rotated_input: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(ids, cos rows, sin rows) for `match`; `rotated_input` is what the op rotates (its batch is x's)."""
        key = (id(match.cos), id(match.sin))
        if key in self.made:
            return self.made[key]
        at = match.root  # the first match of this cos/sin in graph order: all it reads exists before it
        half = dim // 2
        flat = self.const(np.array([-1, half], np.int64), at)
        rows = []
        for value in (match.cos, match.sin):
            if match.duplicated:  # the first half; the second is the same values
                value = self.node("Slice", [value, self.const(np.array([0], np.int64), at),
                                            self.const(np.array([half], np.int64), at),
                                            self.const(np.array([2], np.int64), at)], at)
            rows.append(self.node("Reshape", [value, flat], at))
        # ids[i, s] = i * seq + s over the cos's [b, seq]; expanded to x's batch when b is 1
        b_seq = self.node("Shape", [match.cos], at, start=0, end=2)
        count = self.node("ReduceProd", [b_seq], at, keepdims=0)
        ids = self.node("Range", [self.const(np.array(0, np.int64), at), count, self.const(np.array(1, np.int64), at)],
                        at)
        ids = self.node("Reshape", [ids, b_seq], at)
        batch = self.node("Shape", [rotated_input], at, start=0, end=1)
        seq = self.node("Shape", [match.cos], at, start=1, end=2)
        ids = self.node("Expand", [ids, self.node("Concat", [batch, seq], at, axis=0)], at)
        self.made[key] = (ids, rows[0], rows[1])
        return self.made[key]


def fuse_rotary(model: ir.Model) -> int:
    """Rewrite `model`'s graph in place; how many rotary embeddings became RotaryEmbedding nodes."""
    graph = model.graph
    matches = []
    for node in graph:
        match = _match_rotate_half(node) or _match_halves(node)
        if match is not None:
            matches.append(match)
    if not matches:
        return 0
    tables = _Tables(graph)
    for match in matches:
        dim = _head_dim(match.x)
        heads = match.x.shape[1]
        token_major = _token_major(match.x)
        if token_major is None:  # rotate x as it is, [batch, heads, seq, head_dim]
            ids, cos_rows, sin_rows = tables.rows_and_ids(match, dim, match.x)
            rotated = tables.node("RotaryEmbedding", [match.x, ids, cos_rows, sin_rows], match.root,
                                  domain="com.microsoft", interleaved=0, num_heads=heads)
            take_over(match.root.outputs[0], rotated)
            continue
        # x is [batch, seq, heads * head_dim] transposed for attention: rotate it before the transpose,
        # so the attention input that transposes it back needs no transposes at all
        flat = _flat(token_major, heads * dim)
        if flat is None:
            flat = tables.node("Reshape", [token_major, tables.const(np.array([0, 0, heads * dim], np.int64),
                                                                     match.root)], match.root)
            flat.shape, flat.type = ir.Shape([*token_major.shape[:2], heads * dim]), token_major.type
        ids, cos_rows, sin_rows = tables.rows_and_ids(match, dim, flat)
        rotated = tables.node("RotaryEmbedding", [flat, ids, cos_rows, sin_rows], match.root, domain="com.microsoft",
                              interleaved=0, num_heads=heads)
        rotated.shape, rotated.type = flat.shape, flat.type
        old = match.root.outputs[0]
        for flat_use in _flattened_uses(old, heads * dim, graph):
            if flat_use not in graph.outputs:
                flat_use.replace_all_uses_with(rotated)
            elif rotated not in graph.outputs:  # one graph output can take the rotated value's place
                take_over(flat_use, rotated)
        if list(old.uses()) or old in graph.outputs:  # other uses see the [batch, heads, seq, head_dim] form
            split = tables.node("Reshape", [rotated, tables.const(np.array([0, 0, heads, dim], np.int64),
                                                                  match.root)], match.root)
            take_over(old, tables.node("Transpose", [split], match.root, perm=[0, 2, 1, 3]))
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault("com.microsoft", 1)
    return len(matches)

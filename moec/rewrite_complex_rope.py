"""rewrite_complex_rope: complex-valued rotary embeddings as the same arithmetic on (real, imaginary) pairs.

Matches: in the torch.export'ed program, the nodes whose value is complex. Some attention layers (transformers'
  DeepSeek-V2 and Llama 4) rotate queries and keys as complex numbers: ``torch.polar(ones, angles)`` builds the
  rotation in the rotary module, the decoder layers pass it on (``.to(device)``, ``unsqueeze``), and
  ``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis`` then ``view_as_real`` rotates. torch.onnx translates
  few complex ops (``unsqueeze`` of a complex tensor is the first it stops at), so such a model does not convert.
Produces: every complex tensor as a real one of the matching precision with a trailing dim of 2 (real,
  imaginary) -- exactly ``torch.view_as_real``'s layout, so ``view_as_complex`` and ``view_as_real`` become
  the identity. ``polar(r, t)`` -> ``stack([r * cos(t), r * sin(t)], -1)``; a complex product ->
  ``stack([ac - bd, ad + bc], -1)`` (a real operand scales both parts); layout ops (unsqueeze, squeeze, view,
  reshape, expand, slice, select, transpose, permute) keep their complex dims, which index the same in the
  pairs; same-dtype ``to``/``clone``/``alias`` are the identity. These are the float operations eager's
  complex kernels do, so values agree to rounding; the artifact is verified against eager PyTorch as always.
Refuses: the whole program (it is left as it was, and torch.onnx then names the op it cannot translate) when a
  complex value is a graph input, parameter, buffer, constant or output, comes from or goes to an op not
  listed above, or mixes precisions (e.g. complex64 times a float64 tensor).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional

import torch
from torch import fx

NAME = "rewrite_complex_rope"

aten = torch.ops.aten

REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}

# complex -> complex ops whose pairs form only moves the dims they name (or appends the pair dim to sizes)
_DIM = {aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor, aten.transpose.int,
        aten.permute.default}
_SHAPE = {aten.view.default, aten.reshape.default, aten.expand.default}
_SAME = {aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype, aten.to.dtype_layout,
         aten.to.device, aten._to_copy.default}  # identity when the dtype stays (checked below)
_MUL = {aten.mul.Tensor}
_MAKE = {aten.polar.default, aten.view_as_complex.default}
_TO_REAL = {aten.view_as_real.default}
_CHECK = {aten._assert_tensor_metadata.default}  # asserts the complex dtype; dropped with the complex value
_HANDLED = _DIM | _SHAPE | _SAME | _MUL | _MAKE | _TO_REAL | _CHECK


def rewrite_complex_rope(program: torch.export.ExportedProgram) -> int:
    """Rewrite `program`'s graph in place; how many complex-valued nodes it replaced (0: none, or refused)."""
    graph = program.graph_module.graph
    complex_nodes = [n for n in graph.nodes if _is_complex(n)]
    if not complex_nodes or why_not(graph) is not None:
        return 0
    real: dict[fx.Node, fx.Node] = {}  # complex node -> its pairs
    done = []
    for node in list(graph.nodes):
        if node.op != "call_function" or not (_is_complex(node) or any(_is_complex(a) for a in node.all_input_nodes)):
            continue
        with graph.inserting_before(node):
            if node.target in _CHECK:
                pass
            elif node.target in _TO_REAL:
                node.replace_all_uses_with(real[node.args[0]])
            else:
                real[node] = _pairs(graph, node, real)
        done.append(node)
    for node in reversed(done):  # users first
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()
    return len(complex_nodes)


def why_not(graph: fx.Graph) -> Optional[str]:
    """Why the graph's complex values cannot all be rewritten; None if they can."""
    for node in graph.nodes:
        ins = [a for a in node.all_input_nodes if _is_complex(a)]
        if not _is_complex(node) and not ins:
            continue
        where = f"('{node.name}')"
        if node.op != "call_function":
            return f"a complex value at {node.op} {where}"
        t = node.target
        if t not in _HANDLED:
            return f"'{t}' on complex values {where}"
        if t in _TO_REAL or t in _CHECK or t is aten.view_as_complex.default:
            continue
        dtype = node.meta["val"].dtype  # complex: every op left produces one
        if t is aten.polar.default:
            if any(_dtype(a) != REAL[dtype] for a in node.args[:2]):
                return f"polar of another precision {where}"
        elif t in _MUL:
            for x in node.args[:2]:
                if _dtype(x) not in (dtype, REAL[dtype]) and not _real_scalar(x):
                    what = _dtype(x) or f"{type(x).__name__} {x!r}"
                    return f"a complex product with {what} {where}"
        else:  # one complex tensor in, the rest sizes and indices
            x = node.args[0]
            if not _is_complex(x) or any(isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes
                                         if a is not x):
                return f"'{t}' mixing complex and other tensors {where}"
            if t in _SAME and dtype != x.meta["val"].dtype:
                return f"'{t}' changing the complex precision {where}"
    return None


def _pairs(graph: fx.Graph, node: fx.Node, real: dict) -> fx.Node:
    """The pairs form of complex `node`, built before it from its inputs' pairs."""
    t = node.target
    args = node.args
    if t is aten.view_as_complex.default:
        return args[0]  # already [..., 2]
    if t in _SAME:
        return real[args[0]]
    if t is aten.polar.default:
        r, angle = args[:2]
        return _stack(graph, node, [_op(graph, node, aten.mul.Tensor, r, _op(graph, node, aten.cos.default, angle)),
                                    _op(graph, node, aten.mul.Tensor, r, _op(graph, node, aten.sin.default, angle))])
    if t in _MUL:
        a, b = args[:2]
        if not _is_complex(a):  # complex operand first
            a, b = b, a
        if _is_complex(b):
            ar, ai = _part(graph, node, real[a], 0), _part(graph, node, real[a], 1)
            br, bi = _part(graph, node, real[b], 0), _part(graph, node, real[b], 1)
            mul = aten.mul.Tensor
            re = _op(graph, node, aten.sub.Tensor, _op(graph, node, mul, ar, br), _op(graph, node, mul, ai, bi))
            im = _op(graph, node, aten.add.Tensor, _op(graph, node, mul, ar, bi), _op(graph, node, mul, ai, br))
            return _stack(graph, node, [re, im])
        if not _real_scalar(b):  # a real tensor scales both parts: give it the pair dim to broadcast over
            b = _op(graph, node, aten.unsqueeze.default, b, -1)
        return _op(graph, node, aten.mul.Tensor, real[a], b)
    # layout ops: a dim counted from the front means the same dim in the pairs; from the end, it is one further
    x, rest, kwargs = args[0], list(args[1:]), dict(node.kwargs)
    rank = x.meta["val"].dim()
    if t is aten.unsqueeze.default:
        rest[0] %= rank + 1
    elif t in (aten.squeeze.dim, aten.select.int):
        rest[0] %= rank
    elif t is aten.transpose.int:
        rest[0], rest[1] = rest[0] % rank, rest[1] % rank
    elif t is aten.slice.Tensor:  # slice(x, dim=0, start, end, step)
        if rest:
            rest[0] %= rank
        elif "dim" in kwargs:
            kwargs["dim"] %= rank
    elif t is aten.permute.default:
        rest[0] = [d % rank for d in rest[0]] + [rank]
    elif t in _SHAPE:  # view / reshape / expand sizes get the pair dim
        rest[0] = list(rest[0]) + [2]
    else:
        raise AssertionError(f"unhandled complex op {t}")  # why_not admits only the ops above
    return _op(graph, node, t, real[x], *rest, **kwargs)


def _op(graph: fx.Graph, like: fx.Node, target, *args, **kwargs) -> fx.Node:
    """A call_function node with `like`'s source metadata (module path, stack trace) and a fake value."""
    node = graph.call_function(target, args, kwargs)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    vals = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
    with _fake_mode(like):
        node.meta["val"] = target(*vals[0], **vals[1])
    return node


def _part(graph: fx.Graph, like: fx.Node, pairs: fx.Node, index: int) -> fx.Node:
    return _op(graph, like, aten.select.int, pairs, -1, index)


def _stack(graph: fx.Graph, like: fx.Node, parts: list) -> fx.Node:
    return _op(graph, like, aten.stack.default, parts, -1)


def _fake_mode(node: fx.Node):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([node.meta["val"]]) or contextlib.nullcontext()


def _real_scalar(x) -> bool:
    """A real number, as a constant or as a symbolic one computed in the graph."""
    val = x.meta.get("val") if isinstance(x, fx.Node) else x
    return isinstance(val, (numbers.Real, torch.SymInt, torch.SymFloat, torch.SymBool))


def _is_complex(x) -> bool:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_complex


def _dtype(x) -> Optional[torch.dtype]:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None

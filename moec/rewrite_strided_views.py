"""rewrite_strided_views: copy a non-contiguous tensor to contiguous memory before a view of it.

Matches: in the torch.export'ed program, ``aten.view`` / ``aten.reshape`` / ``aten._unsafe_view`` nodes whose
  input's recorded strides are not contiguous. With symbolic sizes torch.onnx's decomposition step re-traces
  a reshape of such a tensor (an attention output transposed back, [B, S, heads, d] with the heads' stride
  outermost) as a plain view, and fake tensors then refuse it ("Cannot view a tensor with shape ... and
  strides ..."): transformers' Inkling and Doge attention stop there.
Produces: ``aten.clone(x, memory_format=contiguous)`` between the input and the view. ONNX tensors have no
  strides, so the copy is an Identity in the artifact and the values are unchanged.
Refuses: nothing. It is applied only when a conversion failed that way (export_onnx.to_onnx retries once),
  so programs that convert as they are stay exactly as they were.
"""

from __future__ import annotations

import torch

NAME = "rewrite_strided_views"

_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def is_strided_view_error(exc: BaseException) -> bool:
    """Whether a conversion failed on a view of non-contiguous memory (anywhere in its causes)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "Cannot view a tensor with shape" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def rewrite_strided_views(program: torch.export.ExportedProgram) -> int:
    """Rewrite `program`'s graph in place; how many views now read a contiguous copy."""
    graph = program.graph_module.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS:
            continue
        src = node.args[0]
        val = getattr(src, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor) or _contiguous(val):
            continue
        with graph.inserting_before(node):
            copy = graph.call_function(torch.ops.aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
        copy.meta = {**src.meta, "val": val.clone(memory_format=torch.contiguous_format)}
        node.replace_input_with(src, copy)
        done += 1
    if done:
        program.graph_module.recompile()
    return done


def _contiguous(val: torch.Tensor) -> bool:
    try:
        return bool(val.is_contiguous())
    except Exception:  # a symbolic stride torch can't decide: copy (always correct)
        return False

"""Capture with torch.export and emit ONNX through torch.onnx's dynamo exporter.

A target's ops get the target's translations (`Target.translations()`: ``moec::ort_moe`` ->
``com.microsoft.MoE`` ...); everything else goes through torch.onnx's standard table. An op without a
translation becomes an UnsupportedOpError naming the op and the module it came from. Complex-valued ops
(rotary embeddings written with complex numbers) are first rewritten as real pairs (moec/rewrite_complex_rope.py).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from moec import ops  # noqa: F401  (registers torch.ops.moec.*)
from moec.errors import CaptureError, UnsupportedOpError
from moec.rewrite_complex_rope import NAME as REWRITE_COMPLEX_ROPE, rewrite_complex_rope, why_not
from moec.rewrite_selective_scan import NAME as REWRITE_SELECTIVE_SCAN, selective_scan_as_scan_op

# torch.onnx logs one line per missing optional library (torchvision ...); not our user's concern.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

# ONNX Runtime 1.31 rejects IR version 14 models; 10 with opset 18 is what it runs everywhere.
IR_VERSION = 10
OPSET = 18


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    strict: bool
    notes: list[str] = field(default_factory=list)


def capture(module: nn.Module, args: tuple, dynamic_shapes: Any) -> Captured:
    """torch.export, non-strict, with Mamba's selective scan (a Python loop over seq, which torch.export would
    unroll to the example's length) as one scan op (moec.rewrite_selective_scan)."""
    with selective_scan_as_scan_op(module) as scans:
        captured = _capture(module, args, dynamic_shapes)
    if scans:
        captured.notes.append(f"{REWRITE_SELECTIVE_SCAN}: the selective scan of {', '.join(scans)} captured as "
                              "one scan op (ONNX Scan), not as a loop unrolled to the example's seq")
    return captured


def _capture(module: nn.Module, args: tuple, dynamic_shapes: Any) -> Captured:
    """torch.export, non-strict (HF models rely on Python features strict mode rejects).

    A model whose guards on a named dynamic dim torch.export cannot prove over the dim's whole range
    ("Constraints violated", e.g. chunked linear attention padding seq to a multiple of 64) is captured
    again with the same ranges as Dim.DYNAMIC hints, which keep those guards as run-time checks; the
    dims keep their names, the artifact is verified at a second shape as always, and a note says so."""
    dynamic_shapes = _for_signature(module, dynamic_shapes)
    try:
        return Captured(_export(module, args, dynamic_shapes), strict=False)
    except Exception as first:
        hinted = _as_hints(dynamic_shapes) if "Constraints violated" in str(first) else None
        if hinted is not None:
            try:
                note = ("torch.export could not prove the model's guards on its dynamic dims over their whole "
                        "range; captured with Dim.DYNAMIC hints of the same ranges (the guards are run-time "
                        "checks): " + " ".join(str(first).split())[:300])
                return Captured(_export(module, args, hinted), strict=False, notes=[note])
            except Exception:  # report the first failure: it names the dim and the guard
                pass
        raise _capture_error(module, first) from first


def _capture_error(module: nn.Module, exc: BaseException) -> CaptureError:
    """What stopped torch.export, where (the innermost module running), and the likely cause."""
    msg = str(exc).strip().splitlines()
    head = " ".join(msg[:6])[:800]
    where = failing_module(module, exc)
    text = str(exc)
    if "data-dependent" in text or "DataDependent" in type(exc).__name__:
        why = ("its control flow or shapes depend on tensor values (e.g. a loop over the experts that received "
               "tokens, or slices of data-dependent size); moec can capture such a MoE layer only once it is "
               "fused, so see the report's moe_layers for why this one was not, or rewrite it with fixed-size "
               "ops (masks, einsum)")
    elif "Constraints violated" in text:
        why = ("the model specializes a dimension given as dynamic; compile with --static (or give narrower "
               "dynamic_shapes)")
    else:
        why = ("common causes: data-dependent Python control flow in a layer moec did not fuse, or dynamic "
               "dimensions the model specializes (try --static)")
    return CaptureError(
        f"torch.export could not capture the model{where}: {type(exc).__name__}: {head}. This happens because "
        f"{why}."
    )


def _export(module: nn.Module, args: tuple, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def _as_hints(spec: Any) -> Any:
    """The same dynamic_shapes with every named Dim replaced by Dim.DYNAMIC of its range; None if none."""
    found = []

    def walk(x):
        if isinstance(x, torch.export.dynamic_shapes.Dim):
            found.append(x)
            return torch.export.Dim.DYNAMIC(min=x.min, max=x.max)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    out = walk(spec)
    return out if found else None


def failing_module(root: nn.Module, exc: BaseException) -> str:
    """' in module PATH (Class), file:line `source`' for the innermost of root's modules whose forward was
    running when `exc` was raised (its traceback, and the exceptions it was raised from); '' if none."""
    import linecache

    paths = {id(m): p for p, m in root.named_modules()}
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            me = tb.tb_frame.f_locals.get("self")
            if isinstance(me, nn.Module) and id(me) in paths and paths[id(me)]:
                code = tb.tb_frame.f_code
                line = linecache.getline(code.co_filename, tb.tb_lineno).strip()
                found = (paths[id(me)], type(me).__name__, code.co_filename, tb.tb_lineno, line)
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    if found is None:
        return ""
    path, cls, filename, lineno, line = found
    return f" in module '{path}' ({cls}), {os.path.basename(filename)}:{lineno} `{line[:120]}`"


def _for_signature(module: nn.Module, dynamic_shapes: Any) -> Any:
    """A forward(*args) (torch.export.unflatten's modules, --dtype's KeepFloatIO wrapper) takes dynamic shapes as
    one tuple; shapes given by argument name are put in the order of the wrapped model's forward."""
    import inspect

    if dynamic_shapes is None:
        return dynamic_shapes
    params = list(inspect.signature(module.forward).parameters.values())
    if not (params and params[0].kind is inspect.Parameter.VAR_POSITIONAL):
        return dynamic_shapes
    if isinstance(dynamic_shapes, dict):
        inner = getattr(module, "model", None)
        names = list(inspect.signature(inner.forward).parameters) if isinstance(inner, nn.Module) else []
        order = [n for n in names if n in dynamic_shapes] or list(dynamic_shapes)
        return (tuple(dynamic_shapes[n] for n in order),)
    return (tuple(dynamic_shapes),)


def to_onnx(captured: Captured, input_names: list[str], output_names: list[str], dynamic_shapes: Any = None,
            translations: Mapping[Callable, Callable] | None = None):
    """Returns torch.onnx's ONNXProgram (an onnx_ir model whose weights still alias torch's).

    Symbolic dims are renamed from torch's internal names (s72) to the user's Dim names
    (batch, seq) so that the artifact's inputs say what they are.
    """
    ep = captured.program
    # torch.onnx translates few complex ops; complex rotary embeddings (DeepSeek-V2, Llama 4) go as real pairs
    rewritten = rewrite_complex_rope(ep)
    if rewritten:
        captured.notes.append(f"{REWRITE_COMPLEX_ROPE}: {rewritten} complex-valued ops (rotary embeddings) "
                              "computed on (real, imaginary) pairs, which ONNX can express")
    try:
        # no_grad as at capture: with autograd on, torch.onnx's decomposition re-traces some ops through their
        # training path -- a reshape of transposed attention output becomes a view it then refuses (Inkling,
        # Doge), and the selective scan's scan fails on a symbolic batch
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, (), dynamo=True, custom_translation_table=dict(translations or {}),
                input_names=input_names or None, output_names=output_names or None,
                opset_version=OPSET, optimize=False, verbose=False,
            )
    except Exception as exc:
        err = _explain_conversion_error(exc, ep)
        try:
            refused = why_not(ep.graph)
        except Exception:  # never let the explanation hide the conversion error itself
            refused = None
        if refused:  # say why the complex values were left as they were
            err = UnsupportedOpError(f"{err} ({REWRITE_COMPLEX_ROPE} left the complex values as they were: {refused})")
        raise err from exc
    program.model.ir_version = IR_VERSION
    rename_symbolic_dims(program, dim_names(ep, dynamic_shapes))
    return program


def dim_names(ep: torch.export.ExportedProgram, dynamic_shapes: Any) -> dict[str, str]:
    """torch symbol (e.g. 's72') -> the Dim name the user gave for it."""
    if not dynamic_shapes:
        return {}
    specs = list(dynamic_shapes.values()) if isinstance(dynamic_shapes, dict) else list(dynamic_shapes)
    user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    mapping: dict[str, str] = {}
    for spec, dims in zip(user, specs):
        val = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(dims, dict) or val is None:
            continue
        for axis, dim in dims.items():
            sym = val.shape[axis]
            name = getattr(dim, "__name__", None)
            if isinstance(sym, torch.SymInt) and name and str(sym).isidentifier():
                mapping.setdefault(str(sym), name)
    return mapping


def rename_symbolic_dims(program, mapping: dict[str, str]) -> None:
    import onnx_ir as ir

    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")

    def fix(value) -> None:
        shape = value.shape
        if shape is None:
            return
        dims = []
        changed = False
        for d in shape.dims:
            if isinstance(d, ir.SymbolicDim) and d.value is not None:
                new = pattern.sub(lambda m: mapping[m.group(1)], d.value)
                changed |= new != d.value
                dims.append(ir.SymbolicDim(new))
            else:
                dims.append(d)
        if changed:
            value.shape = ir.Shape(dims)

    graph = program.model.graph
    for v in list(graph.inputs) + list(graph.outputs):
        fix(v)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            fix(v)


_NODE_RE = re.compile(r"Error when translating node %(\w+)")
_NO_FUNCTION_RE = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")


def _explain_conversion_error(exc: Exception, ep: torch.export.ExportedProgram) -> Exception:
    text = "".join(str(e) for e in _chain(exc))
    m = _NODE_RE.search(text)
    if m:
        node = next((n for n in ep.graph.nodes if n.name == m.group(1)), None)
        if node is not None:
            target = str(node.target)
            path = module_path(node)
            cause = _root_cause(exc)
            return UnsupportedOpError(
                f"op '{target}' (from module '{path}') has no ONNX translation: {cause}. "
                "Rewrite that module to use ONNX-expressible ops, keep it out of the exported graph, "
                "or register a translation for the op (torch.onnx custom_translation_table)."
            )
    m = _NO_FUNCTION_RE.search(text)
    if m:
        # The failing node lives in torch.onnx's decomposed copy of the graph; find where it came
        # from in ours by the op's base name (aten.special_bessel_j0 decomposes to prims.bessel_j0).
        op = f"{m.group(1)}.{m.group(2)}"
        base = m.group(1).rsplit(".", 1)[-1].lstrip("_")
        node = next((n for n in ep.graph.nodes if n.op == "call_function" and base in str(n.target)), None)
        where = f"from module '{module_path(node)}', op '{node.target}' in the captured graph" if node else "module unknown"
        return UnsupportedOpError(
            f"op '{op}' ({where}) has no ONNX translation. Rewrite that module with ONNX-expressible ops, "
            "keep it out of the exported graph, or register a translation for the op "
            "(torch.onnx custom_translation_table)."
        )
    return UnsupportedOpError(f"ONNX conversion failed: {str(_root_cause(exc))[:400]}")


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path, cls = list(stack.values())[-1]
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    path = re.sub(r"L\['self'\]\.?", "", str(path)) or "<root>"
    return f"{path} ({cls_name})"


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _root_cause(exc: BaseException) -> str:
    last = exc
    for e in _chain(exc):
        last = e
    return f"{type(last).__name__}: {str(last).strip().splitlines()[0][:300] if str(last).strip() else ''}"


def weight_bytes(program) -> int:
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def save_onnx(program, path: str, external_threshold_bytes: int = 256 * 1024 * 1024,
              shard_bytes: int | None = None, log: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Write model.onnx; weights go to external data once they are large (never a 2 GB protobuf), or
    whenever `shard_bytes` is given: files of at most that size, one layer never split
    (moec/external_data.py). Small models without `shard_bytes` keep their weights inline."""
    from moec.external_data import DEFAULT_SHARD_BYTES, save_sharded

    if shard_bytes is None and weight_bytes(program) < external_threshold_bytes:
        program.save(path, external_data=False)
        return [path]
    return save_sharded(program.model, path, shard_bytes or DEFAULT_SHARD_BYTES, log)

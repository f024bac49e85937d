"""plan_exported: an activation-memory plan read from a torch.export program's own shapes, no weights, no ONNX.

An analysis (rewrites nothing) for `moec plan`, where the model exists only on the meta device: every FX node
of an ExportedProgram carries a FakeTensor whose sizes are sympy expressions of the input dims, so sizes
need no probe runs, and planning costs memory for the graph, not for the model.

Matches: an ExportedProgram whose user inputs have named dynamic dims (`dim_names`: torch symbol -> name, as
  moec.export_onnx.dim_names reads them); ops that produce tensors or tuples of them.
Produces: a plan_memory.MemoryPlan, the same structure (and packing, tables and fit checks) as the ONNX
  planner's: each tensor's size fitted exactly on the monomials of the dims up to degree 3; liveness over
  the node order; view-like ops (view, reshape, (un)squeeze, flatten, alias) alias their input as ONNX
  Runtime's Reshape/Squeeze/Unsqueeze do; inputs, parameters, buffers and constants are not in the arena
  (weights are counted by dtype); the fused expert ops' scratch as the ONNX planner counts it (one fc1 row
  and one fc2 row per routed token-slot, fp32).
  It plans the graph torch.export captured, which the ONNX graph follows op for op except where the
  converter decomposes or folds (tests bound the difference on the zoo).
Refuses (MemoryPlanError): a dynamic dim with no value in a profile. Sizes that are no polynomial of
  degree <= 3 in the dims over the profiles (checked against the exact expression at every profile) are
  planned from their exact expression; sizes that depend on data (an unfused layer's token selection) are
  left out. Both with a note.
"""

from __future__ import annotations

import operator
from typing import Optional

import numpy as np
import sympy
import torch

from moec.analysis.plan_memory import MemoryPlan, MemoryPlanError, TensorLife, _basis, _expr, _fit_coef, _pack

VIEW_OPS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "flatten", "alias", "detach", "view_as"}
# fused expert ops: (argument holding the hidden states [T, H], how to read k, argument holding fc1 [E, rows, H])
EXPERT_OPS = {"moec::experts": (0, ("shape", 1), 3), "moec::ort_moe": (0, ("arg", 6), 2)}


def plan_exported(ep: "torch.export.ExportedProgram", dim_names: dict[str, str],
                  profiles: dict[str, dict[str, int]], derived: Optional[dict[str, tuple[str, ...]]] = None,
                  alignment: int = 64) -> MemoryPlan:
    derived = derived or {}
    graph = ep.graph
    sig = ep.graph_signature
    weights_names = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(
        getattr(sig, "inputs_to_lifted_tensor_constants", {}))
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}

    # a derived dim (total = past + seq) is written in terms of its parts
    dims = sorted({d for d in dim_names.values() if d not in derived})
    for pname, p in profiles.items():
        missing = [d for d in dims if d not in p]
        if missing:
            raise MemoryPlanError(f"profile '{pname}' gives no value for dynamic dim(s) {', '.join(missing)}; "
                                  "every dynamic dim needs a bounded value in every profile.")
    syms = {d: sympy.Symbol(d, positive=True, integer=True) for d in set(dim_names.values()) | set(dims)}
    for d, parts in derived.items():
        missing = [p for p in parts if p not in syms] if d in dim_names.values() else []
        if missing:
            raise MemoryPlanError(f"dim '{d}' is the sum of {', '.join(parts)}, but {', '.join(missing)} is no "
                                  "input's dim; the plan can't express it.")
    by_name = {s: (sum((syms[p] for p in derived[d]), sympy.Integer(0)) if d in derived else syms[d])
               for s, d in dim_names.items()}
    basis = _basis(dims)
    rng = np.random.default_rng(0)
    points = [{d: int(v) for d, v in zip(dims, rng.integers(2, 17, size=len(dims)))} for _ in range(len(basis) + 2)]
    fitted: dict[sympy.Expr, tuple[Optional[np.ndarray], sympy.Expr]] = {}
    unbacked: list[str] = []  # tensors whose size depends on data (an unfused layer's nonzero), not on dims
    inexact: list[str] = []  # sizes that are no polynomial (chunk padding's Mod): kept as exact expressions

    def coef_of(expr: sympy.Expr, what: str) -> Optional[tuple[Optional[np.ndarray], sympy.Expr]]:
        """(integer coefficients on `basis`, or None when the size is no polynomial; its exact expression)."""
        if expr not in fitted:
            e = sympy.sympify(expr)
            e = e.xreplace({s: by_name[str(s)] for s in e.free_symbols if str(s) in by_name})
            if not e.free_symbols <= set(syms.values()):
                unbacked.append(what)
                return None
            samples = [(p, int(e.subs({syms[d]: v for d, v in p.items()}))) for p in points]
            coef = _fit_coef(samples, basis)
            # the fit is checked against the exact size at every profile too: a Min/Max/Mod (a sliding
            # window, chunk padding) that looks polynomial at the small probe points may not be at 4096
            for p in profiles.values():
                at = {d: int(p[d]) for d in dims}
                exact = int(e.subs({syms[d]: v for d, v in at.items()}))
                if coef is not None and exact != int(sum(int(c) * int(np.prod([at[t] for t in term]))
                                                         for c, term in zip(coef, basis))):
                    coef = None
            if coef is None:
                inexact.append(what)
            fitted[expr] = (coef, e if coef is None else _expr(coef, dims, basis))
        return fitted[expr]

    base: dict[str, str] = {}  # alias -> owning tensor
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    producer: dict[str, str] = {}
    sizes: dict[str, np.ndarray] = {}
    per_node_ws: list[tuple] = []
    nodes = [n for n in graph.nodes if n.op in ("call_function", "output")]
    for i, n in enumerate(nodes):
        for inp in n.all_input_nodes:
            owner = base.get(inp.name, inp.name)
            if owner in born:
                last[owner] = len(nodes) if n.op == "output" else max(last[owner], i)
        if n.op == "output":
            continue
        val = n.meta.get("val")
        op = _op_name(n)
        if n.target is operator.getitem:  # one output of a multi-output op: born with its producer
            src = n.args[0]
            coef = coef_of(_bytes(val), n.name) if isinstance(val, torch.Tensor) and src.op == "call_function" else None
            if coef is not None:
                sizes[n.name] = coef
                born[n.name], last[n.name], producer[n.name] = born.get(f"{src.name}#", i), i, _short(_op_name(src))
            continue
        if isinstance(val, (tuple, list)):
            born[f"{n.name}#"] = i  # marks where its getitem users are born; not a tensor of its own
            continue
        if not isinstance(val, torch.Tensor):
            continue
        first = n.all_input_nodes[0] if n.all_input_nodes else None
        if op.split("::")[-1].split(".")[0] in VIEW_OPS and first is not None and (
                base.get(first.name, first.name) in born or first.name in placeholders):
            if first.name in placeholders:  # a view of an input or weight: not in the arena either
                continue
            base[n.name] = base.get(first.name, first.name)
            continue
        coef = coef_of(_bytes(val), n.name)
        if coef is None:
            continue
        sizes[n.name] = coef
        born[n.name], last[n.name], producer[n.name] = i, i, _short(op)
        for j, scores in enumerate(_attention_scores(n, op)):  # what ONNX's MatMul/Softmax decomposition holds
            name = f"{n.name}.scores{j}"
            coef = coef_of(scores, name)
            if coef is not None:
                sizes[name] = coef
                born[name], last[name], producer[name] = i, i, _short(op)
        ws = _expert_workspace(n, op)
        coef = None if ws is None else coef_of(ws, f"{n.name}'s workspace")
        if coef is not None:
            per_node_ws.append(coef)
    tensors = [TensorLife(t, producer[t], sizes[t][1], born[t], last[t], sizes[t][0],
                          tuple(basis) if sizes[t][0] is not None else ()) for t in sizes]

    weights: dict[str, int] = {}
    for name in weights_names:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, torch.Tensor):
            key = str(val.dtype).replace("torch.", "")
            weights[key] = weights.get(key, 0) + val.numel() * val.element_size()
    workspace = sympy.Max(*[e for _, e in per_node_ws]) if per_node_ws else sympy.Integer(0)
    notes = ["planned from the torch.export graph's symbolic shapes (no weights, no ONNX Runtime)"]
    if inexact:
        notes.append(f"{len(inexact)} size(s) are no polynomial of the dims (e.g. '{inexact[0]}', padding to a chunk): "
                     "planned from their exact expressions")
    if unbacked:
        notes.append(f"{len(unbacked)} tensor(s) whose size depends on the data, not on the dims (e.g. "
                     f"'{unbacked[0]}', an unfused layer's token selection), are left out of the plan")
    plan = MemoryPlan(dims, tensors, weights, workspace, notes=notes)
    for pname, p in profiles.items():
        plan.profiles[pname] = _pack(plan, {d: int(p[d]) for d in dims}, alignment)
    return plan


def _op_name(n) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t.name()  # e.g. "aten::view" or "moec::experts"
    return getattr(t, "__name__", str(t))


def _short(op: str) -> str:
    return op.replace("::", ".").split(".default")[0]


def _attention_scores(n, op: str) -> list[sympy.Expr]:
    """scaled_dot_product_attention is one FX node, but its ONNX form materialises the scores [B, H, S, T]
    and their softmax (fp32), both live at once: two tensors of the scores' size, live at this node."""
    if op.split(".")[0] != "aten::scaled_dot_product_attention":
        return []
    q, k = n.args[0].meta["val"], n.args[1].meta["val"]
    scores = sympy.Mul(*[_sym(s) for s in q.shape[:-1]], _sym(k.shape[-2]), sympy.Integer(4))
    return [scores, scores]


def _sym(x) -> sympy.Expr:
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _bytes(val: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*[_sym(s) for s in val.shape], sympy.Integer(val.element_size()))


def _expert_workspace(n, op: str) -> Optional[sympy.Expr]:
    """tokens x k x (fc1 rows + H) x 4 bytes for a fused expert op (moec.analysis.plan_memory._workspace)."""
    spec = EXPERT_OPS.get(op.split(".")[0])
    if spec is None:
        return None
    hidden_i, (how, where), fc1_i = spec
    hidden = n.args[hidden_i].meta["val"]
    k = _sym(n.args[where].meta["val"].shape[1]) if how == "shape" else sympy.Integer(int(n.args[where]))
    tokens = sympy.Mul(*[_sym(s) for s in hidden.shape[:-1]])
    h = _sym(hidden.shape[-1])
    fc1 = n.args[fc1_i].meta["val"]
    rows = sympy.Integer(fc1.numel() // (int(fc1.shape[0]) * int(h)))
    return tokens * k * (rows + h) * 4

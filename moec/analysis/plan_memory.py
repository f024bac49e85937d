"""plan_memory: an exact activation-memory plan for an ONNX graph with symbolic (dynamic) dims.

An analysis of the final ONNX graph (not a pass: it rewrites nothing). What it needs to know of a
target comes from `PlanHooks`: how to make the graph runnable in ONNX Runtime and which nodes are
fused-experts kernels with scratch of their own (moec.targets.base.Target.evaluable_model /
expert_nodes).

Matches: any ONNX model moec writes (standard ops, each target's expert nodes).
Produces: a `MemoryPlan`:
  - every intermediate tensor's size as a sympy expression of the dynamic dims. Concrete sizes come
    from running the graph in ONNX Runtime at a few tiny probe assignments of the dims (2..16, every
    node output exposed; a target's custom nodes evaluated by their reference subgraph) — ONNX's own shape
    inference loses shapes through torch's Range/Shape arithmetic. Each size is then fitted exactly
    on all monomials of the dims up to degree 3 (attention: batch*seq^2) and checked at two further
    points;
  - liveness over the graph's node order: born at the producer, dead after the last consumer;
    graph outputs live to the end; shape-only ops (Reshape, Squeeze, Unsqueeze, Flatten, Identity)
    alias their input, as ONNX Runtime runs them, and extend its life instead of allocating;
    graph inputs, initializers and Constant outputs are not in the arena (weights are counted
    separately, by dtype);
  - per profile (min/opt/max assignments of the dims): offsets in one arena by greedy packing
    (the tightest of a few orders, best-fit gaps, 64-byte alignment), the arena size, the lower
    bound (most bytes simultaneously live), kernel workspace and the total.
Weights are never read: the probes run a weightless copy (`weightless`), so planning costs memory for
activations at tiny sizes, not for the model.
Refuses (MemoryPlanError): a dynamic dim with no value in a profile, and shapes the fit can't express.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
import sympy
from onnx import helper

from moec.errors import MoecError
from moec.widen_bf16 import has_bf16, widen_bf16

ALIASING_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


@dataclass(frozen=True)
class PlanHooks:
    """What the planner asks of the artifact's target(s)."""

    expert_nodes: Sequence = ()  # moec.targets.base.ExpertNode
    evaluable: Callable = lambda model: (model, 0)  # model -> (model ONNX Runtime runs, n expanded)

    @classmethod
    def of(cls, *chosen) -> "PlanHooks":
        """The hooks of the given targets (moec.targets.base.Target); every registered one by default."""
        from moec import targets
        from moec.targets.base import evaluable_by

        chosen = chosen or tuple(targets.all_targets())
        return cls(tuple(e for t in chosen for e in t.expert_nodes()), evaluable_by(chosen))


class MemoryPlanError(MoecError):
    exit_code = 18


@dataclass
class TensorLife:
    name: str
    producer: str
    size: sympy.Expr  # bytes, for people
    start: int
    end: int
    coef: Optional[np.ndarray] = None  # the same size as integer coefficients on `basis`, for speed
    basis: tuple = ()

    def bytes_at(self, dims: dict[str, int]) -> int:
        if self.coef is None:
            return int(self.size.subs({sympy.Symbol(d, positive=True, integer=True): v for d, v in dims.items()}))
        return int(sum(int(c) * int(np.prod([dims[k] for k in term])) for c, term in zip(self.coef, self.basis) if c))


@dataclass
class ProfilePlan:
    dims: dict[str, int]
    arena_bytes: int
    lower_bound_bytes: int
    workspace_bytes: int
    weights_bytes: int
    offsets: dict[str, int]
    sizes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.arena_bytes + self.workspace_bytes


@dataclass
class MemoryPlan:
    dims: list[str]
    tensors: list[TensorLife]
    weights_by_dtype: dict[str, int]
    workspace: sympy.Expr
    profiles: dict[str, ProfilePlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights_by_dtype.values())

    def to_dict(self, top: int = 10) -> dict:
        out = {"dims": self.dims, "weights_bytes_by_dtype": self.weights_by_dtype, "notes": self.notes,
               "workspace_bytes": str(self.workspace), "tensors": len(self.tensors), "profiles": {}}
        for name, p in self.profiles.items():
            big = sorted(self.tensors, key=lambda t: -p.sizes[t.name])[:top]
            out["profiles"][name] = {
                "dims": p.dims, "weights_bytes": p.weights_bytes, "arena_bytes": p.arena_bytes,
                "lower_bound_bytes": p.lower_bound_bytes, "workspace_bytes": p.workspace_bytes,
                "total_bytes": p.total_bytes,
                "largest_tensors": [{"name": t.name, "producer": t.producer, "bytes": p.sizes[t.name],
                                     "size": str(t.size), "live": [t.start, t.end], "offset": p.offsets[t.name]}
                                    for t in big],
            }
        return out


_ORT_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(double)": 8,
                 "tensor(int64)": 8, "tensor(int32)": 4, "tensor(int8)": 1, "tensor(uint8)": 1, "tensor(bool)": 1}


def _itemsize(elem_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


WEIGHTLESS_MIN_BYTES = 4096  # smaller initializers (Reshape targets, index tables) keep their values
_WEIGHTLESS_PREFIX = "moec_weightless/"


def weightless(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES,
               base_dir: Optional[str] = None) -> onnx.ModelProto:
    """A copy of `model` whose weights are zeros made at run time: every initializer of `min_bytes`
    or more becomes a ConstantOfShape node of its shape and type. Smaller ones keep their values; when
    they are external data (not loaded), they are read from `base_dir` one by one, or zeroed without it.

    Shapes in moec's graphs never depend on weight values, so the probe runs see the same shapes;
    the copy holds no weight bytes, and ONNX Runtime makes each zero weight just before its first use
    (its default order is a depth-first walk from the outputs) and frees it after its last, so a
    probe costs activations at tiny sizes plus a few weights, not the model."""
    from onnx import TensorProto, numpy_helper

    out = onnx.ModelProto()
    out.ir_version, out.producer_name = model.ir_version, model.producer_name
    out.opset_import.extend(model.opset_import)
    g = out.graph
    g.name = model.graph.name
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    made = []
    from onnx.external_data_helper import load_external_data_for_tensor

    for init in model.graph.initializer:
        external = init.data_location == TensorProto.EXTERNAL and not init.raw_data
        nbytes = int(np.prod(init.dims)) * _itemsize(init.data_type)
        if nbytes < min_bytes and (not external or base_dir is not None):
            if external:
                small = TensorProto()
                small.CopyFrom(init)
                try:
                    load_external_data_for_tensor(small, base_dir)
                except OSError as exc:
                    from moec.errors import ArtifactError

                    raise ArtifactError(f"weights of '{init.name}' can't be read from '{base_dir}': {exc}") from exc
                small.data_location = TensorProto.DEFAULT
                del small.external_data[:]
                init = small
            g.initializer.append(init)
            continue
        shape_name = f"{_WEIGHTLESS_PREFIX}{init.name}/shape"
        g.initializer.append(numpy_helper.from_array(np.asarray(init.dims, dtype=np.int64), shape_name))
        # ConstantOfShape (opset <= 19) has no bfloat16: make float zeros and cast
        direct = init.data_type != TensorProto.BFLOAT16
        zero_type = init.data_type if direct else TensorProto.FLOAT
        zero = helper.make_tensor("value", zero_type, [1], [0])
        made_name = init.name if direct else f"{_WEIGHTLESS_PREFIX}{init.name}/float"
        made.append(helper.make_node("ConstantOfShape", [shape_name], [made_name], value=zero,
                                     name=f"{_WEIGHTLESS_PREFIX}{init.name}"))
        if not direct:
            made.append(helper.make_node("Cast", [made_name], [init.name], to=init.data_type,
                                         name=f"{_WEIGHTLESS_PREFIX}{init.name}/cast"))
    g.node.extend(made + list(model.graph.node))
    for f in model.functions:
        out.functions.append(f)
    return out


def _probe_session(model: onnx.ModelProto):
    """An ONNX Runtime session over `model` with every node output exposed (shapes at tiny sizes)."""
    import os
    import tempfile

    import onnxruntime as ort

    names = [o for n in model.graph.node if n.op_type != "Constant" and not n.name.startswith(_WEIGHTLESS_PREFIX)
             for o in n.output if o]
    existing = {o.name for o in model.graph.output}
    added = [helper.make_empty_tensor_value_info(o) for o in names if o not in existing]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    model.graph.output.extend(added)  # temporarily: removed again below, the caller's model is unchanged
    try:
        if model.ByteSize() < (1 << 30):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as d:  # over 1 GiB: stream through a file, no protobuf copy
            path = os.path.join(d, "probe.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="probe.data")
            return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    finally:
        del model.graph.output[len(existing):]


def _concrete_shapes(session, model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, tuple[int, list[int]]]:
    """Every tensor's (elem type, shape) at one assignment of the dynamic dims, by running the model."""
    feeds = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_param"):
                if d.dim_param not in dims:
                    raise MemoryPlanError(f"dynamic dim '{d.dim_param}' of input '{v.name}' has no value.")
                shape.append(dims[d.dim_param])
            else:
                shape.append(d.dim_value)
        feeds[v.name] = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(t.elem_type))
    outs = session.run(None, feeds)
    # sequence-typed values (SplitToSequence ...) are lists: ORT holds their tensors separately; skipped
    return {o.name: (o.type, list(v.shape)) for o, v in zip(session.get_outputs(), outs) if isinstance(v, np.ndarray)}


def _basis(dims: list[str], degree: int = 3) -> list[tuple[str, ...]]:
    """All monomials of the dims up to `degree` (attention scores grow as batch * seq^2)."""
    return [t for k in range(degree + 1) for t in itertools.combinations_with_replacement(dims, k)]


def _fit_coef(samples: list[tuple[dict[str, int], int]], basis) -> Optional[np.ndarray]:
    """Integer coefficients on `basis` reproducing every sample exactly, or None."""
    a = np.array([[np.prod([s[k] for k in term]) if term else 1 for term in basis] for s, _ in samples], float)
    y = np.array([v for _, v in samples], float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    coef = np.round(coef).astype(np.int64)
    return coef if np.array_equal(a @ coef, y) else None


def _expr(coef: np.ndarray, dims: list[str], basis) -> sympy.Expr:
    syms = {d: sympy.Symbol(d, positive=True, integer=True) for d in dims}
    return sum((int(c) * sympy.Mul(*[syms[k] for k in term]) for c, term in zip(coef, basis) if c), sympy.Integer(0))


def _fit(samples: list[tuple[dict[str, int], int]], dims: list[str], basis) -> Optional[sympy.Expr]:
    coef = _fit_coef(samples, basis)
    return None if coef is None else _expr(coef, dims, basis)


def plan_memory(model: onnx.ModelProto, profiles: dict[str, dict[str, int]], alignment: int = 64,
                hooks: Optional[PlanHooks] = None, with_weights: bool = False,
                base_dir: Optional[str] = None, derived: Optional[dict[str, tuple[str, ...]]] = None) -> MemoryPlan:
    """Plan `model` (its weights need not be loaded: onnx.load(..., load_external_data=False); `base_dir`,
    its directory, lets small external tensors keep their values). The probe runs use a weightless copy
    unless `with_weights` (kept to check the two agree). `derived` names dims that are sums of others (a
    decoder's total = past + seq): probes keep the relation, and sizes are expressions of the others."""
    derived = derived or {}
    all_dims = sorted({d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param})
    dims = [d for d in all_dims if d not in derived]
    for pname, p in profiles.items():
        missing = [d for d in all_dims if d not in p]
        if missing:
            raise MemoryPlanError(f"profile '{pname}' gives no value for dynamic dim(s) {', '.join(missing)}; "
                                  "every dynamic dim needs a bounded value in every profile.")
    hooks = hooks or PlanHooks.of()
    runnable, _ = hooks.evaluable(model if with_weights else weightless(model, base_dir=base_dir))  # same output names and shapes
    held_bf16: frozenset[str] = frozenset()
    if has_bf16(runnable):  # the CPU provider runs bf16 widened to fp32; the plan keeps bf16's 2 bytes a value
        widened = widen_bf16(runnable)
        runnable, held_bf16 = widened.model, widened.bf16_values
    session = _probe_session(runnable)
    basis = _basis(dims)
    # probe points: enough for the basis, plus two to check the fit
    rng = np.random.default_rng(0)
    points = [{d: int(v) for d, v in zip(dims, rng.integers(2, 17, size=len(dims)))} for _ in range(len(basis) + 2)]
    feeds_at = [{**p, **{d: sum(p[k] for k in parts) for d, parts in derived.items() if d in all_dims}}
                for p in points]
    shapes_at = [_concrete_shapes(session, runnable, p) for p in feeds_at]
    for shapes in shapes_at:
        for name in held_bf16 & shapes.keys():
            shapes[name] = ("tensor(bfloat16)", shapes[name][1])
    del session
    init_names = {i.name for i in model.graph.initializer}
    const_outputs = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    notes = []

    # sizes, liveness
    base: dict[str, str] = {}  # alias -> owning tensor
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    producer: dict[str, str] = {}
    sizes: dict[str, sympy.Expr] = {}
    end = len(model.graph.node)
    design = np.array([[np.prod([p[k] for k in term]) if term else 1 for term in basis] for p in points], float)
    columns: list[list[int]] = []  # sizes at every probe point, one column per tensor
    for i, n in enumerate(model.graph.node):
        for inp in n.input:
            if inp and inp in born or inp in base:
                owner = base.get(inp, inp)
                last[owner] = max(last.get(owner, i), i)
        if n.op_type == "Constant":
            continue
        for o in n.output:
            if not o:
                continue
            if n.op_type in ALIASING_OPS and n.input and (n.input[0] in born or n.input[0] in base):
                base[o] = base.get(n.input[0], n.input[0])
                continue
            if any(o not in shapes for shapes in shapes_at):
                notes.append(f"no shape for '{o}' ({n.op_type}); left out of the plan")
                continue
            columns.append([int(np.prod(shapes[o][1])) * _ORT_ITEMSIZE.get(shapes[o][0], 4) for shapes in shapes_at])
            born[o], last[o], producer[o] = i, i, f"{n.op_type}:{n.name}"
    # one least-squares solve for every tensor; integer coefficients must reproduce every sample
    if columns:
        y = np.array(columns, float).T
        coef = np.round(np.linalg.lstsq(design, y, rcond=None)[0]).astype(np.int64)
        exact = (design @ coef == y).all(axis=0)
        for j, name in enumerate(born):
            if not exact[j]:
                raise MemoryPlanError(f"size of '{name}' ({producer[name]}) is not a polynomial of degree <= 3 "
                                      f"in {dims}.")
            sizes[name] = coef[:, j]
    for o in graph_outputs:
        owner = base.get(o, o)
        if owner in born:
            last[owner] = end
    tensors = [TensorLife(t, producer[t], _expr(sizes[t], dims, basis), born[t], last[t], sizes[t], tuple(basis))
               for t in born if t not in init_names and t not in const_outputs]

    weights: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.helper.tensor_dtype_to_string(init.data_type).replace("TensorProto.", "").lower()
        weights[name] = weights.get(name, 0) + int(np.prod(init.dims)) * _itemsize(init.data_type)
    workspace = _workspace(model, shapes_at, points, dims, basis, hooks.expert_nodes)
    plan = MemoryPlan(dims, tensors, weights, workspace, notes=notes)
    for pname, p in profiles.items():
        plan.profiles[pname] = _pack(plan, {d: int(p[d]) for d in dims}, alignment)
    return plan


def _workspace(model, shapes_at, points, dims, basis, expert_nodes) -> sympy.Expr:
    """Scratch the fused expert kernels need beyond their inputs and outputs: per routed token-slot,
    one fc1 output row (2I or I values) and one fc2 output row (H values), in fp32 — the
    sorted-by-expert buffers of ORT's MoE/QMoE kernels and of moec's plugin (the targets' `expert_nodes`).
    Expert nodes run one after another, so the workspace is the largest node's, not the sum."""
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    per_node: list[sympy.Expr] = []
    kinds = {(e.domain, e.op_type): e for e in expert_nodes}
    for n in model.graph.node:
        kind = kinds.get((n.domain, n.op_type))
        if kind is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        k = int(attrs.get(kind.top_k_attribute, 1))
        fc1 = weights.get(n.input[kind.fc1_input])
        samples = []
        for p, shapes in zip(points, shapes_at):
            if fc1 is None:
                break
            shape = shapes[n.input[0]][1] if n.input[0] in shapes else None
            if shape is None:
                break
            tokens, hidden = int(np.prod(shape[:-1])), shape[-1]
            samples.append((p, tokens * k * (int(fc1[1]) + hidden) * 4))
        if len(samples) == len(points):
            per_node.append(_fit(samples, dims, basis) or sympy.Integer(0))
    return sympy.Max(*per_node) if per_node else sympy.Integer(0)


def _pack(plan: MemoryPlan, dims: dict[str, int], alignment: int) -> ProfilePlan:
    subs = {sympy.Symbol(d, positive=True, integer=True): v for d, v in dims.items()}
    sizes = {t.name: t.bytes_at(dims) for t in plan.tensors}
    # Greedy packing is a heuristic (optimal packing is NP-hard). Keep the tightest of a small
    # portfolio: by size (TFLite's greedy-by-size), by size x lifetime, and "large tensors by start
    # time, then the rest by size" — start order colours equal-sized intervals optimally, which
    # is what chains of attention-score tensors are (GPT-OSS: 1.37x the bound by size, 1.003x so).
    biggest = max(sizes.values(), default=0)
    orders = [
        sorted(plan.tensors, key=lambda t: (-sizes[t.name], t.start)),
        # equal sizes, the longest-lived first (fused ops with several outputs make such ties common:
        # DeepSeek-V3's probe profile 1.20x the bound by start, 1.12x so)
        sorted(plan.tensors, key=lambda t: (-sizes[t.name], -t.end)),
        sorted(plan.tensors, key=lambda t: (-sizes[t.name] * (t.end - t.start + 1), t.start)),
    ]
    for frac in (0.5, 0.25, 0.1, 0.05):
        large = [t for t in plan.tensors if sizes[t.name] >= frac * biggest]
        rest = [t for t in plan.tensors if sizes[t.name] < frac * biggest]
        orders.append(sorted(large, key=lambda t: (t.start, -sizes[t.name]))
                      + sorted(rest, key=lambda t: (-sizes[t.name], t.start)))
    unique = {tuple(t.name for t in o): o for o in orders}.values()
    offsets, arena = min((_place(order, sizes, alignment) for order in unique), key=lambda r: r[1])
    # lower bound: the most bytes live at once, each tensor rounded up to the alignment as any aligned
    # packing must (at tiny probe sizes the rounding is a third of a [1, 2, 12] tensor; the bound would
    # otherwise measure alignment, not packing)
    events = np.zeros(max((t.end for t in plan.tensors), default=0) + 2, dtype=np.int64)
    for t in plan.tensors:
        aligned = -(-sizes[t.name] // alignment) * alignment
        events[t.start] += aligned
        events[t.end + 1] -= aligned
    lower = int(np.cumsum(events).max()) if len(events) else 0
    workspace = int(sympy.sympify(plan.workspace).subs(subs)) if plan.workspace != 0 else 0
    return ProfilePlan(dims, arena, lower, workspace, plan.weights_bytes, offsets, sizes)


def _place(order: list[TensorLife], sizes: dict[str, int], alignment: int) -> tuple[dict[str, int], int]:
    """Each tensor in turn into the smallest gap that holds it among the tensors it overlaps in time."""
    n = len(order)
    starts, ends = np.empty(n, np.int64), np.empty(n, np.int64)
    lows, highs = np.empty(n, np.int64), np.empty(n, np.int64)
    offsets: dict[str, int] = {}
    arena = 0
    for i, t in enumerate(order):
        size = -(-sizes[t.name] // alignment) * alignment
        live = ~((ends[:i] < t.start) | (t.end < starts[:i]))  # placed tensors alive at the same time
        idx = np.argsort(lows[:i][live], kind="stable")
        busy_lo, busy_hi = lows[:i][live][idx], highs[:i][live][idx]
        best, best_gap, cursor = None, None, 0
        for o, e in zip(busy_lo.tolist(), busy_hi.tolist()):
            gap = o - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, e)
        offset = best if best is not None else cursor
        offsets[t.name] = offset
        starts[i], ends[i], lows[i], highs[i] = t.start, t.end, offset, offset + size
        arena = max(arena, offset + size)
    return offsets, arena


def check_no_overlap(plan: MemoryPlan, profile: str) -> None:
    """Asserts the arena invariant: tensors live at the same time never share bytes."""
    p = plan.profiles[profile]
    ts = plan.tensors
    for a, b in itertools.combinations(ts, 2):
        if a.end < b.start or b.end < a.start:
            continue
        a0, a1 = p.offsets[a.name], p.offsets[a.name] + p.sizes[a.name]
        b0, b1 = p.offsets[b.name], p.offsets[b.name] + p.sizes[b.name]
        if a1 > b0 and b1 > a0 and p.sizes[a.name] and p.sizes[b.name]:
            raise AssertionError(f"{a.name} and {b.name} overlap in the arena")

"""`moec plan SOURCE`: a model's structure from its config.json alone — no weights read, none allocated.

1. Recognise on a miniature (moec.miniature): the same transformers class with tiny widths and the routing
   kept, built with random weights and run through fuse_moe's translation validation; each MoE layer's
   kind (its class and parameter names, expert indices folded) gets the miniature's outcome.
2. Build the real-sized model on the meta device, replace every layer of a recognised kind by a FusedMoE of
   the real sizes (shapes only: on meta there is nothing to validate, the miniature was), lower it for
   ONNX Runtime as `moec compile` does, and capture it with torch.export — the artifact's task, dynamic dims
   and all.
3. Plan activation memory from the captured graph's symbolic shapes (moec.analysis.plan_exported), count
   the weights at each precision, and place them on devices of --device-memory (moec.placement).
The real model is never materialised: a config of a trillion parameters costs what its graph costs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from moec.analysis.plan_memory import MemoryPlan
from moec.errors import MoecError, SourceError
from moec.miniature import MINIATURE_MAX_PARAMETERS, HFConfig, miniature, read_config
from moec.moe_layer import ExpertsOnly, FusedMoE, LayerSpec
from moec.placement import ExpertMatrix, MoELayerWeights, Placement, WeightBytes, place, weight_bytes

if TYPE_CHECKING:
    from moec.passes.base import PassResult


@dataclass
class PlannedLayer:
    path: str
    kind: str  # the miniature layer whose outcome it takes
    fused: bool
    reason: str = ""
    spec: Optional[LayerSpec] = None
    lowered_to: str = ""

    def to_dict(self) -> dict:
        d = {"path": self.path, "kind": self.kind, "fused": self.fused, "lowered_to": self.lowered_to}
        if self.reason:
            d["reason"] = self.reason
        if self.spec is not None:
            d["spec"] = self.spec.to_dict()
        return d


@dataclass
class ModelPlan:
    source: str
    model_class: str
    task: str
    parameters: int
    layers: list[PlannedLayer]
    memory: MemoryPlan
    weights: list[WeightBytes]
    placements: list[Placement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def expert_parameters(self) -> int:
        fp32 = next(w for w in self.weights if w.precision == "fp32")
        return fp32.experts // 4

    def to_dict(self) -> dict:
        fused = [l for l in self.layers if l.fused]
        return {
            "source": self.source, "model_class": self.model_class, "task": self.task,
            "parameters": self.parameters, "expert_parameters": self.expert_parameters,
            "moe_layers": {"found": len(self.layers), "fused": len(fused),
                           "layers": [l.to_dict() for l in self.layers]},
            "weights": [{"precision": w.precision, "experts_bytes": w.experts, "other_bytes": w.other,
                         "total_bytes": w.total} for w in self.weights],
            "memory_plan": self.memory.to_dict(),
            "placement": [p.to_dict() for p in self.placements],
            "notes": self.notes, "seconds": self.seconds,
        }


def layer_kind(mod: nn.Module) -> tuple:
    """What makes two MoE layers the same kind: their class and parameter names, expert indices folded."""
    names = [n for n, _ in mod.named_parameters()] + [n for n, _ in mod.named_buffers()]
    return type(mod).__qualname__, tuple(sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", n) for n in names}))


@dataclass
class MiniatureOutcome:
    path: str
    fused: bool
    reason: str
    fused_module: Optional[FusedMoE]
    tensor_index: Optional[int] = None  # CalledLike's argument, when the layer took size arguments
    # Which expert reading (fusion_rules' layout name) and which of the anatomy's [E] vectors were the router and
    # selection biases: what an out-of-core compile needs to rebuild the fused layer one expert at a time.
    layout: Optional[str] = None
    bias_indices: tuple[Optional[int], Optional[int]] = (None, None)
    expert_by_expert: bool = False  # the layer as written indexes its stacked experts one at a time


def recognise_miniature(hf: HFConfig, log: Callable[[str], None]) -> dict[tuple, MiniatureOutcome]:
    """Each MoE layer kind of the miniature -> what fuse_moe made of it."""
    from moec.demo import randomize_
    from moec.passes.base import PassContext, PassManager
    from moec.passes.fuse_moe import CalledLike, FuseMoE, find_candidates
    from moec.sources import causal_lm_source

    try:
        mini = miniature(hf.config)
        with torch.device("meta"):  # its size first: a miniature must not cost what the model does
            size = sum(p.numel() for p in hf.model_class(mini).parameters())
    except Exception as exc:
        raise SourceError(f"'{hf.path}': its miniature ({hf.model_class.__name__} with tiny widths) does not build: "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if size > MINIATURE_MAX_PARAMETERS:
        raise SourceError(f"'{hf.path}': moec cannot shrink this {hf.model_class.__name__} config to a miniature (it "
                          f"would still have {size / 1e6:.0f}M parameters: its widths or expert counts sit under keys "
                          "moec.miniature does not know); recognition would need the real-sized model, so nothing "
                          "was planned.")
    torch.manual_seed(0)
    model = hf.model_class(mini).eval()
    randomize_(model, 0)
    kinds = {path: layer_kind(model.get_submodule(path)) for path, _ in find_candidates(model)}
    originals = {path: model.get_submodule(path) for path in kinds}  # as written: the fusion replaces them
    src = causal_lm_source(model, "miniature")
    ctx = PassContext(probes=[src.example_args, src.make_inputs(7, seq_len=5, batch=1)], log=log)
    try:
        module, records = PassManager([FuseMoE()], validate=True).run(src.module, ctx)
    except MoecError:
        raise
    except Exception as exc:  # the model itself can't run with this config (a key it needs is null ...)
        raise SourceError(f"'{hf.path}': its miniature ({hf.model_class.__name__} with tiny widths) does not run: "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    out: dict[tuple, MiniatureOutcome] = {}
    for o in records[0].layers:
        path = o.path[len("model."):] if o.path.startswith("model.") else o.path
        if path not in kinds and path.rpartition(".")[0] in kinds:  # experts fused without their block
            path = path.rpartition(".")[0]
        path = path if path in kinds else o.path
        kind = kinds.get(path)
        if kind is None or kind in out:
            continue
        m = module.get_submodule(o.path) if o.fused else None
        if isinstance(m, ExpertsOnly):  # its routing comes from its caller, which stays as written
            out[kind] = MiniatureOutcome(path, False, "experts fused on their own (routing given by their caller) are "
                                         "not planned out of core yet; planned as written", None)
            continue
        index = m.tensor_index if isinstance(m, CalledLike) else None
        fused = m.fused if isinstance(m, CalledLike) else m
        reading = reading_of(originals[path], fused, index) if fused is not None else (None, (None, None), False)
        out[kind] = MiniatureOutcome(path, o.fused, o.reason, fused, index, *reading)
    return out


def reading_of(original: nn.Module, fused: FusedMoE, tensor_index: Optional[int] = None
               ) -> tuple[Optional[str], tuple[Optional[int], Optional[int]], bool]:
    """Which of the layer's expert readings the fused layer holds (its layout name), the positions of its router
    and selection biases among the layer's [E] vectors ((None, ...) where they can't be told apart), and whether
    the layer as written runs the same with its stacked experts read one at a time."""
    from moec.passes.fuse_moe import Anatomy, analyze
    from moec.passes.layers import LayerCall
    from moec.stream_experts import runs_expert_by_expert

    anatomy = analyze(original)
    if not isinstance(anatomy, Anatomy):
        return None, (None, None), False
    layout = next((r.layout for r in anatomy.expert_readings() if _same(r.w_gate_up, fused.w_gate_up)
                   and _same(r.w_down, fused.w_down) and _same(r.b_gate_up, fused.b_gate_up)
                   and _same(r.b_down, fused.b_down)), None)

    def index(t):
        return None if t is None else next((i for i, b in enumerate(anatomy.router_biases) if _same(b, t)), -1)

    one_by_one = anatomy.source.stacked is not None and runs_expert_by_expert(
        original, anatomy.source.stacked, LayerCall(tensor_index or 0), anatomy.hidden)
    return layout, (index(fused.router_bias), index(fused.selection_bias)), one_by_one


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))


def fuse_as_miniature(anatomy, mini: MiniatureOutcome, spec: LayerSpec, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                      b_gate_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None) -> FusedMoE:
    """A FusedMoE of `spec` (the miniature's, at this layer's sizes) over this layer's own router, biases, shared
    expert and norms, in the roles the miniature's fusion found, with the expert weights given (meta when they
    are streamed or only shapes are wanted)."""
    f = mini.fused_module
    rb_at, sb_at = mini.bias_indices

    def bias(at, like):
        if like is None:
            return None
        if at is not None and 0 <= at < len(anatomy.router_biases):
            return anatomy.router_biases[at]
        return torch.empty(anatomy.num_experts, device="meta")  # shapes only: which vector it is can't matter

    return FusedMoE(
        spec, anatomy.router_weight if f.spec.route is not None else None, bias(rb_at, f.router_bias),
        bias(sb_at, f.selection_bias), w_gate_up, w_down, b_gate_up if f.b_gate_up is not None else None,
        b_down if f.b_down is not None else None,
        anatomy.shared if f.shared is not None else None, anatomy.shared_gate if f.shared_gate is not None else None,
        anatomy.router if f.spec.route is None else None, post_norm=anatomy.post_norm if f.post_norm is not None else None,
        output_bias=anatomy.output_bias if f.output_bias is not None else None,
    )


def fuse_on_meta(full: nn.Module, kinds: dict[tuple, MiniatureOutcome]) -> tuple[list[PlannedLayer], list[MoELayerWeights]]:
    """Replace each layer of a recognised kind by a FusedMoE of its own sizes, on the meta device."""
    from moec.passes.fuse_moe import CalledLike, find_candidates
    from moec.passes.layers import LayerCall, set_submodule

    planned, weights = [], []
    for path, anatomy in find_candidates(full):
        kind = layer_kind(full.get_submodule(path))
        mini = kinds.get(kind)
        if isinstance(anatomy, str) or mini is None or not mini.fused:
            why = anatomy if isinstance(anatomy, str) else (
                mini.reason if mini is not None else "no layer of this kind in the miniature (its config shrinks it "
                                                     "away); planned as written")
            planned.append(PlannedLayer(path, mini.path if mini else "", False, why))
            continue
        f = mini.fused_module
        e, h = anatomy.num_experts, anatomy.hidden
        i = int(next(iter(anatomy.expert_readings())).w_down.shape[2])
        rows = 2 * i if f.spec.experts.gated else i
        spec = replace(f.spec, experts=replace(f.spec.experts, num_experts=e, hidden=h, intermediate=i))

        meta = torch.empty(e, rows, h, device="meta"), torch.empty(e, h, i, device="meta")
        fused = fuse_as_miniature(anatomy, mini, spec, *meta, torch.empty(e, rows, device="meta"),
                                  torch.empty(e, h, device="meta"))
        replacement = fused if mini.tensor_index is None else CalledLike(fused, LayerCall(mini.tensor_index))
        set_submodule(full, path, replacement)
        planned.append(PlannedLayer(path, mini.path, True, spec=spec))
        weights.append(MoELayerWeights(path, e, (ExpertMatrix(e, rows, h), ExpertMatrix(e, h, i))))
    return planned, weights


@dataclass
class MetaModel:
    """The real-sized model on the meta device as compile would lower it, and what was made of its MoE layers."""

    model: nn.Module
    parameters: int  # as written, before fusion
    planned: list[PlannedLayer]
    weights: list[MoELayerWeights]
    lowered: list  # the lowering passes' outcomes (LoweringOutcome), one per fused layer
    notes: list[str]  # the experts-implementation switch for layers left unfused
    dense: Optional[PassResult] = None  # --quant-dense: quantize_dense's result (its Linears, shapes only)
    # --prune-experts FRACTION: per fused layer (its planned path, in module order), (experts removed, why it was left
    # whole); the graph has the kept count
    pruned: Optional[dict] = None


def build_on_meta(hf: HFConfig, kinds: dict[tuple, MiniatureOutcome], lowering: list, options: Optional[dict] = None,
                  spec=None) -> MetaModel:
    """Build the config's model on the meta device, fuse every layer of a recognised kind (with a QuantSpec
    `spec`, give it codes of the right shapes), run the target's `lowering` passes, and make unfused experts
    exportable: the graph `moec plan` plans and an out-of-core compile captures. With --prune-experts FRACTION
    in `options`, each prunable layer has the experts it keeps (passes.prune_experts.prune_shapes)."""
    from moec.moe_layer import QuantizedExperts
    from moec.passes.base import PassContext
    from moec.passes.layers import iter_fused
    from moec.pipeline import make_unfused_experts_exportable
    from moec.quant import quantized_shape

    with torch.device("meta"):
        full = hf.model_class(hf.config).eval()
    parameters = sum(p.numel() for p in full.parameters())
    planned, weights = fuse_on_meta(full, kinds)
    pruned = None
    if (options or {}).get("prune_experts") is not None:  # before quantization, as the passes run in memory
        from moec.passes.prune_experts import prune_shapes

        fused = [p.path for p in planned if p.fused]
        # keyed by the planned layer's path (a FusedMoE may sit inside its layer's wrapper), in module order
        pruned = {next((p for p in fused if own == p or own.startswith(p + ".")), own): counts
                  for own, counts in prune_shapes(full, options["prune_experts"]).items()}
    if spec is not None:  # one QuantSpec, or --quant auto's per layer (moec.mixed_precision.LayerSpecs)
        from moec.mixed_precision import spec_at

        for path, fused in iter_fused(full):
            at = spec_at(spec, path)
            if at is not None:
                fused.quantized = QuantizedExperts(quantized_shape(fused.w_gate_up, at, f"{path}.w_gate_up"),
                                                   quantized_shape(fused.w_down, at, f"{path}.w_down"))
    results = {p.name: p(full, PassContext(probes=[], options=options or {})) for p in lowering}
    dense = results.pop("quantize_dense", None)
    lowered = [o for r in results.values() for o in r.layers]
    by_path = {o.path: o for o in lowered}
    for layer in planned:
        o = by_path.get(layer.path)
        if o is not None:
            layer.lowered_to = o.lowered_to + (f" ({o.reason})" if o.reason else "")
    return MetaModel(full, parameters, planned, weights, lowered, make_unfused_experts_exportable(full, {}), dense,
                     pruned)


def plan_model(source: str, task: Optional[str] = None, max_shape: Optional[dict[str, int]] = None,
               device_memory: Optional[int] = None, log: Callable[[str], None] = lambda msg: None) -> ModelPlan:
    """`task`: "text-generation" (the default, as `moec compile` makes for a causal LM) or "logits"."""
    from moec.analysis.plan_exported import plan_exported
    from moec.export_onnx import capture, dim_names
    from moec.memory import source_profiles
    from moec.targets.onnxruntime.lower_moe_onnxruntime import LowerMoEForOnnxRuntime
    from moec.validate import check_max_shape

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    hf = read_config(source)
    notes = list(hf.notes)
    log(f"recognising MoE layers on a miniature {hf.model_class.__name__}")
    kinds = recognise_miniature(hf, lambda msg: None)
    seconds["recognise"] = time.perf_counter() - t

    t = time.perf_counter()
    log("building the real-sized model on the meta device")
    meta = build_on_meta(hf, kinds, [LowerMoEForOnnxRuntime()])
    planned, moe_weights, parameters = meta.planned, meta.weights, meta.parameters
    if any(not l.fused for l in planned) or not planned:
        notes += meta.notes
    src, task = _as_task(meta.model, task, notes)
    seconds["build"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"capturing the {task} graph with torch.export (shapes only)")
    args = tuple(a.to("meta") for a in src.example_args)
    program = capture(src.module, args, src.dynamic_shapes).program
    seconds["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    log("planning activation memory")
    ranges = src.dim_ranges()
    check_max_shape(max_shape, ranges)  # a dim the model doesn't have, a size outside its range: named, as compile does
    profiles = source_profiles(ranges, max_shape, src.derived_dims)
    memory = plan_exported(program, dim_names(program, src.dynamic_shapes), profiles, src.derived_dims)
    seconds["plan"] = time.perf_counter() - t

    expert_params = sum(m.experts * m.rows * m.cols for l in moe_weights for m in l.matrices)
    weights = weight_bytes(moe_weights, parameters - expert_params)
    unfused = [l.path for l in planned if not l.fused]
    if unfused:
        notes.append(f"{len(unfused)} MoE layer(s) not fused (e.g. {unfused[0]}): their experts are counted with the "
                     "other weights, at the other weights' precision, and placed on every device")
    placements = []
    if device_memory is not None:
        t = time.perf_counter()
        top = memory.profiles["max"]
        placements = [place(w, moe_weights, top.arena_bytes + top.workspace_bytes, device_memory) for w in weights]
        seconds["place"] = time.perf_counter() - t
    return ModelPlan(source, hf.model_class.__name__, task, parameters, planned, memory, weights, placements,
                     notes, {k: round(v, 2) for k, v in seconds.items()})


def _as_task(model: nn.Module, task: Optional[str], notes: list[str]):
    """The graph compile would make (sources.as_task); without --task, a model that can't run with a KV cache
    is planned as logits, with a note."""
    from moec.sources import as_task

    example = torch.zeros(2, 8, dtype=torch.long)
    try:
        return as_task(model, "plan", task, "the plan", example), task or "text-generation"
    except SourceError as exc:
        if task is not None:
            raise
        notes.append(f"planned as --task logits: {exc}")
    return as_task(model, "plan", "logits", "the plan", example), "logits"


def format_plan(plan: ModelPlan) -> str:
    """The plan for people: layers grouped by kind, weights per precision, the memory table, placements."""
    from moec.memory import format_table, human

    def count(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    lines = [f"{plan.model_class} from {plan.source}: {count(plan.parameters)} parameters, "
             f"{count(plan.expert_parameters)} in routed experts; task {plan.task}"]
    fused = [l for l in plan.layers if l.fused]
    lines.append(f"MoE layers: {len(plan.layers)} found, {len(fused)} fused")
    groups: dict[tuple, list[PlannedLayer]] = {}
    for l in plan.layers:
        groups.setdefault((l.kind, l.fused, l.reason, l.lowered_to, str(l.spec)), []).append(l)
    for (_, ok, reason, lowered, _), members in groups.items():
        first = members[0]
        where = first.path if len(members) == 1 else f"{first.path} .. {members[-1].path} ({len(members)} layers)"
        if not ok:
            lines.append(f"  {where}: not fused: {reason}")
            continue
        x, r = first.spec.experts, first.spec.route
        route = "kept router" if r is None else (
            f"{r.scoring} top-{r.top_k}" + (f", {r.topk_group} of {r.n_group} groups" if r.n_group > 1 else "")
            + (", selection bias" if r.has_selection_bias else "") + (f", scale {r.scale:g}" if r.scale != 1 else ""))
        shared = " + shared expert" if first.spec.shared else ""
        lines.append(f"  {where}: {x.num_experts} experts {x.hidden}x{x.intermediate} {x.activation}, {route}"
                     f"{shared} -> {lowered}")
    lines += ["", f"{'weights':<9} {'experts':>12} {'other':>12} {'total':>12}"]
    for w in plan.weights:
        lines.append(f"{w.precision:<9} {human(w.experts):>12} {human(w.other):>12} {human(w.total):>12}")
    lines.append("(intN: routed experts packed with one fp32 scale per row; other weights at bf16 beside "
                 "bf16/intN experts)")
    lines += ["", "activation memory (fp32 activations; weights as captured, fp32):", format_table(plan.memory)]
    if plan.placements:
        top = plan.memory.profiles["max"]
        lines += ["", f"placement on devices of {human(plan.placements[0].device_memory)} (each holds the other "
                      f"weights and {human(top.arena_bytes + top.workspace_bytes)} of activations and workspace at "
                      "max; routed experts split in contiguous ranges, the same on every MoE layer):"]
        for p in plan.placements:
            if p.devices is None:
                lines.append(f"  {p.precision:<5} does not fit: {p.why}")
                continue
            ranges = ", ".join(f"{s.first_expert}-{s.last_expert}" for s in p.shares if s.last_expert >= s.first_expert)
            lines.append(f"  {p.precision:<5} {p.devices} device(s), at most {human(max(s.bytes for s in p.shares))} "
                         f"each" + (f"; experts {ranges}" if ranges else "; no routed experts to split"))
    if plan.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in plan.notes]
    return "\n".join(lines)

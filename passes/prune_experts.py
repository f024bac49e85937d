"""prune_experts: remove each fused layer's lowest-ranked experts, router rows and weights both.

Matches: every `FusedMoE` with moec's own routing (``spec.route`` set), once measure_routing has
  measured it on the calibration data; with ``--prune-experts FRACTION|auto``.
Produces: the same FusedMoE with fewer experts: router weight/bias rows, the selection bias, the
  stacked expert weights and biases (and a pre-quantized checkpoint's codes) sliced to the experts
  kept, and ``spec.experts.num_experts`` set to their count. Top-k then runs over the experts kept,
  so the weights renormalise over them exactly as the pruned eager model's do; the pruned module
  *is* the reference the artifact is verified against. Per layer, which experts went (by their
  original index) and the bytes saved; for the model, the logits' distance from the unpruned model
  (relative L2) and how often the top-1 token (argmax of the last dim) still agrees, over the
  calibration data.
Ranking (``--prune-by``): ``contribution`` (mean of routing weight x ‖expert output‖ per token, the
  default), ``count`` (how often it is picked) or ``random`` (a fixed-seed baseline).
Modes: a FRACTION removes floor(FRACTION x E) experts from every layer. ``auto`` first measures each
  layer's sensitivity (the logits' error on the calibration data when only that layer loses its
  1, 2, ... lowest-ranked experts; at most 16 points a layer, interpolated between), orders all removals
  by the squared error each adds, and keeps the longest prefix whose real combined error is within
  ``--accuracy-budget`` (binary search), so layers lose different numbers. It costs one calibration
  pass per measured point. The report also gives the largest uniform fraction within the same budget
  (and auto never removes fewer experts than it).
Grouped routing (DeepSeek-V3's n_group): the same number of experts goes from every group, so the
  groups stay equal (the routing's contract); a unit of removal is one expert per group.
Refuses (PruneError, before anything is written): a fraction outside (0, 1); a fraction that would
  leave a layer fewer experts than it routes each token to (names the layer and the largest fraction
  it allows); ``auto`` without a budget. Layers it can't prune are left whole with the reason
  (routing kept as the model wrote it; a layer the calibration data never reached).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from moec.analysis.routing_stats import LayerRouting, run_calibration_batch
from moec.errors import AccuracyBudgetError, MoecError
from moec.moe_layer import FusedMoE, QuantizedExperts
from moec.passes.base import Pass, PassContext, PassResult, flatten_outputs
from moec.passes.conditions import EXPERTS_PRUNED, MOE_FUSED, ROUTING_MEASURED
from moec.passes.layers import layer_path
from moec.passes.outcomes import PruneOutcome
from moec.quant import QuantizedWeight

RANKINGS = ("contribution", "count", "random")


class PruneError(MoecError):
    """Pruning can't be done as asked: the fraction, the layer and what it allows are named."""

    exit_code = 23


@dataclass(frozen=True)
class LayerPlan:
    """One prunable layer: its removal units in order (each a tuple of expert indices; one expert, or
    one per group under grouped routing), how many may go, and each unit's share of the score."""

    path: str
    num_experts: int
    units: tuple[tuple[int, ...], ...]
    shares: tuple[float, ...]
    max_units: int
    group_size: int  # experts per group (num_experts when not grouped)

    def removed(self, n_units: int) -> tuple[int, ...]:
        return tuple(sorted(e for u in self.units[:n_units] for e in u))

    def units_for_fraction(self, fraction: float) -> int:
        return int(math.floor(fraction * self.group_size + 1e-9))


@dataclass(frozen=True)
class Distance:
    """The pruned model against the unpruned one over the calibration data."""

    rel_l2: float
    top1_agreement: float

    def to_dict(self) -> dict:
        rel = float(f"{self.rel_l2:.6g}") if math.isfinite(self.rel_l2) else str(self.rel_l2)
        return {"rel_l2": rel, "top1_agreement": round(self.top1_agreement, 6)}


def over_budget(budget, what: str, d: Distance, on: str, worst: Sequence[str], instead: str) -> AccuracyBudgetError:
    """--accuracy-budget exceeded by pruning (`what`): the distance `d` from the unpruned model on `on`, the layers
    losing the most, what to try `instead`."""
    return AccuracyBudgetError(
        f"--accuracy-budget {float(budget):g}: {what} moves the logits by relative L2 {d.rel_l2:.3g} against the "
        f"unpruned model on {on} (top-1 agrees on {d.top1_agreement:.1%}). Layers losing the most: "
        f"{', '.join(worst)}. Try {instead}; nothing was written.")


def check_fraction(value) -> None:
    if value == "auto":
        return
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise PruneError(f"--prune-experts {value}: a fraction of each layer's experts strictly between 0 and 1 "
                         "(e.g. 0.25), or auto with --accuracy-budget.")


def scores_of(stats: LayerRouting, by: str, seed: int) -> list[float]:
    if by == "contribution":
        return list(stats.contribution)
    if by == "count":
        return [float(c) for c in stats.counts]
    if by == "random":
        return torch.rand(stats.num_experts, generator=torch.Generator().manual_seed(seed)).tolist()
    raise PruneError(f"--prune-by {by}: expected one of {', '.join(RANKINGS)}.")


def layer_plan(fused: FusedMoE, stats: LayerRouting, by: str, seed: int) -> LayerPlan:
    """Removal order for one layer: lowest score first (ties: lower index first)."""
    return plan_of(fused.spec, stats, by, seed)


def plan_of(spec, stats: LayerRouting, by: str, seed: int) -> LayerPlan:
    """layer_plan from the layer's MoESpec (an out-of-core compile ranks a layer before it is fused for writing)."""
    e = spec.experts.num_experts
    n_group, size, max_units = group_limits(spec)
    scores = scores_of(stats, by, seed)
    total = sum(scores) or 1.0
    per_group = [sorted(range(g * size, (g + 1) * size), key=lambda i: (scores[i], i)) for g in range(n_group)]
    units = tuple(tuple(group[u] for group in per_group) for u in range(size))
    shares = tuple(sum(scores[i] for i in unit) / total for unit in units)
    return LayerPlan(stats.path, e, units, shares, max_units, size)


def group_limits(spec) -> tuple[int, int, int]:
    """(groups, experts per group, how many units of removal the layer allows)."""
    r = spec.route
    n_group = max(1, r.n_group)
    size = spec.experts.num_experts // n_group
    # Grouped routing ranks groups by the sum of their two best experts: keep at least two per group
    # (and enough groups' worth for top-k), or the pruned model would rank groups by another rule.
    keep_min = max(2, math.ceil(r.top_k / max(1, r.topk_group))) if n_group > 1 else r.top_k
    return n_group, size, max(0, size - keep_min)


def fraction_units(mode, path: str, spec) -> int:
    """Units a FRACTION removes from the layer (floor(FRACTION x experts per group)); PruneError when that leaves
    fewer experts than the routing needs, naming the layer and the largest fraction it allows."""
    n_group, size, max_units = group_limits(spec)
    n = int(math.floor(float(mode) * size + 1e-9))
    if n > max_units:
        r = spec.route
        kept = spec.experts.num_experts - n * n_group
        raise PruneError(
            f"--prune-experts {mode}: {path} would keep {kept} of its {spec.experts.num_experts} experts, fewer than "
            f"its routing needs (top-{r.top_k}" + (f" from {r.topk_group} groups" if n_group > 1 else "")
            + f"); the largest fraction this layer allows is {max_units / size:.3g}. Nothing was written.")
    return n


def unprunable(fused: FusedMoE) -> str:
    """Why a layer can't be pruned ("" when it can), whatever the calibration data."""
    renumbered = [a for a in fused.spec.output.aux if a in ("logits", "topk_ids", "dense_scores")]
    if fused.spec.route is None:
        return "routing kept as the model wrote it (a router module moec can't shrink); layer left whole"
    if renumbered:
        return (f"the layer also returns its router's {', '.join(renumbered)}, which pruning would resize and "
                "renumber; layer left whole")
    return ""


def prune_shapes(module: nn.Module, fraction) -> dict[str, tuple[int, str]]:
    """On a model built on the meta device (an out-of-core compile's graph), each prunable fused layer sliced to
    the count FRACTION keeps: the shapes only, since which experts go is chosen later, from each layer's routing
    as its weights stream. Returns {path: (experts removed, why left whole)}; PruneError as the pass raises it."""
    out = {}
    for path, fused in [(p, m) for p, m in module.named_modules() if isinstance(m, FusedMoE)]:
        why = unprunable(fused)
        n = 0 if why else fraction_units(fraction, path, fused.spec) * group_limits(fused.spec)[0]
        if n:
            _assign(fused, _sliced(fused, range(fused.spec.experts.num_experts - n)))
        out[path] = (n, why or ("" if n else "no expert removed at this fraction"))
    return out


# ----------------------------------------------------------------------------- slicing a layer


def _rows(t: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().index_select(0, keep)  # a new tensor: the rows kept


def _sliced(fused: FusedMoE, keep: Sequence[int]) -> dict:
    """The attributes of `fused` restricted to the experts `keep` (in their original order)."""
    idx = torch.tensor(list(keep), dtype=torch.int64)
    spec = fused.spec
    new_spec = dataclasses.replace(spec, experts=dataclasses.replace(spec.experts, num_experts=len(keep)))
    q = fused.quantized
    if q is not None:
        q = QuantizedExperts(*(QuantizedWeight(_rows(w.codes, idx), _rows(w.scales, idx), _rows(w.zero_points, idx),
                                               w.spec) for w in (q.gate_up, q.down)))
    out = {"spec": new_spec, "quantized": q, "selection_bias": _rows(fused.selection_bias, idx)}
    for name in ("router_weight", "router_bias", "w_gate_up", "w_down", "b_gate_up", "b_down"):
        t = _rows(getattr(fused, name), idx)
        out[name] = None if t is None else nn.Parameter(t, requires_grad=False)
    return out


def _assign(fused: FusedMoE, attrs: dict) -> None:
    for name, value in attrs.items():
        setattr(fused, name, value)


def _attrs(fused: FusedMoE) -> dict:
    names = ("spec", "quantized", "selection_bias", "router_weight", "router_bias", "w_gate_up", "w_down",
             "b_gate_up", "b_down")
    return {n: getattr(fused, n) for n in names}


@contextmanager
def pruned(module: nn.Module, removed: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """Temporarily prune (for measuring); the layers are restored on exit."""
    saved = {}
    try:
        for path, gone in removed.items():
            if gone:
                fused = module.get_submodule(path)
                saved[path] = _attrs(fused)
                keep = [i for i in range(fused.spec.experts.num_experts) if i not in set(gone)]
                _assign(fused, _sliced(fused, keep))
        yield
    finally:
        for path, attrs in saved.items():
            _assign(module.get_submodule(path), attrs)


def expert_bytes(fused: FusedMoE) -> int:
    return sum(t.numel() * t.element_size() for t in (fused.w_gate_up, fused.w_down, fused.b_gate_up, fused.b_down)
               if t is not None)


# ----------------------------------------------------------------------------- measuring


def iter_first_outputs(module: nn.Module, batches: Sequence[tuple]) -> Iterator[torch.Tensor]:
    """The model's first output (the logits) on each calibration batch, one batch at a time."""
    with torch.no_grad():
        for i, b in enumerate(batches):
            yield flatten_outputs(run_calibration_batch(module, b, i))[0].detach().float()


def first_outputs(module: nn.Module, batches: Sequence[tuple]) -> list[torch.Tensor]:
    """The model's first output on every calibration batch: the unpruned reference."""
    return list(iter_first_outputs(module, batches))


def distance(reference: Iterable[torch.Tensor], got: Iterable[torch.Tensor]) -> Distance:
    """Relative L2 over all batches together and top-1 agreement, accumulated batch by batch (no
    concatenated copy of the logits)."""
    diff2 = ref2 = 0.0
    agree = count = 0
    for r, g in zip(reference, got):
        r64, g64 = r.double(), g.double()
        diff2 += float(((g64 - r64) ** 2).sum())
        ref2 += float((r64 ** 2).sum())
        same = r.argmax(-1) == g.argmax(-1)
        agree, count = agree + int(same.sum()), count + same.numel()
    rel = math.sqrt(diff2) / math.sqrt(ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf)
    return Distance(rel, agree / count if count else 1.0)


def distance_of(module: nn.Module, batches: Sequence[tuple], reference: list[torch.Tensor]) -> Distance:
    """`module`'s distance from `reference` on `batches`, one batch in memory at a time."""
    return distance(reference, iter_first_outputs(module, batches))


# ----------------------------------------------------------------------------- the pass


class PruneExperts(Pass):
    name = "prune_experts"
    changes_numerics = True
    requires = (MOE_FUSED, ROUTING_MEASURED)
    ensures = (EXPERTS_PRUNED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        mode = ctx.options["prune_experts"]
        check_fraction(mode)
        by = ctx.options.get("prune_by") or "contribution"
        budget = ctx.options.get("accuracy_budget")
        stats = {l.path: l for l in ctx.routing}
        plans: dict[str, LayerPlan] = {}
        skipped: dict[str, str] = {}
        for i, (path, fused) in enumerate((p, m) for p, m in module.named_modules() if isinstance(m, FusedMoE)):
            if unprunable(fused):
                skipped[path] = unprunable(fused)
            elif path not in stats or stats[path].tokens == 0:
                skipped[path] = "the calibration data never reached this layer; layer left whole"
            else:
                plans[path] = layer_plan(fused, stats[path], by, seed=i)
        for path, why in skipped.items():
            ctx.log(f"warning: {layer_path(module, path)}: {why}")
        reference = first_outputs(module, ctx.calibration)
        details: dict = {"by": by, "mode": "auto" if mode == "auto" else "fraction"}
        if mode == "auto":
            if budget is None:
                raise PruneError("--prune-experts auto picks how many experts each layer loses from "
                                 "--accuracy-budget; give it (e.g. --accuracy-budget 0.05) or a fraction.")
            units, auto = self.search(module, plans, reference, ctx.calibration, float(budget), ctx.log)
            details["auto"] = auto
        else:
            details["fraction"] = float(mode)
            units = {path: fraction_units(mode, path, module.get_submodule(path).spec) for path in plans}
        removed = {path: plans[path].removed(n) for path, n in units.items()}
        with pruned(module, removed):
            final = distance_of(module, ctx.calibration, reference)
        details["vs_unpruned"] = final.to_dict()
        if budget is not None and mode != "auto" and not final.rel_l2 <= float(budget):
            worst = sorted(plans, key=lambda p: -sum(plans[p].shares[:units[p]]))[:3]
            raise over_budget(budget, f"pruning {mode} of the experts (by {by})", final, "the calibration data", worst,
                              "a smaller fraction or --prune-experts auto")
        outcomes = []
        for path, fused in [(p, m) for p, m in module.named_modules() if isinstance(m, FusedMoE)]:
            before_bytes, before_e = expert_bytes(fused), fused.spec.experts.num_experts
            gone = removed.get(path, ())
            if gone:
                _assign(fused, _sliced(fused, [i for i in range(before_e) if i not in set(gone)]))
            share = sum(plans[path].shares[:units[path]]) if path in plans else 0.0
            reason = skipped.get(path, "" if gone else "no expert removed at this fraction/budget")
            outcomes.append(PruneOutcome(layer_path(module, path), before_e, gone, before_bytes, expert_bytes(fused), share,
                                         reason))
        ctx.log(f"pruned {sum(len(o.removed) for o in outcomes)} of {sum(o.experts_before for o in outcomes)} experts "
                f"(by {by}); logits vs unpruned: relative L2 {final.rel_l2:.3g}, top-1 agreement "
                f"{final.top1_agreement:.1%}")
        return PassResult(module, any(o.removed for o in outcomes), details, outcomes)

    def search(self, module: nn.Module, plans: dict[str, LayerPlan], reference: list, batches: Sequence[tuple],
               budget: float, log, cache: Optional[dict] = None) -> tuple[dict[str, int], dict]:
        """How many units each layer loses: measure each layer's sensitivity alone (the logits' error of
        pruning only that layer, unit by unit), order all units by the error they add (squared errors of
        independent perturbations add), keep the longest prefix of that order whose real combined error
        is within the budget; and the best uniform fraction at the same budget, for comparison."""
        cache = {} if cache is None else cache  # (layer, units) -> Distance; shareable across budgets
        evaluated = len(cache)

        def error(units: dict[str, int]) -> Distance:
            key = tuple(sorted((p, n) for p, n in units.items() if n))
            if key not in cache:
                with pruned(module, {p: plans[p].removed(n) for p, n in key}):
                    cache[key] = distance_of(module, batches, reference)
            return cache[key]

        curves = {}
        for i, (path, plan) in enumerate(plans.items()):
            curves[path] = sensitivity(plan.max_units, lambda u, path=path: error({path: u}).rel_l2)
            log(f"prune auto: sensitivity of {path} ({i + 1}/{len(plans)}): relative L2 "
                + ", ".join(f"{e:.3g}" for e in curves[path][1:6]) + (" ..." if len(curves[path]) > 6 else ""))
        heap = [(_marginal(curves[p], 0, plans[p]), p) for p in plans if plans[p].max_units]
        heapq.heapify(heap)
        order, taken = [], {p: 0 for p in plans}
        while heap:
            _, path = heapq.heappop(heap)
            order.append(path)
            taken[path] += 1
            if taken[path] < plans[path].max_units:
                heapq.heappush(heap, (_marginal(curves[path], taken[path], plans[path]), path))

        def prefix(n: int) -> dict[str, int]:
            units = {p: 0 for p in plans}
            for path in order[:n]:
                units[path] += 1
            return units

        count = lambda units: sum(len(plans[p].removed(n)) for p, n in units.items())  # noqa: E731
        lo, hi = 0, len(order)
        while lo < hi:  # the combined error grows with what is removed: the last prefix within the budget
            mid = (lo + hi + 1) // 2
            d = error(prefix(mid))
            log(f"prune auto: {count(prefix(mid))} experts -> relative L2 {d.rel_l2:.3g} (budget {budget:g})")
            if d.rel_l2 <= budget:
                lo = mid
            else:
                hi = mid - 1
        chosen = prefix(lo)
        # one fraction everywhere (floor per layer, as FRACTION does): its breakpoints are u / group size
        fractions = sorted({u / plan.group_size for plan in plans.values() for u in range(1, plan.max_units + 1)
                            if all(q.units_for_fraction(u / plan.group_size) <= q.max_units for q in plans.values())})
        ulo, uhi = -1, len(fractions) - 1
        while ulo < uhi:
            mid = (ulo + uhi + 1) // 2
            if error({p: plan.units_for_fraction(fractions[mid]) for p, plan in plans.items()}).rel_l2 <= budget:
                ulo = mid
            else:
                uhi = mid - 1
        fraction = fractions[ulo] if ulo >= 0 else 0.0
        uniform = {p: plan.units_for_fraction(fraction) for p, plan in plans.items()}
        source = "measured per-layer sensitivities"
        if count(uniform) > count(chosen):  # the error is not additive everywhere: never prune less than uniform
            chosen, source = uniform, "uniform fraction (removes more within the budget than the sensitivity order)"
        return chosen, {"budget": budget, "removed": count(chosen), "chosen_from": source, "evaluations": len(cache) - evaluated,
                        "uniform_fraction": round(fraction, 6), "uniform_removed": count(uniform),
                        "uniform_vs_unpruned": error(uniform).to_dict()}


MAX_CURVE_POINTS = 16  # per layer; larger layers are measured at evenly spaced unit counts and interpolated


def sensitivity(max_units: int, measure) -> list[float]:
    """[error after removing 0, 1, ..., max_units units] of one layer, measured (or interpolated)."""
    if max_units <= MAX_CURVE_POINTS:
        return [0.0] + [measure(u) for u in range(1, max_units + 1)]
    points = sorted({round(max_units * j / MAX_CURVE_POINTS) for j in range(1, MAX_CURVE_POINTS + 1)})
    known = {0: 0.0, **{u: measure(u) for u in points}}
    xs = sorted(known)
    out = []
    for u in range(max_units + 1):
        hi = next(x for x in xs if x >= u)
        lo = max(x for x in xs if x <= u)
        out.append(known[lo] if hi == lo else known[lo] + (known[hi] - known[lo]) * (u - lo) / (hi - lo))
    return out


def _marginal(curve: list[float], u: int, plan: LayerPlan) -> float:
    """Squared error the (u+1)-th unit adds, per expert it removes (clamped: a curve may dip)."""
    return max(curve[u + 1] ** 2 - curve[u] ** 2, 0.0) / len(plan.units[u])

"""--quant auto: per fused layer, the cheapest of int2 / int4 / int8 / full precision whose combined error on the
model's outputs stays within --accuracy-budget.

Sensitivity: each layer alone at each precision (every other layer at full precision), the outputs' relative L2
against the full-precision model on the compile's verification inputs; measured together with each precision on
every layer (uniform), in one batch (`errors_of` takes a list of choices: out of core, one pass over the
checkpoint measures them all, moec.measure_precision_streamed). Choice, greedy: every layer starts at int2; the
step (one layer up one precision) that removes the most squared error per byte it adds is taken while the
predicted error (the root of the summed squares: layers' errors are treated as independent) is over the budget;
then the real combined error is measured, and more steps are taken while it is over. Full precision everywhere is
the original model, so a choice always exists. Then, round by round, every layer one step down is measured (one
batch) and the steps within the budget are taken together, those adding the least squared error (as measured
alone) per byte saved first, as many as still measure within it together (a second batch; at least the first is
taken), until no step fits (the greedy climb can
overshoot); a uniform precision within the budget that writes fewer bytes still replaces the result. The
steps form the bytes-vs-error curve the report keeps.

One precision per layer: ONNX Runtime's QMoE takes one bit width per node, so experts of a layer can't differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

PRECISIONS = ("int2", "int4", "int8", "fp32")  # cheapest first
FULL = "fp32"


@dataclass(frozen=True)
class Step:
    """One state of the search: what each layer is at, its bytes, and its error (predicted; measured when it was)."""

    choice: tuple[tuple[str, str], ...]  # (path, precision)
    weight_bytes: int
    predicted: float
    measured: Optional[float] = None

    def to_dict(self) -> dict:
        d = {"choice": dict(self.choice), "weight_bytes": self.weight_bytes, "predicted_rel_l2": self.predicted}
        if self.measured is not None:
            d["measured_rel_l2"] = self.measured
        return d


@dataclass
class MixedPlan:
    budget: float
    choice: dict[str, str]
    sensitivity: dict[str, dict[str, float]]  # path -> precision -> the outputs' error with that layer alone at it
    weight_bytes: dict[str, dict[str, int]]  # path -> precision -> the layer's expert bytes
    steps: list[Step] = field(default_factory=list)
    uniform: list[dict] = field(default_factory=list)  # each precision on every layer: bytes, error, within budget

    @property
    def measured(self) -> float:
        return next((s.measured for s in reversed(self.steps) if s.measured is not None), math.nan)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "choice": self.choice, "measured_rel_l2": self.measured,
                "weight_bytes": sum(self.weight_bytes[p][c] for p, c in self.choice.items()),
                "sensitivity": self.sensitivity, "curve": [s.to_dict() for s in self.steps], "uniform": self.uniform}


@dataclass(frozen=True)
class LayerSpecs:
    """--quant auto's choice where the out-of-core compile takes one QuantSpec: each fused layer's (by its planned
    path), None for a layer kept at full precision."""

    by_path: dict
    name: str = "auto"


def spec_at(spec, path: str):
    """The QuantSpec of the fused layer at `path` (or inside it): `spec` itself unless it is a LayerSpecs."""
    if not isinstance(spec, LayerSpecs):
        return spec
    return next((s for p, s in spec.by_path.items() if path == p or path.startswith(p + ".")), None)


def choose(paths: list[str], weight_bytes: dict[str, dict[str, int]], error_of: Callable[[dict[str, str]], float],
           budget: float, log: Callable[[str], None] = lambda _: None) -> MixedPlan:
    """`error_of(choice)` measures the outputs' relative L2 with each layer at its precision (layers not named stay
    at full precision)."""
    return choose_batched(paths, weight_bytes, lambda choices: [error_of(c) for c in choices], budget, log)


def choose_batched(paths: list[str], weight_bytes: dict[str, dict[str, int]],
                   errors_of: Callable[[list[dict[str, str]]], list[float]], budget: float,
                   log: Callable[[str], None] = lambda _: None) -> MixedPlan:
    """`errors_of(choices)`: each choice's error (as `choose`'s error_of), measured together."""
    lower = PRECISIONS[:-1]
    singles = [{path: precision} for path in paths for precision in lower]
    measured_first = errors_of(singles + [{p: precision for p in paths} for precision in lower])
    sensitivity: dict[str, dict[str, float]] = {}
    for i, path in enumerate(paths):
        sensitivity[path] = {FULL: 0.0, **{precision: measured_first[i * len(lower) + j]
                                           for j, precision in enumerate(lower)}}
        log(f"quant auto: sensitivity of {path} ({i + 1}/{len(paths)}): "
            + ", ".join(f"{p} {sensitivity[path][p]:.3g}" for p in lower))
    uniform = dict(zip(lower, measured_first[len(singles):]))
    plan = MixedPlan(budget, {p: PRECISIONS[0] for p in paths}, sensitivity, weight_bytes)

    def predicted(choice: dict[str, str]) -> float:
        return math.sqrt(sum(sensitivity[p][c] ** 2 for p, c in choice.items()))

    def step(measured: Optional[float] = None) -> Step:
        c = plan.choice
        return Step(tuple(c.items()), sum(weight_bytes[p][q] for p, q in c.items()), predicted(c), measured)

    while True:
        if predicted(plan.choice) <= budget:
            measured = errors_of([dict(plan.choice)])[0]
            plan.steps.append(step(measured))
            log(f"quant auto: {describe(plan.choice)} -> relative L2 {measured:.3g} (budget {budget:g})")
            if measured <= budget:
                break
        else:
            plan.steps.append(step())
        up = _best_step(plan.choice, sensitivity, weight_bytes)
        if up is None:  # every layer at full precision: the model as it was (error 0), within any budget
            break
        plan.choice[up] = PRECISIONS[PRECISIONS.index(plan.choice[up]) + 1]
    # back down where the climb overshot: each round measures every layer one step down (one batch), then the
    # steps that fit taken together, the least squared error added per byte saved first (equal savings, as
    # int4 -> int2 on layers of one size, would otherwise be taken in path order whatever they cost), as many as
    # still fit (one batch more: the first j of them for every j); a round takes at least the first
    while True:
        downs = [p for p in paths if plan.choice[p] != PRECISIONS[0]]
        tries = [{**plan.choice, p: _lower(plan.choice[p])} for p in downs]
        errors = errors_of(tries) if tries else []
        now = plan.measured
        fits = sorted(((path, choice, err) for path, choice, err in zip(downs, tries, errors) if err <= budget),
                      key=lambda f: ((f[2] ** 2 - now ** 2) / max(_saving(f[0], plan.choice[f[0]], weight_bytes), 1),
                                     -_saving(f[0], plan.choice[f[0]], weight_bytes)))
        if not fits:
            break
        together = [{**plan.choice, **{p: _lower(plan.choice[p]) for p, _, _ in fits[:j]}}
                    for j in range(2, len(fits) + 1)]
        measured_together = errors_of(together) if together else []
        taken = [(j + 2, c, e) for j, (c, e) in enumerate(zip(together, measured_together)) if e <= budget]
        n, plan.choice, measured = taken[-1] if taken else (1, fits[0][1], fits[0][2])
        plan.steps.append(step(measured))
        log(f"quant auto: {', '.join(p for p, _, _ in fits[:n])} down a step -> relative L2 {measured:.3g}")
    for precision in lower:
        err = uniform[precision]
        plan.uniform.append({"precision": precision, "weight_bytes": sum(weight_bytes[p][precision] for p in paths),
                             "rel_l2": err, "within_budget": err <= budget})
    cheaper = [u for u in plan.uniform if u["within_budget"] and u["weight_bytes"] < plan.steps[-1].weight_bytes]
    if cheaper:
        best = min(cheaper, key=lambda u: u["weight_bytes"])
        plan.choice = {p: best["precision"] for p in paths}
        plan.steps.append(step(best["rel_l2"]))
        log(f"quant auto: uniform {best['precision']} writes fewer bytes within the budget")
    return plan


def _lower(precision: str) -> str:
    return PRECISIONS[PRECISIONS.index(precision) - 1]


def _saving(path: str, current: str, weight_bytes) -> int:
    i = PRECISIONS.index(current)
    return 0 if i == 0 else weight_bytes[path][current] - weight_bytes[path][PRECISIONS[i - 1]]


def _best_step(choice: dict[str, str], sensitivity, weight_bytes) -> Optional[str]:
    """The layer whose next precision removes the most squared error per byte added (the first such, by path)."""
    best, best_gain = None, -math.inf
    for path, current in choice.items():
        if current == FULL:
            continue
        nxt = PRECISIONS[PRECISIONS.index(current) + 1]
        cost = max(weight_bytes[path][nxt] - weight_bytes[path][current], 1)
        gain = (sensitivity[path][current] ** 2 - sensitivity[path][nxt] ** 2) / cost
        if not math.isfinite(gain):  # a precision whose error isn't finite (NaN, inf): leave it first
            gain = math.inf
        if best is None or gain > best_gain:
            best, best_gain = path, gain
    return best


def describe(choice: dict[str, str]) -> str:
    """How many layers are at each precision, cheapest first: "1 int4, 3 int8"."""
    counts = {p: sum(c == p for c in choice.values()) for p in PRECISIONS}
    return ", ".join(f"{n} {p}" for p, n in counts.items() if n)

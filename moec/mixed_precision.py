"""--quant auto: per fused layer, the cheapest of int2 / int4 / int8 / full precision whose combined error on the
model's outputs stays within --accuracy-budget.

Sensitivity: each layer alone at each precision (every other layer at full precision), the outputs' relative L2
against the full-precision model on the compile's verification inputs. Choice, greedy: every layer starts at int2;
the step (one layer up one precision) that removes the most squared error per byte it adds is taken while the
predicted error (the root of the summed squares: layers' errors are treated as independent) is over the budget;
then the real combined error is measured, and more steps are taken while it is over. Full precision everywhere is
the original model, so a choice always exists. Then each layer, the biggest saving first, steps back down while
the measured error stays within the budget (the greedy climb can overshoot), and a uniform precision within the
budget that writes fewer bytes still replaces the result. The steps form the bytes-vs-error curve the report
keeps.

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


def choose(paths: list[str], weight_bytes: dict[str, dict[str, int]], error_of: Callable[[dict[str, str]], float],
           budget: float, log: Callable[[str], None] = lambda _: None) -> MixedPlan:
    """`error_of(choice)` measures the outputs' relative L2 with each layer at its precision (layers not named stay
    at full precision)."""
    sensitivity: dict[str, dict[str, float]] = {}
    for i, path in enumerate(paths):
        sensitivity[path] = {FULL: 0.0}
        for precision in PRECISIONS[:-1]:
            sensitivity[path][precision] = error_of({path: precision})
        log(f"quant auto: sensitivity of {path} ({i + 1}/{len(paths)}): "
            + ", ".join(f"{p} {sensitivity[path][p]:.3g}" for p in PRECISIONS[:-1]))
    plan = MixedPlan(budget, {p: PRECISIONS[0] for p in paths}, sensitivity, weight_bytes)

    def predicted(choice: dict[str, str]) -> float:
        return math.sqrt(sum(sensitivity[p][c] ** 2 for p, c in choice.items()))

    def step(measured: Optional[float] = None) -> Step:
        c = plan.choice
        return Step(tuple(c.items()), sum(weight_bytes[p][q] for p, q in c.items()), predicted(c), measured)

    while True:
        if predicted(plan.choice) <= budget:
            measured = error_of(plan.choice)
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
    # back down where the climb overshot: the layers whose step down saves most first
    for path in sorted(paths, key=lambda p: -_saving(p, plan.choice[p], weight_bytes)):
        while plan.choice[path] != PRECISIONS[0]:
            lower = {**plan.choice, path: PRECISIONS[PRECISIONS.index(plan.choice[path]) - 1]}
            measured = error_of(lower)
            if not measured <= budget:
                break
            plan.choice = lower
            plan.steps.append(step(measured))
            log(f"quant auto: {path} down to {lower[path]} -> relative L2 {measured:.3g}")
    for precision in PRECISIONS[:-1]:
        err = error_of({p: precision for p in paths})
        plan.uniform.append({"precision": precision, "weight_bytes": sum(weight_bytes[p][precision] for p in paths),
                             "rel_l2": err, "within_budget": err <= budget})
    cheaper = [u for u in plan.uniform if u["within_budget"] and u["weight_bytes"] < plan.steps[-1].weight_bytes]
    if cheaper:
        best = min(cheaper, key=lambda u: u["weight_bytes"])
        plan.choice = {p: best["precision"] for p in paths}
        plan.steps.append(step(best["rel_l2"]))
        log(f"quant auto: uniform {best['precision']} writes fewer bytes within the budget")
    return plan


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

"""Pass base class with stated contracts, the pass manager and translation validation.

A pass subclasses `Pass` and declares, as class attributes:
  - `name` (what --no-pass and the report call it);
  - `changes_numerics` (quantization): its error is recorded, not enforced;
  - `requires`: conditions earlier passes must have established (checked before it runs);
  - `ensures`: conditions it establishes (checked on the module after it runs).
`__call__(module, ctx) -> PassResult` may rewrite the module in place (replacing submodules) and
says whether it did, with typed per-layer outcomes (moec.passes.outcomes) and free-form details
for the report. A broken contract stops the compile with a PassContractError naming the pass and
the condition (onnx-ir's pass infrastructure is the model). With validation on, the manager runs
the model on fixed probe inputs before and after each pass and stops the compile, naming the
pass, when the outputs disagree beyond the tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn

from moec.errors import PassContractError, PassValidationError
from moec.numerics import ErrorStats, compare_tensors
from moec.passes.conditions import Condition
from moec.passes.outcomes import LayerOutcome
from moec.quant import WeightCodes


@dataclass
class PassResult:
    module: nn.Module
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerOutcome] = field(default_factory=list)  # what happened to each layer, typed


@dataclass
class PassContext:
    """What passes may read: probe inputs, options, a progress callback, what earlier passes established."""

    probes: Sequence[tuple]  # positional-argument tuples for the whole model
    options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None
    established: set[str] = field(default_factory=set)  # names of the conditions passes have ensured
    weight_codes: WeightCodes = field(default_factory=WeightCodes)  # pre-quantized weights' own codes
    calibration: Sequence[tuple] = ()  # --calibration inputs (moec.calibration), for passes that measure
    verification: Sequence[tuple] = ()  # the inputs the compile's numerics and --accuracy-budget are checked on
    budget_reference: Sequence = ()  # the outputs on `verification` that --accuracy-budget is measured against
    routing: list = field(default_factory=list)  # measure_routing's LayerRouting per fused layer


class Pass:
    """A rewrite of the torch module; subclasses set the class attributes and implement __call__."""

    name: ClassVar[str]
    changes_numerics: ClassVar[bool] = False
    requires: ClassVar[tuple[Condition, ...]] = ()
    ensures: ClassVar[tuple[Condition, ...]] = ()
    # True: the pass rewrites the task's graph module (a KV-cache decoder), not layers; an out-of-core compile,
    # which lowers layers on the meta model before the decoder exists, runs it on the decoder afterwards
    on_task_graph: ClassVar[bool] = False

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        raise NotImplementedError


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    validation: Optional[ErrorStats]
    details: dict[str, Any]  # the pass's details, with "layers": its outcomes as dicts (the report's form)
    layers: list[LayerOutcome] = field(default_factory=list)
    changes_numerics: bool = False
    ensures: tuple[str, ...] = ()  # the conditions the pass established

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "details": self.details,
        }


def run_model(module: nn.Module, probes: Sequence[tuple]) -> list:
    with torch.no_grad():
        return [module(*p) for p in probes]


class PassManager:
    """Runs passes in order; validates each against the graph before it."""

    def __init__(self, passes: Sequence[Pass], validate: bool = True, rel_l2_tol: float = 1e-4,
                 disabled: Sequence[Pass] = ()):
        self.passes = list(passes)
        self.disabled = list(disabled)  # switched off by the user (--no-pass): named when a contract needs them
        self.validate = validate
        self.rel_l2_tol = rel_l2_tol

    def run(self, module: nn.Module, ctx: PassContext,
            on_pass: Optional[Callable[[Pass, nn.Module], None]] = None) -> tuple[nn.Module, list[PassRecord]]:
        """Run the passes. A pass with `changes_numerics = True` (quantization) has its error
        recorded rather than enforced; `on_pass(pass, module)` sees the model after each pass."""
        records: list[PassRecord] = []
        before = run_model(module, ctx.probes) if self.validate else None
        for p in self.passes:
            self._check_requires(p, module, ctx)
            ctx.log(f"pass {p.name}")
            start = time.perf_counter()
            result = p(module, ctx)
            seconds = time.perf_counter() - start
            module = result.module
            self._check_ensures(p, module, ctx)
            stats = None
            if self.validate and result.modified:
                after = run_model(module, ctx.probes)
                stats = worst(compare_outputs(before, after))
                if not p.changes_numerics and not (stats.rel_l2 <= self.rel_l2_tol):
                    raise PassValidationError(
                        f"pass '{p.name}' changed the model's outputs on probe inputs: relative L2 error "
                        f"{stats.rel_l2:.3g} (max abs {stats.max_abs:.3g}) exceeds {self.rel_l2_tol:g}. "
                        "The rewrite is wrong for this model; rerun with --no-pass "
                        f"{p.name} to compile without it, and report the model."
                    )
                before = after
            details = {"layers": [o.to_dict() for o in result.layers], **result.details}
            records.append(PassRecord(p.name, result.modified, seconds, stats, details, result.layers,
                                      p.changes_numerics, tuple(c.name for c in p.ensures)))
            if on_pass is not None:
                on_pass(p, module)
        return module, records

    def _check_requires(self, p: Pass, module: nn.Module, ctx: PassContext) -> None:
        for c in p.requires:
            if c.name not in ctx.established:
                who = [q.name for q in self.passes if c in q.ensures]
                off = [q.name for q in self.disabled if c in q.ensures]
                how = (f"it is established by {', '.join(who)}, which must run first" if who else
                       f"it is established by {', '.join(off)}, disabled by --no-pass" if off else
                       "no pass in this compile establishes it")
                raise PassContractError(
                    f"pass '{p.name}' requires '{c.name}' ({c.meaning}), but no earlier pass established it: "
                    f"{how} (passes: {', '.join(q.name for q in self.passes)}).")
            problem = c.violation(module)
            if problem:
                raise PassContractError(f"pass '{p.name}' requires '{c.name}' ({c.meaning}), but {problem}.")

    def _check_ensures(self, p: Pass, module: nn.Module, ctx: PassContext) -> None:
        for c in p.ensures:
            problem = c.violation(module)
            if problem:
                raise PassContractError(f"pass '{p.name}' promises '{c.name}' ({c.meaning}), but after it ran "
                                        f"{problem}; the pass is wrong for this model, report it.")
            ctx.established.add(c.name)


def flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        values = out.values() if isinstance(out, dict) else out.to_tuple()
        return [t for v in values for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def compare_outputs(before: list, after: list) -> list[ErrorStats]:
    stats = []
    for b, a in zip(before, after):
        for tb, ta in zip(flatten_outputs(b), flatten_outputs(a)):
            stats.append(compare_tensors(tb, ta))
    return stats


def worst(stats: list[ErrorStats]) -> ErrorStats:
    if not stats:
        return ErrorStats(0.0, 0.0, 1.0)
    return max(stats, key=lambda s: (s.rel_l2 if s.rel_l2 == s.rel_l2 else float("inf")))

"""Pass protocol, pass manager and translation validation.

A pass is an object with a `name` and `__call__(module, ctx) -> PassResult`. It may
rewrite the module in place (replacing submodules) and says whether it did, plus
free-form details for the report. With validation on, the manager runs the model
on fixed probe inputs before and after each pass and stops the compile, naming
the pass, when the outputs disagree beyond the tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from moec.errors import PassValidationError
from moec.numerics import ErrorStats, compare_tensors


@dataclass
class PassResult:
    module: nn.Module
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may read: probe inputs, the target, options, a progress callback."""

    probes: Sequence[tuple]  # positional-argument tuples for the whole model
    target: str = "onnxruntime"
    options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None


class Pass(Protocol):
    name: str

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult: ...


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    validation: Optional[ErrorStats]
    details: dict[str, Any]

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

    def __init__(self, passes: Sequence[Pass], validate: bool = True, rel_l2_tol: float = 1e-4):
        self.passes = list(passes)
        self.validate = validate
        self.rel_l2_tol = rel_l2_tol

    def run(self, module: nn.Module, ctx: PassContext,
            on_pass: Optional[Callable[[str, nn.Module], None]] = None) -> tuple[nn.Module, list[PassRecord]]:
        """Run the passes. A pass with `changes_numerics = True` (quantization) has its error
        recorded rather than enforced; `on_pass(name, module)` sees the model after each pass."""
        records: list[PassRecord] = []
        before = run_model(module, ctx.probes) if self.validate else None
        for p in self.passes:
            ctx.log(f"pass {p.name}")
            start = time.perf_counter()
            result = p(module, ctx)
            seconds = time.perf_counter() - start
            module = result.module
            stats = None
            if self.validate and result.modified:
                after = run_model(module, ctx.probes)
                stats = worst(compare_outputs(before, after))
                if not getattr(p, "changes_numerics", False) and not (stats.rel_l2 <= self.rel_l2_tol):
                    raise PassValidationError(
                        f"pass '{p.name}' changed the model's outputs on probe inputs: relative L2 error "
                        f"{stats.rel_l2:.3g} (max abs {stats.max_abs:.3g}) exceeds {self.rel_l2_tol:g}. "
                        "The rewrite is wrong for this model; rerun with --no-pass "
                        f"{p.name} to compile without it, and report the model."
                    )
                before = after
            records.append(PassRecord(p.name, result.modified, seconds, stats, result.details))
            if on_pass is not None:
                on_pass(p.name, module)
        return module, records


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

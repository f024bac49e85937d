"""Memory plans for people: profiles from a model's dynamic dims, budgets, tables, pictures, fit checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


from moec.analysis.plan_memory import MemoryPlan, MemoryPlanError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str = "--device-memory") -> int:
    """'80GiB', '512MB', '1.5GiB', '1048576' -> bytes; `flag` names the option in the error."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MemoryPlanError(f"{flag}: cannot parse memory size '{text}': use a number with an optional unit "
                              "(B, KB, MB, GB, KiB, MiB, GiB, TiB), e.g. 80GiB or 512MB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def profiles_for(dynamic: dict[str, tuple[int, Optional[int]]], opt: dict[str, int],
                 overrides: Optional[dict[str, int]] = None) -> dict[str, dict[str, int]]:
    """min/opt/max from each dim's (min, max) range; `overrides` replaces max values."""
    overrides = overrides or {}
    maxes = {}
    for d, (_, hi) in dynamic.items():
        hi = overrides.get(d, hi)
        if hi is None:
            raise MemoryPlanError(f"dynamic dim '{d}' is unbounded: give it a maximum (--max-shape {d}=N) so "
                                  "the plan can say whether the model fits.")
        maxes[d] = int(hi)
    return {"min": {d: int(lo) for d, (lo, _) in dynamic.items()},
            "opt": {d: min(int(opt.get(d, lo)), maxes[d]) for d, (lo, _) in dynamic.items()},
            "max": maxes}


def source_profiles(dim_ranges: dict[str, tuple[int, Optional[int], int]], max_shape: Optional[dict[str, int]] = None,
                    derived: Optional[dict[str, tuple[str, ...]]] = None) -> dict[str, dict[str, int]]:
    """min/opt/max from a source's dim_ranges ((min, max, example) per dim; the example is opt), with --max-shape
    and each derived dim (a decoder's total = past + seq) set to the sum of its parts in every profile."""
    profiles = profiles_for({d: (lo, hi) for d, (lo, hi, _) in dim_ranges.items()},
                            {d: ex for d, (_, _, ex) in dim_ranges.items()}, max_shape)
    for dim, parts in (derived or {}).items():
        for p in profiles.values():
            if dim in p and all(d in p for d in parts):
                p[dim] = sum(p[d] for d in parts)
    return profiles


@dataclass
class FitResult:
    fits: bool
    total_bytes: int
    budget_bytes: int
    suggestions: list[str]

    @property
    def over_bytes(self) -> int:
        return self.total_bytes - self.budget_bytes


def fit_check(plan: MemoryPlan, budget: int, profile: str = "max", quantizable_bytes: int = 0,
              value_bytes: int = 4) -> FitResult:
    """`quantizable_bytes`: the expert weights --quant could shrink, at `value_bytes` a value (4: fp32, 2: fp16 /
    bf16 artifacts)."""
    p = plan.profiles[profile]
    if p.total_bytes <= budget:
        return FitResult(True, p.total_bytes, budget, [])
    tips = []
    if quantizable_bytes:
        for name, of_fp32 in (("int8", 0.26), ("int4", 0.14), ("int2", 0.08)):  # codes + per-row/block scales
            ratio = of_fp32 * 4 / value_bytes
            saved = quantizable_bytes * (1 - ratio)
            if p.total_bytes - saved <= budget:
                tips.append(f"--quant {name} (expert weights {human(quantizable_bytes)} -> "
                            f"{human(quantizable_bytes * ratio)}) fits")
                break
    floor = plan.profiles.get("min", p).dims
    for d in plan.dims:  # the largest max of one dim that fits: others at max, else at their min
        for others, how in ((p.dims, ""), (floor, " with the other dims at their minimum")):
            lo, hi = 0, p.dims[d]
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _estimate(plan, dict(others, **{d: mid})) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= p.dims[d]:  # d at its max fits once the others shrink: nothing to say about d itself
                break
            if lo >= max(floor.get(d, 1), 1):
                tips.append(f"max {d} = {lo} (instead of {p.dims[d]}){how} fits")
                break
    shards = -(-plan.weights_bytes // max(budget - (p.arena_bytes + p.workspace_bytes), 1))
    if budget > p.arena_bytes + p.workspace_bytes and shards > 1:
        tips.append(f"sharding the experts over {shards} devices fits the weights")
    return FitResult(False, p.total_bytes, budget, tips)


def largest_fitting(plan: MemoryPlan, dim: str, budget: int, profile: str = "max") -> int:
    """The largest value of `dim` (others as in `profile`) whose total fits `budget`; 0 if none."""
    p = plan.profiles[profile]
    lo, hi = 0, p.dims[dim]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _estimate(plan, dict(p.dims, **{dim: mid})) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _estimate(plan: MemoryPlan, dims: dict[str, int]) -> int:
    from moec.analysis.plan_memory import _pack

    return _pack(plan, dims, 64).total_bytes


def format_table(plan: MemoryPlan, top: int = 8) -> str:
    lines = [f"{'profile':<8} {'dims':<28} {'weights':>12} {'arena':>12} {'lower bound':>12} "
             f"{'workspace':>12} {'total':>12}"]
    for name, p in plan.profiles.items():
        dims = ", ".join(f"{k}={v}" for k, v in p.dims.items())
        lines.append(f"{name:<8} {dims:<28} {human(p.weights_bytes):>12} {human(p.arena_bytes):>12} "
                     f"{human(p.lower_bound_bytes):>12} {human(p.workspace_bytes):>12} {human(p.total_bytes):>12}")
    weights = ", ".join(f"{k} {human(v)}" for k, v in plan.weights_by_dtype.items())
    lines += ["", f"weights by dtype: {weights}", f"kernel workspace: {plan.workspace} bytes", ""]
    if "max" in plan.profiles:
        p = plan.profiles["max"]
        lines.append(f"largest tensors at max ({len(plan.tensors)} planned):")
        for t in sorted(plan.tensors, key=lambda t: -p.sizes[t.name])[:top]:
            lines.append(f"  {human(p.sizes[t.name]):>12}  {str(t.size):<22} live {t.start:>4}-{t.end:<4} "
                         f"@{human(p.offsets[t.name]):>11}  {t.name} ({t.producer.split(':')[0]})")
    return "\n".join(lines)


def render_plot(plan: MemoryPlan, profile: str, path: str) -> None:
    """Tensors as rectangles over time (node index) x arena offset, the biggest labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    p = plan.profiles[profile]
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    cmap = plt.get_cmap("tab20")
    scale = 2**20
    biggest = {t.name for t in sorted(plan.tensors, key=lambda t: -p.sizes[t.name])[:6]}
    for i, t in enumerate(plan.tensors):
        y, h = p.offsets[t.name] / scale, p.sizes[t.name] / scale
        ax.add_patch(Rectangle((t.start, y), max(t.end - t.start, 0.8), h, facecolor=cmap(i % 20),
                               edgecolor="black", linewidth=0.2, alpha=0.85))
        if t.name in biggest:
            ax.text(t.start + 0.5, y + h / 2, f"{t.name} {human(p.sizes[t.name])}", fontsize=7, va="center")
    ax.axhline(p.arena_bytes / scale, color="red", linestyle="--", linewidth=1)
    ax.axhline(p.lower_bound_bytes / scale, color="gray", linestyle=":", linewidth=1)
    ax.set_xlim(0, max((t.end for t in plan.tensors), default=1) + 1)
    ax.set_ylim(0, p.arena_bytes / scale * 1.05 or 1)
    ax.set_xlabel("execution order (node index)")
    ax.set_ylabel("arena offset (MiB)")
    dims = ", ".join(f"{k}={v}" for k, v in p.dims.items())
    ax.set_title(f"activation arena, profile '{profile}' ({dims}): {human(p.arena_bytes)} "
                 f"(red) vs lower bound {human(p.lower_bound_bytes)} (gray)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_MEASURE = r"""
import json, sys, numpy as np, onnxruntime as ort
path, feeds_path = sys.argv[1], sys.argv[2]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
feeds = dict(np.load(feeds_path))
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
sess.run(None, feeds)
print(json.dumps({"peak_delta": status("VmHWM") - before}))
"""


def measure_ort_peak(model_path: str, feeds: dict) -> int:
    """Bytes ONNX Runtime's process grows by while running `feeds` once (a fresh process; the
    session is created first, so weights are excluded; the high-water mark is reset before the run)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        np.savez(os.path.join(d, "feeds.npz"), **feeds)
        out = subprocess.run([sys.executable, "-c", _MEASURE, model_path, os.path.join(d, "feeds.npz")],
                             capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"])

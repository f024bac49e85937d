"""Routing statistics of fused MoE layers on calibration data.

Per layer and expert, over every calibration token the layer sees:
  - ``counts``: how many times the router picked the expert (a token counts once per slot);
  - ``mean_weight``: the mean routing weight it got when picked;
  - ``contribution``: the mean over *all* tokens of ``‖w · expert(x)‖`` (0 for tokens not routed to
    it): how much the expert adds to the layer's output per token, frequency and magnitude together.
    Ranking by it rather than by count is what published expert pruning does (an expert picked
    often with tiny weights or outputs matters less than one picked less often that moves the output).

Measured on the eager `FusedMoE` modules (after fuse_moe), with the layer's own routing, so the
statistics are the ones the compiled artifact would produce. Layers that see no calibration token
are listed with ``tokens == 0`` (the caller warns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from moec.moe_layer import FusedMoE
from moec.ops import experts_reference


@dataclass
class LayerRouting:
    path: str
    num_experts: int
    top_k: int
    n_group: int = 1
    tokens: int = 0
    counts: list[int] = field(default_factory=list)
    weight_sum: list[float] = field(default_factory=list)
    contribution_sum: list[float] = field(default_factory=list)

    def __post_init__(self):
        e = self.num_experts
        self.counts = self.counts or [0] * e
        self.weight_sum = self.weight_sum or [0.0] * e
        self.contribution_sum = self.contribution_sum or [0.0] * e

    @property
    def mean_weight(self) -> list[float]:
        return [w / c if c else 0.0 for w, c in zip(self.weight_sum, self.counts)]

    @property
    def contribution(self) -> list[float]:
        return [s / self.tokens if self.tokens else 0.0 for s in self.contribution_sum]

    @property
    def unused(self) -> list[int]:
        return [e for e, c in enumerate(self.counts) if c == 0]

    def to_dict(self) -> dict:
        return {"path": self.path, "num_experts": self.num_experts, "top_k": self.top_k, "n_group": self.n_group,
                "tokens": self.tokens, "counts": list(self.counts),
                "mean_weight": [round(w, 6) for w in self.mean_weight],
                "contribution": [float(f"{c:.6g}") for c in self.contribution]}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRouting":
        tokens = int(d["tokens"])
        return cls(d["path"], int(d["num_experts"]), int(d["top_k"]), int(d.get("n_group", 1)), tokens,
                   [int(c) for c in d["counts"]], [w * c for w, c in zip(d["mean_weight"], d["counts"])],
                   [c * tokens for c in d["contribution"]])


def measure_routing(module: nn.Module, batches: Sequence[tuple],
                    log: Callable[[str], None] = lambda m: None) -> list[LayerRouting]:
    """Run `module` on every batch and accumulate each FusedMoE layer's routing statistics."""
    stats: dict[str, LayerRouting] = {}
    handles = []
    for path, fused in module.named_modules():
        if not isinstance(fused, FusedMoE):
            continue
        r = fused.spec.route
        stats[path] = LayerRouting(path, fused.spec.experts.num_experts,
                                   r.top_k if r is not None else 0, r.n_group if r is not None else 1)

        def hook(mod, args, path=path):
            _accumulate(stats[path], mod, args[0])

        handles.append(fused.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                run_calibration_batch(module, batch, i)
                if len(batches) > 4 and (i + 1) % max(1, len(batches) // 4) == 0:
                    log(f"routing statistics: {i + 1}/{len(batches)} calibration batches")
    finally:
        for h in handles:
            h.remove()
    return list(stats.values())


def run_calibration_batch(module: nn.Module, batch: tuple, index: int):
    """The model on one calibration batch; its failure is the data's problem, said as such (exit 24)."""
    from moec.calibration import CalibrationError

    try:
        return module(*batch)
    except Exception as exc:
        shapes = ", ".join(str(list(t.shape)) for t in batch)
        raise CalibrationError(f"--calibration: the model fails on calibration batch {index} (shape {shapes}): "
                               f"{type(exc).__name__}: {str(exc)[:300]}. Check the data against the model's "
                               "inputs (vocabulary, sequence length).") from exc


def _accumulate(stats: LayerRouting, fused: FusedMoE, hidden: torch.Tensor) -> None:
    flat = hidden.reshape(-1, fused.spec.experts.hidden)
    ids, weights, _ = fused.routing(flat)
    if stats.top_k == 0:  # a kept router: its k is what it returns
        stats.top_k = int(ids.shape[1])
    x = fused.spec.experts
    stats.tokens += int(flat.shape[0])
    for e in torch.unique(ids).tolist():
        if not 0 <= e < stats.num_experts:
            continue
        token_idx, slot = torch.where(ids == e)
        w = weights[token_idx, slot].float()
        one = torch.zeros(len(token_idx), 1, dtype=torch.int64)
        y = experts_reference(flat[token_idx], one, w.unsqueeze(1), *_expert(fused, e),
                              x.activation, x.gated, x.alpha, x.beta, x.limit, x.weight_on_input)
        stats.counts[e] += len(token_idx)
        stats.weight_sum[e] += float(w.sum())
        stats.contribution_sum[e] += float(y.float().norm(dim=-1).sum())


def _expert(fused: FusedMoE, e: int) -> tuple:
    """Expert e's (w_gate_up, w_down, b_gate_up, b_down), each [1, ...]: read by the layer's stream when its
    experts are read one at a time (an out-of-core compile), else sliced from its stacks."""
    if fused.stream is not None:
        w = fused.stream.fetch(e)
        return w.w_gate_up, w.w_down, w.b_gate_up, w.b_down
    return (fused.w_gate_up[e:e + 1], fused.w_down[e:e + 1], None if fused.b_gate_up is None else
            fused.b_gate_up[e:e + 1], None if fused.b_down is None else fused.b_down[e:e + 1])


# ----------------------------------------------------------------------------- showing them


def format_table(layers: Sequence[LayerRouting]) -> str:
    """Per layer: tokens, experts never picked, and the spread of counts and contributions."""
    lines = [f"{'layer':<40} {'tokens':>7} {'experts':>7} {'unused':>6} {'count min/max':>14} "
             f"{'contrib min/max':>17}"]
    for l in layers:
        c = l.contribution
        lines.append(f"{l.path:<40} {l.tokens:>7} {l.num_experts:>7} {len(l.unused):>6} "
                     f"{min(l.counts):>6}/{max(l.counts):<7} {min(c):>8.3g}/{max(c):<8.3g}")
        order = sorted(range(l.num_experts), key=lambda e: c[e])
        lines.append("  lowest contribution: " + ", ".join(f"e{e} ({c[e]:.3g}, n={l.counts[e]})" for e in order[:4]))
    return "\n".join(lines)


def render_heatmap(layers: Sequence[LayerRouting], path: str, what: str = "contribution",
                   pruned: Optional[dict[str, Sequence[int]]] = None) -> None:
    """Layers x experts, colour = the statistic normalised per layer (share of the layer's total);
    experts `pruned` (path -> original indices) are crossed out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(l.num_experts for l in layers)
    grid = np.full((len(layers), width), np.nan)
    for i, l in enumerate(layers):
        values = np.asarray(l.contribution if what == "contribution" else l.counts, dtype=np.float64)
        total = values.sum()
        grid[i, : l.num_experts] = values / total if total > 0 else 0.0
    fig, ax = plt.subplots(figsize=(min(6 + width * 0.25, 30), 2 + len(layers) * 0.35), dpi=110)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [l.path for l in layers], fontsize=7)
    ax.set_xlabel("expert")
    for i, l in enumerate(layers):
        for e in (pruned or {}).get(l.path, ()):
            ax.text(e, i, "x", color="red", ha="center", va="center", fontsize=9, fontweight="bold")
    ax.set_title(f"routing {what}: share of each layer's total over {max(l.tokens for l in layers)} tokens"
                 + (" (x: pruned)" if pruned else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

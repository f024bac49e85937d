"""`moec inspect DIR --quant`: what each MoE layer was quantized to, and for --quant auto the bytes-vs-error
curve the choice was made from (a table, or a PNG plot)."""

from __future__ import annotations

from moec.mixed_precision import describe

MIB = 2**20


def format_table(quantization: dict) -> str:
    q = quantization
    lines = [f"{'layer':40s} {'precision':>9s} {'MiB fp32':>9s} {'MiB':>8s} {'layer rel L2':>12s}  method"]
    for l in q["layers"]:
        err = l.get("rel_l2_vs_fp32")
        lines.append(f"{l['path']:40s} {l['quantization']:>9s} {l['weight_bytes_fp32'] / MIB:9.3f} "
                     f"{l['weight_bytes_quantized'] / MIB:8.3f} {'-' if err is None else f'{err:.3g}':>12s}  "
                     f"{l.get('method', '')}")
    logits = q.get("logits_vs_fp32") or {}
    lines.append(f"total: {q['weight_bytes_fp32'] / MIB:.3f} MiB -> {q['weight_bytes_quantized'] / MIB:.3f} MiB; "
                 f"outputs vs fp32: relative L2 {logits.get('rel_l2', float('nan')):.3g}")
    auto = q.get("auto")
    if auto:
        lines += ["", f"--quant auto, budget {auto['budget']:g}: the search, cheapest first",
                  f"{'step':>4s} {'MiB':>9s} {'predicted':>10s} {'measured':>10s}  precisions"]
        for i, s in enumerate(auto["curve"]):
            measured = s.get("measured_rel_l2")
            lines.append(f"{i:4d} {s['weight_bytes'] / MIB:9.3f} {s['predicted_rel_l2']:10.3g} "
                         f"{'-' if measured is None else f'{measured:.3g}':>10s}  {describe(s['choice'])}")
        lines.append("uniform, for comparison:")
        for u in auto["uniform"]:
            lines.append(f"  {u['precision']:>5s} {u['weight_bytes'] / MIB:9.3f} MiB  relative L2 {u['rel_l2']:.3g}"
                         + ("" if u["within_budget"] else "  (over the budget)"))
    return "\n".join(lines)


def render_plot(quantization: dict, path: str) -> None:
    """Bytes against error: the auto search's states (predicted and measured), each uniform precision, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = quantization.get("auto")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if auto:
        curve = auto["curve"]
        ax.plot([s["weight_bytes"] / MIB for s in curve], [s["predicted_rel_l2"] for s in curve], ".-",
                color="tab:blue", label="auto search (predicted)")
        measured = [s for s in curve if s.get("measured_rel_l2") is not None]
        ax.plot([s["weight_bytes"] / MIB for s in measured], [s["measured_rel_l2"] for s in measured], "o",
                color="tab:green", label="measured")
        for u in auto["uniform"]:
            ax.plot(u["weight_bytes"] / MIB, u["rel_l2"], "s", color="tab:red")
            ax.annotate(f"uniform {u['precision']}", (u["weight_bytes"] / MIB, u["rel_l2"]), fontsize=8)
        ax.axhline(auto["budget"], color="gray", linestyle="--", label=f"budget {auto['budget']:g}")
    else:
        logits = quantization.get("logits_vs_fp32") or {}
        ax.plot(quantization["weight_bytes_quantized"] / MIB, logits.get("rel_l2", float("nan")), "o",
                label=quantization["spec"])
    if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_yscale("log")
    ax.set_xlabel("expert weights (MiB)")
    ax.set_ylabel("outputs vs fp32 (relative L2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Benchmark: `--quant auto --accuracy-budget X` against uniform int2 / int4 / int8, bytes and logits error, side by side.

For Qwen3-MoE, DeepSeek-V3 and Mixtral (transformers classes, the tiny configs of bench_calibrated_quant.py widened to
128, with 4 decoder layers so that layers can differ, random weights): `moec compile --task logits` at each uniform
precision (round-to-nearest, per row) and with --quant auto at each budget; per run the expert bytes written, the
relative L2 of the logits of the dequantized model against fp32 on the verification inputs, and for auto the
precision each layer got. The line to read: auto's bytes against the cheapest uniform precision within the same
budget.

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_quant_auto.py [--families qwen3_moe] [--budgets 0.05 0.1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_calibrated_quant import FAMILIES, WIDE  # noqa: E402

LAYERS = 4
UNIFORM = ("int2", "int4", "int8")


def run(family: str, quant: str, budget) -> dict:
    from moec.pipeline import CompileOptions, compile
    from moec.sources import causal_lm_source
    from moec.zoo import build_hf_model

    src = causal_lm_source(build_hf_model(family, num_hidden_layers=LAYERS, **{**WIDE, **FAMILIES[family]}), family)
    extra = {"quant": quant, "task": "logits"}
    if budget is not None:
        extra["accuracy_budget"] = budget
    with tempfile.TemporaryDirectory() as d:
        q = compile(src.module, src.example_args, src.dynamic_shapes,
                    options=CompileOptions(out=os.path.join(d, "a"), extra=extra)).report["quantization"]
    counts: dict[str, int] = {}
    for c in (q.get("auto") or {}).get("choice", {}).values():
        counts[c] = counts.get(c, 0) + 1
    return {"bytes": q["weight_bytes_quantized"], "fp32_bytes": q["weight_bytes_fp32"],
            "rel_l2": q["logits_vs_fp32"]["rel_l2"], "choice": counts}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for family in args.families:
        uniform = {p: run(family, p, None) for p in UNIFORM}
        for budget in args.budgets:
            auto = run(family, "auto", budget)
            within = [p for p in UNIFORM if uniform[p]["rel_l2"] <= budget]
            best = min(within, key=lambda p: uniform[p]["bytes"]) if within else None
            rows.append({"family": family, "budget": budget, "auto": auto, "uniform": uniform,
                         "cheapest_uniform_within": best,
                         "bytes_vs_cheapest_uniform": auto["bytes"] / uniform[best]["bytes"] if best else None,
                         "bytes_vs_int8": auto["bytes"] / uniform["int8"]["bytes"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'family':<12} {'budget':>6}  {'auto KiB':>8} {'auto err':>8}  {'choice':<22} {'uniform within':>14} "
          f"{'its KiB':>8}  {'auto/it':>7} {'auto/int8':>9}")
    for r in rows:
        a, best = r["auto"], r["cheapest_uniform_within"]
        choice = ", ".join(f"{n} {p}" for p, n in sorted(a["choice"].items()))
        its = f"{r['uniform'][best]['bytes'] / 1024:8.1f}" if best else f"{'-':>8}"
        ratio = f"{r['bytes_vs_cheapest_uniform']:7.2f}" if best else f"{'-':>7}"
        print(f"{r['family']:<12} {r['budget']:6.3g}  {a['bytes'] / 1024:8.1f} {a['rel_l2']:8.4f}  {choice:<22} "
              f"{best or 'none':>14} {its}  {ratio} {r['bytes_vs_int8']:9.2f}")
    for family in args.families:
        uniform = next(r["uniform"] for r in rows if r["family"] == family)
        print(f"uniform {family}: " + ", ".join(f"{p} {u['bytes'] / 1024:.1f} KiB at {u['rel_l2']:.4f}"
                                                for p, u in uniform.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

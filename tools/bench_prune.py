"""Benchmark: expert pruning, side by side in one run.

Quality (--part quality): Qwen3-MoE, DeepSeek-V3 and Mixtral built from small configs (real
transformers classes, random weights, 16 experts a layer), pruned 25% and 50% of every layer's
experts ranked by contribution (routing weight x ‖expert output‖), by count and at random. Experts
are ranked on calibration tokens and judged on *held-out* tokens: logits relative L2 and top-1
next-token agreement against the unpruned model, mean over model seeds. Weight matrices are drawn
from N(0, 0.02) (transformers' initializer_range; --std changes it): at moec's test scale (0.2) every
layer's output dwarfs the residual stream and any pruning scrambles the logits. Then `auto` against the
largest uniform fraction within the same budget, at budgets of 0.02, 0.05 and 0.1 (logits relative L2).

Speed (--part speed): the Qwen3-30B-A3B-shaped layer (H=2048, I=768, E=64, k=8) compiled to ONNX
Runtime's MoE op unpruned and pruned 25% / 50% (by contribution on random hidden states): expert
weight bytes and median ms at T=1 and T=128, 2 threads.

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_prune.py [--part quality|speed|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from moec.moe_layer import FusedMoE  # noqa: E402
from moec.passes.base import PassContext, PassManager  # noqa: E402
from moec.passes.fuse_moe import FuseMoE  # noqa: E402
from moec.passes.measure_routing import MeasureRouting  # noqa: E402
from moec.passes.prune_experts import (PruneExperts, distance, expert_bytes, first_outputs,  # noqa: E402
                                       layer_plan, pruned)

FAMILIES = {  # 16 routed experts a layer, 4 layers, H=128
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64),
    "deepseek_v3": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                        moe_intermediate_size=64, num_hidden_layers=4),
    "mixtral": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=64),
}
COMMON = dict(hidden_size=128, num_hidden_layers=4, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32)
FRACTIONS = (0.25, 0.5)
BUDGETS = (0.02, 0.05, 0.1)  # logits relative L2 on the calibration data
METHODS = ("contribution", "count", "random")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tokens(n: int, seq: int, vocab: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (8, seq), generator=g),) for _ in range(n // 8)]


def fused_model(family: str, seed: int, calibration: list[tuple], std: float):
    from moec.demo import randomize_
    from moec.sources import causal_lm_source
    from moec.zoo import build_hf_model

    overrides = {**COMMON, **FAMILIES[family]}
    if family == "deepseek_v3":
        overrides.update(head_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, kv_lora_rank=32,
                         q_lora_rank=48, num_key_value_heads=4)
    model = build_hf_model(family, seed, **overrides)
    randomize_(model, seed, std)  # matrices ~ N(0, std): 0.02 is transformers' initializer_range
    src = causal_lm_source(model, family)
    ctx = PassContext(probes=[src.example_args], calibration=calibration)
    module, _ = PassManager([FuseMoE(), MeasureRouting()], validate=False).run(src.module, ctx)
    return module, ctx.routing


def plans_for(module, routing, by: str):
    stats = {l.path: l for l in routing}
    return {p: layer_plan(m, stats[p], by, seed=i)
            for i, (p, m) in enumerate((p, m) for p, m in module.named_modules() if isinstance(m, FusedMoE))}


def quality(seeds: int, std: float) -> dict:
    rows = []
    auto_rows = []
    for family in FAMILIES:
        per = {}
        autos = []
        for seed in range(seeds):
            calib = tokens(64, 32, COMMON["vocab_size"], 1000 + seed)
            held_out = tokens(32, 32, COMMON["vocab_size"], 2000 + seed)
            module, routing = fused_model(family, seed, calib, std)
            ref = first_outputs(module, held_out)
            for fraction in FRACTIONS:
                for by in METHODS:
                    plans = plans_for(module, routing, by)
                    removed = {p: plan.removed(plan.units_for_fraction(fraction)) for p, plan in plans.items()}
                    with pruned(module, removed):
                        d = distance(ref, first_outputs(module, held_out))
                    per.setdefault((fraction, by), []).append(d)
            # auto vs the best uniform fraction at the same budgets (calibration data decides, held-out judges)
            plans = plans_for(module, routing, "contribution")
            calib_ref = first_outputs(module, calib)
            cache: dict = {}  # the sensitivities are measured once for all budgets
            for budget in BUDGETS:
                units, auto = PruneExperts().search(module, plans, calib_ref, calib, budget, lambda m: None, cache)
                with pruned(module, {p: plans[p].removed(n) for p, n in units.items()}):
                    held = distance(ref, first_outputs(module, held_out))
                autos.append({"seed": seed, "budget": budget, "auto_removed": auto["removed"],
                              "uniform_removed": auto["uniform_removed"], "chosen_from": auto["chosen_from"],
                              "experts": sum(p.num_experts for p in plans.values()), "auto_held_out": held.to_dict()})
            log(f"{family} seed {seed}: done")
        for (fraction, by), ds in per.items():
            rows.append({"family": family, "fraction": fraction, "by": by,
                         "rel_l2": statistics.mean(d.rel_l2 for d in ds),
                         "top1_agreement": statistics.mean(d.top1_agreement for d in ds)})
        auto_rows.append({"family": family, "runs": autos})
    return {"rows": rows, "auto": auto_rows}


def speed(reps: int) -> dict:
    from bench_fusion import H, THREADS, Flat, build_block, export, ort_session
    from moec.targets.onnxruntime.lower_moe_onnxruntime import LowerMoEForOnnxRuntime

    torch.set_num_threads(THREADS)
    scratch = tempfile.TemporaryDirectory(prefix="moec-prune-bench-")  # its ONNX files (GBs) go when the run ends
    tmp = scratch.name
    example = (torch.randn(8, H),)
    calib = [(torch.randn(128, H, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    variants = {}
    for fraction in (0.0, 0.25, 0.5):
        log(f"building pruned {fraction:.0%} ...")
        model = Flat(build_block()[0])
        ctx = PassContext(probes=[example], calibration=calib,
                          options={"prune_experts": fraction} if fraction else {})
        passes = [FuseMoE(), MeasureRouting()] + ([PruneExperts()] if fraction else [])
        model, _ = PassManager(passes, validate=False).run(model, ctx)
        fused = next(m for m in model.modules() if isinstance(m, FusedMoE))
        nbytes, experts = expert_bytes(fused), fused.spec.experts.num_experts
        model, _ = PassManager([LowerMoEForOnnxRuntime()], validate=False).run(model, ctx)
        path = os.path.join(tmp, f"pruned{int(fraction * 100)}.onnx")
        export(model, example, path)
        variants[fraction] = {"experts": experts, "expert_bytes": nbytes, "session": ort_session(path)}
    rows = []
    for t in (1, 128):
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(t)).numpy()
        times: dict = {f: [] for f in variants}
        for v in variants.values():  # warm-up
            v["session"].run(None, {"hidden": x})
        for _ in range(reps):  # interleaved call by call: every variant sees the same machine state
            for fraction, v in variants.items():
                start = time.perf_counter()
                v["session"].run(None, {"hidden": x})
                times[fraction].append(time.perf_counter() - start)
        row = {"tokens": t, **{f"{f:g}": round(statistics.median(ts) * 1e3, 3) for f, ts in times.items()},
               "min": {f"{f:g}": round(min(ts) * 1e3, 3) for f, ts in times.items()}}
        rows.append(row)
        log(json.dumps(row))
    return {"variants": {f"{f:g}": {"experts": v["experts"], "expert_bytes": v["expert_bytes"]}
                         for f, v in variants.items()}, "rows": rows}


def print_quality(q: dict) -> None:
    print("\nlogits relative L2 / top-1 next-token agreement vs the unpruned model, held-out tokens "
          "(mean over seeds; lower / higher is better)")
    print(f"{'family':<12} {'pruned':>6} " + " ".join(f"{m:>22}" for m in METHODS))
    by_key = {(r["family"], r["fraction"], r["by"]): r for r in q["rows"]}
    for family in FAMILIES:
        for fraction in FRACTIONS:
            cells = [by_key[(family, fraction, m)] for m in METHODS]
            print(f"{family:<12} {fraction:>6.0%} " + " ".join(
                f"{c['rel_l2']:>11.3f} / {c['top1_agreement']:>7.1%}" for c in cells))
    print("\nauto vs the largest uniform fraction at the same budget: experts removed (sum over seeds)")
    print(f"{'family':<12} " + " ".join(f"{'budget ' + format(b, 'g'):>18}" for b in BUDGETS))
    for a in q["auto"]:
        cells = []
        for b in BUDGETS:
            runs = [r for r in a["runs"] if r["budget"] == b]
            cells.append(f"{sum(r['auto_removed'] for r in runs):>4} vs {sum(r['uniform_removed'] for r in runs):>4}"
                         f" / {runs[0]['experts'] * len(runs):<4}")
        print(f"{a['family']:<12} " + " ".join(f"{c:>18}" for c in cells))


def print_speed(s: dict) -> None:
    print("\nQwen3-30B-A3B-shaped layer (E=64, k=8), ONNX Runtime MoE op, 2 threads, ms per call, interleaved")
    v = s["variants"]
    print(f"{'':>8} " + " ".join(f"{'pruned ' + k if k != '0' else 'unpruned':>14}" for k in v))
    print(f"{'experts':>8} " + " ".join(f"{v[k]['experts']:>14}" for k in v))
    print(f"{'MiB':>8} " + " ".join(f"{v[k]['expert_bytes'] / 2**20:>14.0f}" for k in v))
    for r in s["rows"]:
        print(f"{'T=' + str(r['tokens']):>8} " + " ".join(f"{r[k]:>7.2f} ({r['min'][k]:>5.2f})" for k in v))
    print("(median, min in brackets; the T=1 call reads k experts whatever E is, so pruning can't speed it up)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["quality", "speed", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--std", type=float, default=0.02,
                    help="std of the random weight matrices (0.02: transformers' initializer_range)")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = {}
    if args.part in ("quality", "all"):
        out["quality"] = quality(args.seeds, args.std)
        print_quality(out["quality"])
    if args.part in ("speed", "all"):
        out["speed"] = speed(args.reps)
        print_speed(out["speed"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

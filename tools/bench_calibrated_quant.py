"""Benchmark: calibrated (GPTQ) vs round-to-nearest expert quantization, logits error against fp32, side by side.

For Qwen3-MoE, DeepSeek-V3 and Mixtral (transformers classes, tiny configs widened to 128 so that blocks of 32
and 128 divide them, random weights), each at int4 block 32, int4 block 128 and int2 per row: `moec compile
--task logits --quant ...` without and with `--calibration random:64`, and the relative L2 of the logits of the
dequantized model against fp32 on the verification inputs (the report's quantization.logits_vs_fp32), the mean
of the MoE layers' own error on their inputs (quantization.layers[].rel_l2_vs_fp32), the ratios calibrated /
round-to-nearest, and what GPTQ chose per layer.

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_calibrated_quant.py [--families qwen3_moe mixtral]
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

WIDE = dict(hidden_size=128, head_dim=32, intermediate_size=256)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=128),
    "deepseek_v3": dict(moe_intermediate_size=128, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32),
    "mixtral": dict(intermediate_size=128),
}
SPECS = [("int4", 32), ("int4", 128), ("int2", None)]


def run(family: str, quant: str, block, calibration) -> dict:
    from moec.pipeline import CompileOptions, compile
    from moec.sources import causal_lm_source
    from moec.zoo import build_hf_model

    src = causal_lm_source(build_hf_model(family, **{**WIDE, **FAMILIES[family]}), family)
    extra = {"quant": quant, "block_size": block, "task": "logits"}
    if calibration:
        extra["calibration"] = calibration
    with tempfile.TemporaryDirectory() as d:
        r = compile(src.module, src.example_args, src.dynamic_shapes,
                    options=CompileOptions(out=os.path.join(d, "a"), extra=extra)).report["quantization"]
    layers = [l["rel_l2_vs_fp32"] for l in r["layers"] if l.get("rel_l2_vs_fp32") is not None]
    return {"rel_l2": r["logits_vs_fp32"]["rel_l2"], "layer_rel_l2": sum(layers) / max(len(layers), 1),
            "methods": [l.get("method", "") for l in r["layers"]]}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--calibration", default="random:64")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for family in args.families:
        for quant, block in SPECS:
            rtn = run(family, quant, block, None)
            cal = run(family, quant, block, args.calibration)
            rows.append({"family": family, "quant": quant, "block": block, "rtn": rtn["rel_l2"],
                         "calibrated": cal["rel_l2"], "ratio": cal["rel_l2"] / rtn["rel_l2"],
                         "layer_rtn": rtn["layer_rel_l2"], "layer_calibrated": cal["layer_rel_l2"],
                         "chosen": cal["methods"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'':<25} {'logits rel L2 vs fp32':^36}  {'MoE layer rel L2 (mean)':^36}")
    print(f"{'family':<12} {'quant':<12} {'nearest':>11} {'calibrated':>11} {'ratio':>12}  {'nearest':>11} "
          f"{'calibrated':>11} {'ratio':>12}")
    for r in rows:
        spec = f"{r['quant']} " + (f"b{r['block']}" if r["block"] else "row")
        print(f"{r['family']:<12} {spec:<12} {r['rtn']:11.4f} {r['calibrated']:11.4f} {r['ratio']:12.2f}  "
              f"{r['layer_rtn']:11.4f} {r['layer_calibrated']:11.4f} {r['layer_calibrated'] / r['layer_rtn']:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

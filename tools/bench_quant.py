"""Benchmark: quantized experts on the Qwen3-30B-A3B-shaped layer (H=2048, I=768, E=64, k=8), side by side.

Variants in one process, 2 threads: transformers eager fp32, moec fp32 (MoE), int8 per-row,
int8 block 32 (ORT quantizes activations there), int4 block 32 and 128 (QMoE), and int4 with
accuracy_level 4 (int8 activations), int2 per row and block 16 (exact) and block 32 / 128 (ORT's LUT
GEMM, which quantizes activations). For each: median ms,
the ratio to the bandwidth floor for *that precision's* bytes (packed codes + scales of the distinct
experts the tokens touch / measured copy bandwidth), and the error against fp32.

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_quant.py [--tokens 1 16 128 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_fusion import THREADS, Flat, H, I, K, bandwidth_gbs, build_block, export, ort_session, time_it  # noqa: E402
from moec.passes.base import PassContext, PassManager  # noqa: E402
from moec.passes.fuse_moe import FuseMoE  # noqa: E402
from moec.targets.onnxruntime.lower_moe_onnxruntime import LowerMoEForOnnxRuntime  # noqa: E402
from moec.targets.onnxruntime.lower_moe_qmoe import LowerMoEForQMoE  # noqa: E402
from moec.passes.quantize_experts import QuantizeExperts  # noqa: E402

VARIANTS = {  # name -> quant options (None: fp32 MoE)
    "fp32": None,
    "int8": {"quant": "int8"},
    "int8_b32": {"quant": "int8", "block_size": 32},
    "int4_b32": {"quant": "int4", "block_size": 32},
    "int4_b128": {"quant": "int4", "block_size": 128},
    "int4_b32_acc4": {"quant": "int4", "block_size": 32, "accuracy_level": 4},
    "int4_b128_acc4": {"quant": "int4", "block_size": 128, "accuracy_level": 4},
    "int2": {"quant": "int2"},  # per row: ORT dequantizes (exact)
    "int2_b16": {"quant": "int2", "block_size": 16},  # exact too
    "int2_b32": {"quant": "int2", "block_size": 32},  # ORT's LUT GEMM (quantizes activations)
    "int2_b128": {"quant": "int2", "block_size": 128},
}


def bytes_per_expert(options) -> float:
    weights = 3 * H * I
    if options is None:
        return weights * 4.0
    bits = int(options["quant"][3:])
    block = options.get("block_size")
    scales = 3 * H * I / block * 4 if block else (2 * I + H) * 4
    return weights * bits / 8 + scales


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="moec-qbench-")
    example = (torch.randn(8, H),)
    sessions = {}
    for name, opts in VARIANTS.items():
        log(f"building {name} ...")
        model = Flat(build_block()[0])
        passes = [FuseMoE()] + ([QuantizeExperts(), LowerMoEForQMoE()] if opts else [LowerMoEForOnnxRuntime()])
        model, _ = PassManager(passes, validate=False).run(model, PassContext(probes=[example], options=opts or {}))
        export(model, example, os.path.join(tmp, f"{name}.onnx"))
        sessions[name] = ort_session(os.path.join(tmp, f"{name}.onnx"))
        del model
    block, _ = build_block()
    bw = bandwidth_gbs()
    log(f"measured copy bandwidth: {bw:.1f} GB/s")
    rows = []
    for t in args.tokens:
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ref = block(x.unsqueeze(0)).squeeze(0).numpy()
            logits = block.gate(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            touched = int(torch.unique(torch.softmax(logits.float(), -1).topk(K, -1).indices).numel())
            row = {"tokens": t, "experts_touched": touched,
                   "eager_fp32": round(time_it(lambda: block(x.unsqueeze(0)), args.reps), 2)}
        feed = {"hidden": x.numpy()}
        for name, sess in sessions.items():
            ms = time_it(lambda: sess.run(None, feed), args.reps)
            got = sess.run(None, feed)[0]
            floor = touched * bytes_per_expert(VARIANTS[name]) / (bw * 1e9) * 1e3
            row[name] = {"ms": round(ms, 2), "floor_ms": round(floor, 2),
                         "rel_l2_vs_fp32": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
        rows.append(row)
        log(json.dumps(row))
    print(f"\nQwen3-30B-A3B-shaped layer, {THREADS} threads, median ms (x = ratio to that precision's "
          f"bandwidth floor at {bw:.1f} GB/s), error = relative L2 vs fp32 eager")
    print(f"{'T':>5} {'eager fp32':>11} " + " ".join(f"{n:>22}" for n in VARIANTS) + "  eager/int4_b32  eager/int4_b128_acc4")
    for r in rows:
        cells = [f"{r[n]['ms']:>8.1f} ({r[n]['ms'] / r[n]['floor_ms']:4.1f}x) {r[n]['rel_l2_vs_fp32']:.0e}"
                 for n in VARIANTS]
        print(f"{r['tokens']:>5} {r['eager_fp32']:>11.1f} " + " ".join(f"{c:>22}" for c in cells) +
              f"  {r['eager_fp32'] / r['int4_b32']['ms']:14.2f}  {r['eager_fp32'] / r['int4_b128_acc4']['ms']:14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gbs": bw, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: quantized experts on the Qwen3-30B-A3B-shaped layer (H=2048, I=768, E=64, k=8), side by side.

Variants in one process, 2 threads: transformers eager fp32, moec fp32 (MoE), int8 per-row,
int8 block 32 (ORT quantizes activations there), int4 block 32 and 128 (QMoE), and int4 with
accuracy_level 4 (int8 activations), int2 per row and block 16 (exact) and block 32 / 128 (ORT's LUT
GEMM, which quantizes activations); and calibrated (GPTQ) twins of int4 block 32 and int2 blocks of 16 and 32
(`_gptq`: calibrated on CALIBRATION_TOKENS Gaussian tokens, as the timed inputs are): the same format, so the
same bytes, and the timings say whether the kernels care which codes they run. For each: median ms, the ratio
to the bandwidth floor for *that precision's* bytes (packed codes + scales of the distinct experts the tokens
touch / measured copy bandwidth), and the error against fp32; and each variant's bytes per expert.

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_quant.py [--tokens 1 16 128 512] [--variants fp32 int4_b32 ...]
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
    "int4_b32_gptq": {"quant": "int4", "block_size": 32, "calibrated": True},
    "int2_b16_gptq": {"quant": "int2", "block_size": 16, "calibrated": True},
    "int2_b32_gptq": {"quant": "int2", "block_size": 32, "calibrated": True},
}
CALIBRATION_TOKENS = 4096  # 512 a expert on average (top-8 of 64): over min_tokens (256 at H=2048)


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
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="which to build and time (default: all); the eager ratio columns need int4_b32 and "
                         "int4_b128_acc4 among them")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants}
    torch.set_num_threads(THREADS)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    scratch = tempfile.TemporaryDirectory(prefix="moec-qbench-")  # its ONNX files (GBs) go when the run ends
    tmp = scratch.name
    example = (torch.randn(8, H),)
    calibration = [(torch.randn(CALIBRATION_TOKENS, H, generator=torch.Generator().manual_seed(99)),)]
    sessions = {}
    for name, opts in variants.items():
        log(f"building {name} ...")
        model = Flat(build_block()[0])
        passes = [FuseMoE()] + ([QuantizeExperts(), LowerMoEForQMoE()] if opts else [LowerMoEForOnnxRuntime()])
        options = {k: v for k, v in (opts or {}).items() if k != "calibrated"}
        ctx = PassContext(probes=[example], options=options,
                          calibration=calibration if (opts or {}).get("calibrated") else ())
        model, _ = PassManager(passes, validate=False).run(model, ctx)
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
    ratios = [n for n in ("int4_b32", "int4_b128_acc4") if n in variants]
    print(f"{'T':>5} {'eager fp32':>11} " + " ".join(f"{n:>22}" for n in variants)
          + "".join(f"  {'eager/' + n:>20}" for n in ratios))
    for r in rows:
        cells = [f"{r[n]['ms']:>8.1f} ({r[n]['ms'] / r[n]['floor_ms']:4.1f}x) {r[n]['rel_l2_vs_fp32']:.0e}"
                 for n in variants]
        print(f"{r['tokens']:>5} {r['eager_fp32']:>11.1f} " + " ".join(f"{c:>22}" for c in cells)
              + "".join(f"  {r['eager_fp32'] / r[n]['ms']:20.2f}" for n in ratios))
    per_expert = {n: bytes_per_expert(o) for n, o in variants.items()}
    print("KiB per expert: " + ", ".join(f"{n} {b / 1024:.0f}" for n, b in per_expert.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gbs": bw, "bytes_per_expert": per_expert, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

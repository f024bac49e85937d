"""Benchmark: one Qwen3-30B-A3B-shaped MoE layer (H=2048, I=768, E=64, k=8), side by side.

Variants, all in one process, interleaved per token count, 2 threads:
  eager      transformers' Qwen3MoeSparseMoeBlock, experts_implementation="eager"
  grouped    the same block with transformers' default CPU path ("grouped_mm")
  unfused    the ONNX a plain export gives without fusion: moec's exact dense fallback
             (every expert on every token), since the exportable transformers form
             (batched_mm) gathers a weight copy per token and needs T*k*6 MB
  batched    the batched_mm export itself, only where it fits in memory (T <= 16)
  fused      the moec artifact: one com.microsoft.MoE node
Reports median ms and the ratio to a memory-bandwidth floor measured on this machine
(bytes of the distinct experts the tokens touch / measured copy bandwidth).

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_fusion.py [--tokens 1 16 128 512] [--json out.json]
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

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from moec import targets  # noqa: E402
from moec.export_onnx import capture, save_onnx, to_onnx  # noqa: E402
from moec.passes.base import PassContext, PassManager  # noqa: E402
from moec.passes.fuse_moe import FuseMoE  # noqa: E402
from moec.passes.lowering import DenseMoE  # noqa: E402
from moec.targets.onnxruntime.lower_moe_onnxruntime import LowerMoEForOnnxRuntime  # noqa: E402

H, I, E, K = 2048, 768, 64, 8
THREADS = 2


def build_block(seed=0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True)
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return block, cfg


def bandwidth_gbs() -> float:
    """Sustained read+write bandwidth of a large copy, in GB/s (best of 5)."""
    a = np.ones(256 * 1024 * 1024 // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def time_it(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def export(module, example, path):
    dyn = ({0: torch.export.Dim("tokens", min=1, max=4096)},)
    save_onnx(to_onnx(capture(module, example, dyn), ["hidden"], ["out"], dyn, targets.get("onnxruntime").translations()), path)


class Flat(torch.nn.Module):
    """[T, H] in and out, so every variant sees the same tensor."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x.unsqueeze(0)).squeeze(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    log("building the layer ...")
    block, _ = build_block()
    expert_bytes = 3 * H * I * 4
    scratch = tempfile.TemporaryDirectory(prefix="moec-bench-")  # its ONNX files (GBs) go when the run ends
    tmp = scratch.name
    example = (torch.randn(8, H),)

    log("exporting the fused artifact ...")
    fused_model = Flat(block)
    fused_model, _ = PassManager([FuseMoE(), LowerMoEForOnnxRuntime()], validate=False).run(
        fused_model, PassContext(probes=[example]))
    export(fused_model, example, os.path.join(tmp, "fused.onnx"))
    log("exporting the unfused (dense) artifact ...")
    dense_model, _ = PassManager([FuseMoE()], validate=False).run(Flat(build_block()[0]), PassContext(probes=[example]))
    for name, mod in list(dense_model.named_modules()):
        if type(mod).__name__ == "FusedMoE":
            dense_model.block = DenseMoE(mod, "benchmark: unfused dense form")
    export(dense_model, example, os.path.join(tmp, "unfused.onnx"))
    del dense_model, fused_model
    batched_path = None
    if min(args.tokens) <= 16:
        log("exporting the batched_mm artifact ...")
        b2, _ = build_block()
        b2.experts.config._experts_implementation = "batched_mm"
        try:
            export(Flat(b2), (torch.randn(4, H),), os.path.join(tmp, "batched.onnx"))
            batched_path = os.path.join(tmp, "batched.onnx")
        except Exception as exc:  # report, don't hide
            log(f"batched_mm export failed: {exc}")
        del b2

    sessions = {"fused": ort_session(os.path.join(tmp, "fused.onnx")),
                "unfused": ort_session(os.path.join(tmp, "unfused.onnx"))}
    if batched_path:
        sessions["batched"] = ort_session(batched_path)
    bw = bandwidth_gbs()
    log(f"measured copy bandwidth: {bw:.1f} GB/s")

    rows = []
    for t in args.tokens:
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            logits = block.gate(x)[0] if isinstance(block.gate(x), tuple) else block.gate(x)
            ids = torch.softmax(logits.float(), -1).topk(K, -1).indices
        touched = int(torch.unique(ids).numel())
        floor_ms = touched * expert_bytes / (bw * 1e9) * 1e3
        row = {"tokens": t, "experts_touched": touched, "floor_ms": round(floor_ms, 2)}
        with torch.no_grad():
            for impl in ("eager", "grouped_mm"):
                block.experts.config._experts_implementation = impl
                row["eager" if impl == "eager" else "grouped"] = round(
                    time_it(lambda: block(x.unsqueeze(0)), args.reps), 2)
        feed = {"hidden": x.numpy()}
        for name, sess in sessions.items():
            if name == "batched" and t > 16:
                row[name] = None
                continue
            row[name] = round(time_it(lambda: sess.run(None, feed), args.reps), 2)
        ref = block(x.unsqueeze(0)).squeeze(0).detach().numpy()
        got = sessions["fused"].run(None, feed)[0]
        row["fused_rel_l2"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        rows.append(row)
        log(json.dumps(row))

    cols = ["eager", "grouped", "unfused", "batched", "fused"]
    print(f"\nQwen3-30B-A3B-shaped layer H={H} I={I} E={E} k={K}, {THREADS} threads, median ms "
          f"(x = ratio to bandwidth floor at {bw:.1f} GB/s)")
    print(f"{'T':>5} {'floor':>8} " + " ".join(f"{c:>16}" for c in cols) + "  fused/unfused  eager/fused")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>16}" if v is None else f"{v:>9.1f} ({v / r['floor_ms']:4.1f}x)")
        print(f"{r['tokens']:>5} {r['floor_ms']:>8.1f} " + " ".join(cells) +
              f"  {r['fused'] / r['unfused']:13.2f}  {r['eager'] / r['fused']:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gbs": bw, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

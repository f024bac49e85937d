"""Benchmark (GPU): the experts plugin's Triton kernels on the Qwen3-30B-A3B-shaped layer.

Layer: E=128 experts, top-8, H=2048, I=768, SwiGLU (Qwen3-30B-A3B's MoE block), bf16 activations.
Variants, side by side in one process: bf16 weights, int8 per row, int4 block 128 (dequantized
inside the kernels), each with the sorted two-kernel implementation (the JIT plugin's), the decode
kernels (moe_experts_decode.py, while T * k <= DecodeConfig.max_pairs) and the one-launch kernel
(the AOT plugin's, up to --one-launch-max tokens), and a PyTorch eager loop over the routed experts
(transformers' structure) in bf16. Each point is the best tile configuration,
timed as a CUDA-graph replay (triton.testing.do_bench_cudagraph, so host launch overhead is
excluded for the kernels; the eager loop synchronises and is timed with do_bench).

Reported per token count T:
- decode (T <= 16): achieved bandwidth = bytes of the distinct experts' weights (+ scales) the
  tokens touch / time, against the device-to-device copy bandwidth measured in the same run and
  the GPU's nominal HBM bandwidth;
- prefill (T >= 512): TFLOP/s = T * k * 6 * H * I / time, against a bf16 8192^3 matmul measured in
  the same run and the nominal dense bf16 peak.
Before timing, every variant is checked against the fp32 reference on the same inputs.

    python tools/bench_plugin_kernels.py [--tokens 1 2 4 8 16 512 2048] [--json out.json]

Needs a CUDA GPU (exits 2 with the reason otherwise).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

E, K, H, I = 128, 8, 2048, 768
NOMINAL = {  # device name fragment -> (HBM GB/s, dense bf16 TFLOP/s), from NVIDIA's data sheets (SXM)
    "H100": (3350.0, 989.0),
    "H200": (4800.0, 989.0),
}


def nominal_peaks(name: str):
    for frag, peaks in NOMINAL.items():
        if frag in name:
            return peaks
    return None, None


def measured_copy_gbs() -> float:
    import triton.testing as tt

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * n / ms / 1e6


def measured_matmul_tflops() -> float:
    import triton.testing as tt

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=5, rep=100)
    return 2 * 8192 ** 3 / ms / 1e9


def make_layer(seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).to(torch.bfloat16)
    return w1, w2


def make_tokens(t: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(1000 + seed)
    x = torch.randn(t, H, device="cuda", generator=g).to(torch.bfloat16)
    logits = torch.randn(t, E, device="cuda", generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, -1)
    return x, ids, w


def pack(w: torch.Tensor, bits: int, block):
    """moec's quantizer (CPU), as a PackedExpertWeight on the GPU."""
    from moec.plugins.moe_experts_triton import PackedExpertWeight
    from moec.quant import QuantSpec, pack as pack_q, quantize

    q = quantize(w.float().cpu(), QuantSpec(bits, block, True), "w")
    p = pack_q(q)
    return PackedExpertWeight(torch.from_numpy(p.weight).cuda(), q.scales.cuda(), None, bits, w.shape[2])


def weight_bytes(w) -> int:
    from moec.plugins.moe_experts_triton import PackedExpertWeight

    if isinstance(w, PackedExpertWeight):
        return w.codes.numel() + w.scales.numel() * w.scales.element_size()
    return w.numel() * w.element_size()


def eager_loop(x, ids, w, w1, w2):
    """transformers' MoE structure: a loop over the experts that received tokens, in bf16."""
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, E).permute(2, 1, 0)
    for e in torch.nonzero(mask.sum((-1, -2)) > 0).flatten().tolist():
        slot, tok = torch.where(mask[e])
        gate, up = (x[tok] @ w1[e].T).chunk(2, -1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out.index_add_(0, tok, y * w[tok, slot, None].to(y.dtype))
    return out


def profile(fn) -> None:
    """The CUDA kernels of one call and their device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as prof

    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 512, 1024, 2048, 4096])
    ap.add_argument("--json")
    ap.add_argument("--configs", type=int, nargs="*", help="indices into TILE_CONFIGS (default: all; the "
                    "decode kernels always try all of DECODE_CONFIGS)")
    ap.add_argument("--one-launch-max", type=int, default=512,
                    help="largest T to time the one-launch (AOT) kernel at (it does up to E/k x the FLOPs)")
    ap.add_argument("--profile", action="store_true", help="print the kernels' share of the best point per T")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_plugin_kernels needs a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    import triton.testing as tt
    from triton.runtime.errors import OutOfResources

    from moec.ops import experts_reference
    from moec.plugins.moe_experts_fused import FUSED_CONFIGS, moe_experts_fused
    from moec.plugins.moe_experts_triton import DECODE_CONFIGS, TILE_CONFIGS, DecodeConfig, moe_experts_triton

    name = torch.cuda.get_device_name()
    nominal_bw, nominal_tf = nominal_peaks(name)
    copy_gbs, mm_tflops = measured_copy_gbs(), measured_matmul_tflops()
    print(f"{name}: copy {copy_gbs:.0f} GB/s (nominal {nominal_bw}), bf16 matmul {mm_tflops:.0f} TFLOP/s "
          f"(nominal {nominal_tf})", flush=True)
    w1, w2 = make_layer()
    variants = {"bf16": (w1, w2), "int8": (pack(w1, 8, None), pack(w2, 8, None)),
                "int4_b128": (pack(w1, 4, 128), pack(w2, 4, 128))}
    configs = [TILE_CONFIGS[i] for i in args.configs] if args.configs else TILE_CONFIGS
    rows = []
    for t in args.tokens:
        x, ids, w = make_tokens(t, t)
        active = int(torch.unique(ids).numel())
        impls = {"sorted": (moe_experts_triton, configs)}
        if t * K <= DecodeConfig.max_pairs:
            impls["decode"] = (moe_experts_triton, DECODE_CONFIGS)
        if t <= args.one_launch_max:
            impls["one-launch"] = (moe_experts_fused, FUSED_CONFIGS)
        for (vname, (a, b)), (impl, (op, op_configs)) in itertools.product(variants.items(), impls.items()):
            dq = [p if isinstance(p, torch.Tensor) else p.dequantize().to(torch.bfloat16) for p in (a, b)]
            ref = experts_reference(x.float(), ids, w, dq[0].float(), dq[1].float(), None, None, "silu", True,
                                    1.0, 0.0, float("inf"), False)
            best = None
            for cfg in op_configs:
                fn = lambda: op(x, ids, w, a, b, config=cfg)  # noqa: E731
                try:
                    got = fn().float()
                except OutOfResources:  # tile too large for this GPU's shared memory
                    continue
                err = float((got - ref).norm() / ref.norm())
                if err > 2e-2:
                    raise SystemExit(f"{vname} {impl} T={t} {cfg}: relative L2 {err:.3g} against the fp32 reference")
                ms = tt.do_bench_cudagraph(fn, rep=50)
                if best is None or ms < best[0]:
                    best = (ms, cfg, err)
            ms, cfg, err = best
            if args.profile:
                profile(lambda: op(x, ids, w, a, b, config=cfg))
            per_expert = (weight_bytes(a) + weight_bytes(b)) / E
            moved = active * per_expert
            row = {"tokens": t, "variant": vname, "impl": impl, "ms": ms, "rel_l2_vs_fp32_of_same_weights": err,
                   "config": cfg.__dict__, "active_experts": active, "bytes": moved,
                   "gb_s": moved / ms / 1e6, "tflops": t * K * 6 * H * I / ms / 1e9}
            row["of_copy_bw"] = row["gb_s"] / copy_gbs
            row["of_nominal_bw"] = row["gb_s"] / nominal_bw if nominal_bw else None
            row["of_matmul"] = row["tflops"] / mm_tflops
            row["of_nominal_tflops"] = row["tflops"] / nominal_tf if nominal_tf else None
            rows.append(row)
            print(f"T={t:5d} {vname:10s} {impl:10s} {ms * 1e3:9.1f} us  {row['gb_s']:7.0f} GB/s "
                  f"({row['of_copy_bw']:.0%} of copy, {row['of_nominal_bw'] or 0:.0%} of nominal)  "
                  f"{row['tflops']:6.1f} TFLOP/s ({row['of_matmul']:.0%} of matmul)  err {err:.1e}  "
                  f"{'x'.join(str(v) for v in cfg.__dict__.values())}", flush=True)
        fn = lambda: eager_loop(x, ids, w, w1, w2)  # noqa: E731
        ms = tt.do_bench(fn, rep=50)  # host-synchronising (.tolist()), so not graph-capturable
        rows.append({"tokens": t, "variant": "eager_bf16", "ms": ms})
        kern = min((r for r in rows if r["tokens"] == t and r["variant"] == "bf16"), key=lambda r: r["ms"])
        print(f"T={t:5d} eager bf16 {ms * 1e3:9.1f} us  (bf16 kernels {ms / kern['ms']:.1f}x faster)", flush=True)
    result = {"device": name, "copy_gb_s": copy_gbs, "matmul_tflops": mm_tflops, "nominal_gb_s": nominal_bw,
              "nominal_tflops": nominal_tf, "layer": {"E": E, "k": K, "H": H, "I": I}, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the compiler makes of the decode kernels (no GPU needed): registers, spills, load widths.

Cross-compiles both decode launches for Qwen3-30B-A3B's MoE layer (E=128, k=8, H=2048, I=768) at T
tokens, for every DecodeConfig candidate and weight format, for Hopper (sm_90) and Blackwell
(sm_100), and prints per kernel: programs in the grid, registers per thread, spilled bytes (stack
+ local memory, where ptxas spills registers), shared memory, the weight bytes one loop trip of one
program requests, and how many bytes the PTX's 16-byte loads fetch per trip. This is static evidence, not a timing: the timings come from
tools/bench_plugin_kernels.py on a GPU.

    python tools/inspect_kernels.py [--tokens 1] [--sm 90 100] [--weights float int8 int4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--sm", type=int, nargs="+", default=[90, 100])
    ap.add_argument("--weights", nargs="+", default=["float", "int8", "int4"], choices=["float", "int8", "int4"])
    ap.add_argument("--configs", type=int, nargs="*", help="indices into DECODE_CONFIGS (default: all)")
    ap.add_argument("--json", help="write the facts here ('-' for stdout, instead of the table)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("inspect_kernels: unset TRITON_INTERPRET (the compiler does not run under the interpreter)",
              file=sys.stderr)
        return 2
    from moec.plugins.inspect_kernels import inspect_decode
    from moec.plugins.moe_experts_triton import DECODE_CONFIGS

    picked = args.configs if args.configs is not None else range(len(DECODE_CONFIGS))
    rows = []
    for sm in args.sm:
        for weights in args.weights:
            for i in picked:
                cfg = DECODE_CONFIGS[i]
                for facts in inspect_decode(weights, args.tokens, cfg, sm):
                    rows.append(dict(weights=weights, config=i, config_fields=asdict(cfg), **asdict(facts),
                                     vector_load_bytes=facts.vector_load_bytes_per_iteration))
                    if args.json is None:
                        print(_line(rows[-1], header=len(rows) == 1))
    if args.json:
        text = json.dumps(rows, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def _line(r: dict, header: bool) -> str:
    programs = 1
    for g in r["grid"]:
        programs *= g
    line = (f"sm_{r['sm']:<4}{r['weights']:<7}{r['config']:>3}  {r['kernel']:<14}{programs:>8}{r['registers']:>6}"
            f"{r['spilled_bytes']:>7}{r['shared_bytes']:>8}{r['weight_bytes_per_iteration']:>10}"
            f"{r['vector_load_bytes']:>10}")
    if header:
        head = (f"{'sm':<7}{'weights':<7}{'cfg':>3}  {'kernel':<14}{'programs':>8}{'regs':>6}{'spill':>7}{'smem':>8}"
                f"{'w B/iter':>10}{'16B-ld B':>10}")
        return head + "\n" + line
    return line


if __name__ == "__main__":
    sys.exit(main())

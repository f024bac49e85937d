"""Benchmark: planning time for a synthetic 2,000-node graph with dynamic batch and sequence dims.

    .venv/bin/python tools/bench_plan_memory.py [--nodes 2000]
Also prints, for the built-in demo compiled to --out, the plan against what ONNX Runtime's
process actually grows by during one run (tools-only: it compiles and runs the model).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moec.passes.plan_memory import plan_memory


def synthetic(nodes: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    ops, prev, names = [], "x", ["x"]
    for i in range(nodes):
        kind = i % 4
        out = f"t{i}"
        if kind == 0:
            ops.append(helper.make_node("MatMul", [prev, "w"], [out]))
        elif kind == 1:
            ops.append(helper.make_node("Add", [prev, names[max(0, len(names) - 7)]], [out]))
        elif kind == 2:
            ops.append(helper.make_node("Relu", [prev], [out]))
        else:
            ops.append(helper.make_node("Mul", [prev, names[max(0, len(names) - 3)]], [out]))
        names.append(out)
        prev = out
    g = helper.make_graph(ops, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--reality", action="store_true", help="also compare the demo's plan with ORT")
    args = ap.parse_args(argv)
    model = synthetic(args.nodes)
    profiles = {"min": {"batch": 1, "seq": 1}, "opt": {"batch": 4, "seq": 128}, "max": {"batch": 32, "seq": 4096}}
    t = time.perf_counter()
    plan = plan_memory(model, profiles)
    dt = time.perf_counter() - t
    p = plan.profiles["max"]
    print(f"{args.nodes} nodes, {len(plan.tensors)} tensors, 3 profiles: planned in {dt:.2f} s "
          f"(max: arena {p.arena_bytes / 2**20:.1f} MiB, lower bound {p.lower_bound_bytes / 2**20:.1f} MiB)")
    if args.reality:
        from moec.memory import measure_ort_peak
        from moec.pipeline import CompileOptions, compile

        out = os.path.join(tempfile.mkdtemp(), "demo")
        compile(source=None, options=CompileOptions(out=out, extra={"max_shape": {"seq": 512}}))
        path = os.path.join(out, "model.onnx")
        for b, s in ((1, 128), (8, 256), (8, 512)):
            pl = plan_memory(onnx.load(path), {"at": {"batch": b, "seq": s}}).profiles["at"]
            measured = measure_ort_peak(path, {"input_ids": np.zeros((b, s), np.int64)})
            planned = pl.arena_bytes + pl.workspace_bytes
            print(f"demo batch={b} seq={s}: planned arena {pl.arena_bytes / 2**20:.1f} MiB + workspace "
                  f"{pl.workspace_bytes / 2**20:.1f} MiB = {planned / 2**20:.1f} MiB; ORT process grew "
                  f"{measured / 2**20:.1f} MiB ({measured / planned:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: planning time for a synthetic 2,000-node graph with dynamic batch and sequence dims.

    .venv/bin/python tools/bench_plan_memory.py [--nodes 2000]
Also prints, for the built-in demo compiled to --out, the plan against what ONNX Runtime's
process actually grows by during one run (tools-only: it compiles and runs the model).

    .venv/bin/python tools/bench_plan_memory.py --weights-cost [--weight-mib 1024]
What planning costs in memory against the model's weights: a chain of MatMuls holding WEIGHT_MIB of
fp32 weights in external data is planned in a child process, once as moec plans (graph loaded without
its weights, probes on the weightless copy) and once probing with the real weights; peak RSS over the
child's baseline, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moec.analysis.plan_memory import plan_memory


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


WEIGHTS_CHILD = r"""
import json, sys, onnx, onnxruntime
from moec.analysis.plan_memory import plan_memory
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
path, with_weights = sys.argv[1], sys.argv[2] == "1"
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the high-water mark from here on is the planner's
model = onnx.load(path, load_external_data=with_weights)
plan = plan_memory(model, {"max": {"batch": 4, "seq": 64}}, with_weights=with_weights)
print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM"), "arena": plan.profiles["max"].arena_bytes,
                  "weights": plan.weights_bytes}))
"""


def weighted_chain(weight_mib: int, path: str, layers: int = 8) -> int:
    """[batch, seq, H] through `layers` MatMul+Relu with [H, H] weights; returns the weight bytes."""
    h = int((weight_mib * 2**20 / 4 / layers) ** 0.5)
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((h, h), dtype=np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        prev = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", h])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", "seq", h])], inits)
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path,
                    save_as_external_data=True, location=os.path.basename(path) + ".data")
    return layers * h * h * 4


def weights_cost(weight_mib: int) -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="moec-plan-"), "chain.onnx")
    weights = weighted_chain(weight_mib, path)
    rows = {}
    for label, flag in (("moec (weightless probes)", "0"), ("probing with the weights", "1")):
        out = subprocess.run([sys.executable, "-c", WEIGHTS_CHILD, path, flag], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[label] = (r["peak_kb"] - r["base_kb"]) * 1024
    print(f"planning a graph with {weights / 2**20:.0f} MiB of fp32 weights (peak RSS over the process baseline):")
    for label, extra in rows.items():
        print(f"  {label:<26} {extra / 2**20:8.1f} MiB  ({extra / weights:.2f} x weights)")
    a, b = rows.values()
    print(f"  ratio: {b / max(a, 2**20):.0f}x less memory without the weights")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--reality", action="store_true", help="also compare the demo's plan with ORT")
    ap.add_argument("--weights-cost", action="store_true", help="only: planning memory vs weight bytes")
    ap.add_argument("--weight-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.weights_cost:
        weights_cost(args.weight_mib)
        return 0
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

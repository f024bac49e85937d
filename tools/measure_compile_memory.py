"""Peak resident memory of a whole `moec compile`, relative to the model's weight bytes.

Compiles a Mixtral-style model with ~0.8 GB of fp32 weights (built by a factory, as a user's
SOURCE would be, so moec owns the only reference to it) in a child process and reports
the baseline RSS of a process that has only imported torch, transformers and onnxruntime, the
RSS once the model is built, and the peak from the first pass to the end of verification
(the high-water mark is reset after loading), as a multiple of the weight bytes over baseline.

    .venv/bin/python tools/measure_compile_memory.py [--hidden 1024 --inter 2048 --layers 4 --experts 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FACTORY = r"""
import json, os
from transformers import MixtralConfig, MixtralForCausalLM
from moec.demo import randomize_
from moec.sources import causal_lm_source

def make():
    a = json.loads(os.environ["MOEC_MEM_PARAMS"])
    cfg = MixtralConfig(vocab_size=1024, hidden_size=a["hidden"], intermediate_size=a["inter"],
                        num_hidden_layers=a["layers"], num_attention_heads=8, num_key_value_heads=4,
                        num_local_experts=a["experts"], num_experts_per_tok=2, max_position_embeddings=512)
    model = MixtralForCausalLM(cfg).eval()
    randomize_(model, 0, std=0.02)
    return causal_lm_source(model, "memory-benchmark")
"""

CHILD = r"""
import json, os, resource, sys, time
import torch, transformers, onnxruntime, onnx  # the baseline imports
a = json.loads(os.environ["MOEC_MEM_PARAMS"])
if a["mode"] == "baseline":
    print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})); sys.exit(0)
from moec.pipeline import CompileOptions, compile

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

marks = {}
def log(msg):
    # The first message after loading: reset the high-water mark, so the peak we read at the
    # end is moec's (passes, capture, export, verification), not the model's construction.
    if "running passes" in msg and "loaded" not in marks:
        marks["load_peak_kb"] = status("VmHWM")
        marks["loaded_kb"] = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
t = time.perf_counter()
res = compile(source="membench_model:make", options=CompileOptions(out=a["out"], log=log))
print(json.dumps({"rss_kb": status("VmHWM"), "weights": res.report["weights_bytes"], **marks,
                  "seconds": time.perf_counter() - t, "passed": res.report["numerics"]["passed"]}))
"""


def run(mode: str, params: dict, workdir: str) -> dict:
    env = dict(os.environ, MOEC_MEM_PARAMS=json.dumps({**params, "mode": mode}),
               PYTHONPATH=os.pathsep.join(filter(None, [workdir, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="moec-mem-")
    with open(os.path.join(workdir, "membench_model.py"), "w") as f:
        f.write(FACTORY)
    params = {"hidden": args.hidden, "inter": args.inter, "layers": args.layers, "experts": args.experts,
              "out": os.path.join(workdir, "artifact")}
    base = run("baseline", params, workdir)
    full = run("compile", params, workdir)
    w = full["weights"]
    mib = lambda kb: kb / 1024  # noqa: E731
    extra = (full["rss_kb"] - base["rss_kb"]) * 1024
    print(f"weights {w / 2**20:.0f} MiB fp32 | baseline RSS (imports) {mib(base['rss_kb']):.0f} MiB | "
          f"after loading {mib(full['loaded_kb']):.0f} MiB (peak while transformers built it "
          f"{mib(full['load_peak_kb']):.0f}) | peak from passes to verification {mib(full['rss_kb']):.0f} MiB "
          f"= baseline + {extra / w:.2f} x weights | {full['seconds']:.0f} s, verified={full['passed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

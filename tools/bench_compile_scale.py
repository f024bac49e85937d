"""Benchmark: `moec compile` on real-sized MoE checkpoints (real configs, random bf16 weights).

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_compile_scale.py [--models granite-1b granite-3b]
        [--workdir DIR] [--keep]

For each model: writes a Hugging Face checkpoint with `save_pretrained` (bf16 safetensors, random
weights from the real config; reused when DIR already has it), then runs `moec compile DIR` in a child
process and reports wall time, peak resident memory over the child's baseline (a process that has
only imported torch, transformers, onnx and onnxruntime), the artifact's bytes and whether it verified,
side by side in one run. A compile the kernel kills for memory is reported as such, with the peak it
reached. Needs disk: about 2x the checkpoint's bf16 bytes plus the fp32 artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# The public configs' shapes (hidden, intermediate, layers, heads, kv heads, experts, top-k, vocab).
MODELS = {
    "granite-1b": dict(family="granitemoe", hidden_size=1024, intermediate_size=512, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8,
                       vocab_size=49155, tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=6.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, max_position_embeddings=4096),
    "granite-3b": dict(family="granitemoe", hidden_size=1536, intermediate_size=512, num_hidden_layers=32,
                       num_attention_heads=24, num_key_value_heads=8, num_local_experts=40, num_experts_per_tok=8,
                       vocab_size=49155, tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=6.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, max_position_embeddings=4096),
}

WRITE = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
spec = json.loads(sys.argv[2])
family = spec.pop("family")
config = AutoConfig.for_model(family, **spec)
torch.manual_seed(0)
with torch.device("cpu"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.02)
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
"""

CHILD = r"""
import json, os, sys, time
import torch, transformers, onnx, onnxruntime  # the baseline
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from moec.cli import main
t = time.perf_counter()
rc = main(["compile", sys.argv[1], "--out", sys.argv[2], "--quiet"])
print(json.dumps({"rc": rc, "base_kb": base, "peak_kb": status("VmHWM"), "seconds": time.perf_counter() - t}))
"""


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def run_model(name: str, workdir: str, keep: bool) -> dict:
    ckpt, out = os.path.join(workdir, name), os.path.join(workdir, name + ".artifact")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        print(f"[{name}] writing the checkpoint", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", WRITE, ckpt, json.dumps(MODELS[name])], check=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{name}] compiling ({_dir_bytes(ckpt) / 2**30:.2f} GiB checkpoint)", file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_WAIT_POLICY="passive", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ckpt, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak_seen = 0
    while proc.poll() is None:  # the child's own report is lost if the kernel kills it: watch from here too
        try:
            peak_seen = max(peak_seen, next(int(l.split()[1]) for l in open(f"/proc/{proc.pid}/status")
                                            if l.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    row = {"model": name, "checkpoint_bytes": _dir_bytes(ckpt), "seconds": time.perf_counter() - t}
    if proc.returncode != 0 and not stdout.strip():
        row.update(status=f"killed (signal {-proc.returncode})" if proc.returncode < 0 else f"exit {proc.returncode}",
                   peak_kb=peak_seen, error=stderr.strip().splitlines()[-1:] if stderr.strip() else [])
    else:
        r = json.loads(stdout.strip().splitlines()[-1])
        row.update(status="verified" if r["rc"] == 0 else f"exit {r['rc']}", peak_over_base_kb=r["peak_kb"] - r["base_kb"],
                   artifact_bytes=_dir_bytes(out) if os.path.isdir(out) else 0)
        if os.path.isdir(out):
            with open(os.path.join(out, "report.json")) as f:
                report = json.load(f)
            row["timings_s"] = report["timings_s"]
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["granite-1b"], choices=list(MODELS))
    ap.add_argument("--workdir", default=None, help="where checkpoints and artifacts go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="moec-scale-")
    rows = [run_model(m, workdir, args.keep) for m in args.models]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12} {'ckpt GiB':>9} {'status':<16} {'wall s':>7} {'peak over base GiB':>19} {'artifact GiB':>13}")
    for r in rows:
        peak = r.get("peak_over_base_kb", r.get("peak_kb", 0)) / 2**20
        print(f"{r['model']:<12} {r['checkpoint_bytes'] / 2**30:9.2f} {r['status']:<16} {r['seconds']:7.0f} "
              f"{peak:19.2f} {r.get('artifact_bytes', 0) / 2**30:13.2f}")
        if r.get("timings_s"):
            print("  stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["timings_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Optimum's peer run for tools/bench_generate.py, executed by .venv-optimum's python (tools/setup_optimum.sh).

Exports a Hugging Face directory with `optimum-cli export onnx --task text-generation-with-past` (once),
then runs greedy generation through Optimum's own runtime (`ORTModelForCausalLM`), timed as
bench_generate times transformers eager: prefill = one new token, decode = the rest. Prints one JSON line:
{"tokens": [[...]], "prefill_s": .., "decode_s": .., "export_s": ..}.

    .venv-optimum/bin/python tools/optimum_generate.py HF_DIR ONNX_DIR IDS.npy NEW_TOKENS THREADS
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import time_generate  # noqa: E402  (numpy and torch only: both venvs have them)


def as_transformers4(hf: str, out: str) -> str:
    """A view of a checkpoint saved by transformers 5 that transformers 4.x reads: the same weights and
    tokenizer (links), config.json with the 4.x names of renamed fields added (num_experts,
    rope_theta)."""
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    if "num_local_experts" in cfg and "num_experts" not in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    view = out.rstrip("/") + "-hf4"
    os.makedirs(view, exist_ok=True)
    for name in os.listdir(hf):
        if name != "config.json" and not os.path.exists(os.path.join(view, name)):
            os.symlink(os.path.abspath(os.path.join(hf, name)), os.path.join(view, name))
    with open(os.path.join(view, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return view


def main() -> int:
    hf, out, ids_path, new, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    export_s = 0.0
    if not os.path.exists(os.path.join(out, "model.onnx")):
        t = time.perf_counter()
        cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
        r = subprocess.run([cli, "export", "onnx", "--model", as_transformers4(hf, out), "--task",
                            "text-generation-with-past", out], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"optimum-cli export failed: {r.stderr.strip()[-1500:]}")
        export_s = time.perf_counter() - t
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(out, session_options=so, provider="CPUExecutionProvider")
    tokens, prefill, decode = time_generate(model, np.load(ids_path), new)
    print(json.dumps({"tokens": tokens, "prefill_s": prefill, "decode_s": decode, "export_s": export_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

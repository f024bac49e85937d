"""Benchmark: `moec compile` on real-sized MoE checkpoints (real configs, random bf16 weights), and `moec plan`
on the configs of models too big to hold (Kimi-K2, DeepSeek-V3).

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_compile_scale.py [--models granite-1b granite-3b olmoe-7b
        gpt-oss-20b-mxfp4 qwen3-30b-a3b-gptq qwen3-30b-a3b-gptq-dense qwen3-30b-a3b-gptq-dense-calibrated
        granite-1b-pruned granite-1b-pruned-int4
        granite-1b-int4-dense granite-1b-int4-dense-calibrated granite-1b-s1-int4-dense
        granite-1b-s1-int4-dense-calibrated granite-1b-s1-int4-dense-calibrated-512 granite-1b-s1-int4
        granite-1b-s1-auto granite-1b-s1-auto-calibrated granite-1b-s1-pruned-auto-calibrated granite-1b-fp16
        granite-1b-bf16]
        [--modes on off] [--plans kimi-k2 deepseek-v3] [--workdir DIR] [--keep]

For each model: writes a Hugging Face checkpoint (bf16 safetensors, random N(0, 0.02) weights from the real
config, one shard per layer in the family's on-disk layout, written a layer at a time; reused when DIR
already has it; gpt-oss-20b-mxfp4 stores its experts as GPT-OSS's MXFP4 blocks and scales, qwen3-30b-a3b-gptq
its experts and attention as GPTQ int4), then runs
`moec compile DIR --task logits [the model's flags: olmoe-7b is --quant int4, qwen3-30b-a3b-gptq-dense
--quant-dense over qwen3-30b-a3b-gptq's checkpoint]`
in a child process, out of core (--modes on, streamed) and/or in memory (off), and reports wall time, peak
resident memory over the child's baseline (a process that has only imported torch, transformers, onnx and
onnxruntime), the bound the out-of-core compile is held to (2x the artifact's largest decoder layer + 1.5
GiB), the artifact's bytes and its verification (worst layer and logits relative L2), side by side in one
run. A compile the kernel kills for memory is reported as such, with the peak it reached. Needs disk: the
checkpoint plus the artifact.

For each plan: writes the model's config.json (as published: Kimi-K2's model_type "kimi_k2" with remote-code
auto_map, both with their fp8 quantization_config) and runs `moec plan DIR --max-shape batch=1,seq=4096,past=4096
--device-memory 80GiB --json` in a child process: wall time, peak resident memory over the same baseline,
and what the plan found.
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
_GRANITE_1B = dict(family="granitemoe", hidden_size=1024, intermediate_size=512, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8,
                   vocab_size=49155, tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=6.0,
                   residual_multiplier=0.22, attention_multiplier=0.015625, max_position_embeddings=4096)
MODELS = {
    "granite-1b": _GRANITE_1B,
    "granite-3b": dict(family="granitemoe", hidden_size=1536, intermediate_size=512, num_hidden_layers=32,
                       num_attention_heads=24, num_key_value_heads=8, num_local_experts=40, num_experts_per_tok=8,
                       vocab_size=49155, tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=6.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, max_position_embeddings=4096),
    "olmoe-7b": dict(family="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                     vocab_size=50304, max_position_embeddings=4096, norm_topk_prob=False, tie_word_embeddings=False,
                     flags=["--quant", "int4"]),
    # gpt-oss-20b's config with its experts stored as the published checkpoint stores them (MXFP4 blocks and
    # E8M0 scales, exponents 119-122: |w| up to ~0.1); 2 of its 24 layers, as much as the disk here holds
    # beside the fp32 artifact (its 201088-token embeddings and head are 4.3 GiB in fp32 by themselves)
    "gpt-oss-20b-mxfp4": dict(family="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=2,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                              num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
                              max_position_embeddings=131072, tie_word_embeddings=False, swiglu_limit=7.0,
                              rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "truncate": False, "rope_theta": 150000,
                                               "original_max_position_embeddings": 4096},
                              mxfp4=[119, 122]),
    # Qwen3-30B-A3B's config with its Linears stored as GPTQ int4 (groups of 128, symmetric, GPTQ's original
    # layout, as Qwen's own -GPTQ-Int4 checkpoint): experts and attention quantized, the router, norms,
    # embeddings and head bf16; 4 of its 48 layers (the disk here holds the fp32 embeddings and head besides)
    "qwen3-30b-a3b-gptq": dict(family="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                               moe_intermediate_size=768, num_hidden_layers=4, num_attention_heads=32,
                               num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                               vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True,
                               tie_word_embeddings=False, rope_theta=1000000.0, gptq=[4, 128]),
    # the same checkpoint with --quant-dense: its attention's own GPTQ codes and the head (bf16 in the
    # checkpoint, round-to-nearest) as MatMulNBits instead of fp32
    "qwen3-30b-a3b-gptq-dense": dict(checkpoint="qwen3-30b-a3b-gptq", flags=["--quant-dense"]),
    # ... and with 64 random calibration sequences (512 tokens; GPTQ needs 256 at width 2048): the attention keeps
    # the checkpoint's codes, the 1.2 GiB fp32 head is calibrated a block of rows at a time within the bound
    "qwen3-30b-a3b-gptq-dense-calibrated": dict(checkpoint="qwen3-30b-a3b-gptq", flags=[
        "--quant-dense", "--calibration", "random:64"]),
    # granite-1b's checkpoint with a quarter of each layer's experts pruned (ranked on 16 random calibration
    # sequences carried through the model a layer at a time), and the same with calibrated int4 experts
    "granite-1b-pruned": dict(checkpoint="granite-1b", flags=["--calibration", "random:16", "--prune-experts", "0.25"]),
    "granite-1b-pruned-int4": dict(checkpoint="granite-1b", flags=["--calibration", "random:16", "--prune-experts",
                                                                   "0.25", "--quant", "int4"]),
    # granite-1b's checkpoint with int4 experts and int4 dense Linears (MatMulNBits), rounded to nearest, and the
    # same with 16 random calibration sequences carried a layer at a time: 128 tokens, too few for GPTQ at width
    # 1024 in the decoder layers, so every expert and layer Linear falls back to round-to-nearest (reported); the
    # head, solved on all 128, gets GPTQ's codes where they win
    "granite-1b-int4-dense": dict(checkpoint="granite-1b", flags=["--quant", "int4", "--quant-dense"]),
    "granite-1b-int4-dense-calibrated": dict(checkpoint="granite-1b", flags=["--quant", "int4", "--quant-dense",
                                                                             "--calibration", "random:16"]),
    # granite-1b's config with every weight matrix's singular values falling as i^-1 (moec.demo.shape_spectrum_:
    # correlated hidden states, as trained models have; seeded Gaussian weights give isotropic ones, where GPTQ
    # has nothing to exploit), then the same two compiles
    "granite-1b-s1": dict(_GRANITE_1B, spectrum=1.0),
    "granite-1b-s1-int4-dense": dict(checkpoint="granite-1b-s1", flags=["--quant", "int4", "--quant-dense"]),
    "granite-1b-s1-int4-dense-calibrated": dict(checkpoint="granite-1b-s1", flags=[
        "--quant", "int4", "--quant-dense", "--calibration", "random:16"]),
    # 512 random sequences (4096 tokens): GPTQ needs at least an eighth of a matrix's input width in tokens
    # (128 for granite's 1024), per expert (each gets about a quarter of them at top-8 of 32) and in the 4/5
    # it fits on; random:16 (128 tokens) leaves every expert and layer Linear rounded to nearest, and says so
    "granite-1b-s1-int4-dense-calibrated-512": dict(checkpoint="granite-1b-s1", flags=[
        "--quant", "int4", "--quant-dense", "--calibration", "random:512"]),
    # --quant auto out of core on the correlated checkpoint, beside uniform int4 (one run): each layer's precision
    # chosen within 3e-5 of the fp32 logits (its random experts add little to the residual stream: int2 everywhere
    # moves the logits by 6e-5, int4 by about 2e-5), measured a pass over the checkpoint at a time
    "granite-1b-s1-int4": dict(checkpoint="granite-1b-s1", flags=["--quant", "int4"]),
    "granite-1b-s1-auto": dict(checkpoint="granite-1b-s1", flags=["--quant", "auto", "--accuracy-budget", "3e-5"]),
    # ... and with GPTQ's codes at each precision (128 random sequences: 1024 tokens, about 256 an expert at top-8 of
    # 32, over the 128 GPTQ needs at width 1024), solved a layer at a time before the search
    "granite-1b-s1-auto-calibrated": dict(checkpoint="granite-1b-s1", flags=[
        "--quant", "auto", "--accuracy-budget", "3e-5", "--calibration", "random:128"]),
    # ... and pruned by a quarter first (ranked on the same data), the search measuring the pruned model; the budget
    # bounds the pruning's distance from the unpruned model and the quantization's from the pruned one, each alone
    "granite-1b-s1-pruned-auto-calibrated": dict(checkpoint="granite-1b-s1", flags=[
        "--prune-experts", "0.25", "--quant", "auto", "--accuracy-budget", "1e-3", "--calibration", "random:128"]),
    # granite-1b's checkpoint to fp16 and bf16 artifacts (bf16: the checkpoint's own bits, verified widened to fp32)
    "granite-1b-fp16": dict(checkpoint="granite-1b", flags=["--dtype", "fp16"]),
    "granite-1b-bf16": dict(checkpoint="granite-1b", flags=["--dtype", "bf16"]),
}

# config.json as the model repositories publish them (the keys moec reads; the rest are defaults)
_DEEPSEEK = dict(architectures=["DeepseekV3ForCausalLM"], hidden_size=7168, intermediate_size=18432,
                 moe_intermediate_size=2048, num_hidden_layers=61, n_shared_experts=1, kv_lora_rank=512,
                 q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc",
                 num_experts_per_tok=8, moe_layer_freq=1, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
                 rms_norm_eps=1e-06, tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False,
                 quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]})
PLANS = {
    "deepseek-v3": dict(_DEEPSEEK, model_type="deepseek_v3", vocab_size=129280, num_attention_heads=128,
                        num_key_value_heads=128, n_routed_experts=256, routed_scaling_factor=2.5, n_group=8,
                        topk_group=4, first_k_dense_replace=3, max_position_embeddings=163840, rope_theta=10000,
                        bos_token_id=0, eos_token_id=1),
    "kimi-k2": dict(_DEEPSEEK, model_type="kimi_k2", vocab_size=163840, num_attention_heads=64, num_key_value_heads=64,
                    n_routed_experts=384, routed_scaling_factor=2.827, n_group=1, topk_group=1,
                    first_k_dense_replace=1, max_position_embeddings=131072, rope_theta=50000.0,
                    bos_token_id=163584, eos_token_id=163585,
                    auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                              "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}),
}

WRITE = r"""
import json, os, sys, torch
from safetensors.torch import save_file
from transformers import AutoConfig
from transformers.core_model_loading import revert_weight_conversion
from moec.external_data import layer_key
from moec.lazy_checkpoint import LazyCheckpoint, decoder_layers
# One layer at a time, in the checkpoint's own on-disk layout (transformers' conversion reverted: per-expert
# tensors where the family stores them so), so that writing a model never holds more than a layer either.
path, spec = sys.argv[1], json.loads(sys.argv[2])
family = spec.pop("family")
spec.pop("flags", None)
mxfp4 = spec.pop("mxfp4", None)  # [lowest, highest] E8M0 exponent: stacked experts stored as MXFP4
gptq = spec.pop("gptq", None)  # [bits, group]: the experts' and attention's Linears stored as GPTQ (v1 layout)
spectrum = spec.pop("spectrum", 0.0)  # singular values of every weight matrix falling as i^-spectrum
config = AutoConfig.for_model(family, **spec)
os.makedirs(path, exist_ok=True)
config.save_pretrained(path)
model = LazyCheckpoint.skeleton(None, config)
names = [n for n, _ in model.named_parameters()]  # tied parameters once
groups = {}
for n in names:
    groups.setdefault(layer_key(n), []).append(n)
params = dict(model.named_parameters())
gen = torch.Generator().manual_seed(0)
weight_map, files, total, nbytes = {}, list(groups), 0, 0
def random_weight(shape):
    t = torch.randn(shape, generator=gen) * 0.02
    if spectrum and t.dim() >= 2:
        from moec.demo import shape_spectrum_
        shape_spectrum_(torch.nn.ParameterList([torch.nn.Parameter(t, requires_grad=False)]), spectrum)
    return t.to(torch.bfloat16)
def is_mxfp4(n):
    return mxfp4 is not None and n.endswith(("experts.gate_up_proj", "experts.down_proj"))
def is_gptq(n, dims):
    return gptq is not None and dims >= 2 and (".mlp.experts." in n or ".self_attn." in n)
for i, key in enumerate(files):
    state = {n: torch.zeros(params[n].shape, dtype=torch.bfloat16) if is_gptq(n, params[n].dim()) else
             random_weight(params[n].shape) for n in groups[key] if not is_mxfp4(n)}
    total += sum(t.numel() for t in state.values())
    state = {k: v.contiguous() for k, v in revert_weight_conversion(model, state).items()}
    for n in [n for n in state if is_gptq(n, state[n].dim())]:  # per Linear [N, K] -> qweight [K/8, N], ...
        rows, k = state.pop(n).shape
        bits, group = gptq
        per, prefix = 32 // bits, n[: -len(".weight")]
        state[prefix + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (k // per, rows), generator=gen,
                                                   dtype=torch.int32)
        zero = sum(((1 << (bits - 1)) - 1) << (bits * j) for j in range(per))  # 2^(bits-1), stored minus one
        state[prefix + ".qzeros"] = torch.full((k // group, rows // per), zero, dtype=torch.int32)
        state[prefix + ".scales"] = (torch.rand(k // group, rows, generator=gen) * 0.002 + 0.002).half()
        state[prefix + ".g_idx"] = (torch.arange(k) // group).to(torch.int32)
    for n in filter(is_mxfp4, groups[key]):  # the model's [E, K, N]; stored [E, N, K/32, 16] and [E, N, K/32]
        e, k, rows = params[n].shape
        state[n + "_blocks"] = torch.randint(0, 256, (e, rows, k // 32, 16), generator=gen, dtype=torch.uint8)
        state[n + "_scales"] = torch.randint(mxfp4[0], mxfp4[1] + 1, (e, rows, k // 32), generator=gen,
                                             dtype=torch.uint8)
        total += e * k * rows
    nbytes += sum(t.numel() * t.element_size() for t in state.values())
    file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    save_file(state, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({k: file for k in state})
    print(f"  wrote {key or 'embeddings/head'} ({i + 1}/{len(files)})", file=sys.stderr, flush=True)
if mxfp4 is not None:  # as the published GPT-OSS checkpoints say it
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
if gptq is not None:  # as Qwen's -GPTQ-Int4 checkpoints say it
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": gptq[0], "group_size": gptq[1], "desc_act": False,
                                  "sym": True, "checkpoint_format": "gptq"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, f, indent=1)
print(json.dumps({"params": total}))
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
if sys.argv[2] == "--plan":
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["plan", sys.argv[1], "--max-shape", "batch=1,seq=4096,past=4096", "--device-memory", "80GiB",
                   "--json", "--quiet"])
    plan = json.loads(buf.getvalue()) if rc == 0 else None
    print(json.dumps({"rc": rc, "base_kb": base, "peak_kb": status("VmHWM"), "seconds": time.perf_counter() - t,
                      "plan": plan}))
    sys.exit(0)
rc = main(["compile", sys.argv[1], "--out", sys.argv[2], "--task", "logits", "--out-of-core", sys.argv[3]]
          + json.loads(sys.argv[4]))
print(json.dumps({"rc": rc, "base_kb": base, "peak_kb": status("VmHWM"), "seconds": time.perf_counter() - t}))
"""


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def largest_layer_bytes(model_path: str) -> int:
    """The artifact's largest decoder layer, in bytes of weights (external data lengths and inline tensors)."""
    import onnx

    from moec.external_data import layer_key

    model = onnx.load(model_path, load_external_data=False)
    per: dict[str, int] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        n = int(ext["length"]) if "length" in ext else len(t.raw_data)
        key = layer_key(t.name)
        if key:
            per[key] = per.get(key, 0) + n
    return max(per.values(), default=0)


def run_model(name: str, workdir: str, keep: bool, mode: str) -> dict:
    source = MODELS[name].get("checkpoint", name)  # an entry that compiles another's checkpoint with its own flags
    ckpt, out = os.path.join(workdir, source), os.path.join(workdir, name + ".artifact")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        print(f"[{name}] writing the checkpoint", file=sys.stderr, flush=True)
        # its output to stderr: stdout is --json's
        subprocess.run([sys.executable, "-c", WRITE, ckpt, json.dumps(MODELS[source])], check=True, stdout=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{name}] compiling ({_dir_bytes(ckpt) / 2**30:.2f} GiB checkpoint), out of core {mode}", file=sys.stderr,
          flush=True)
    env = dict(os.environ, OMP_WAIT_POLICY="passive", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t = time.perf_counter()
    flags = MODELS[name].get("flags", [])
    log_path = os.path.join(workdir, f"{name}.{mode}.log")  # the compile's progress, to follow a long one
    print(f"[{name}] its log: {log_path}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, ckpt, out, mode, json.dumps(flags)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    peak_seen = 0
    while proc.poll() is None:  # the child's own report is lost if the kernel kills it: watch from here too
        try:
            peak_seen = max(peak_seen, next(int(l.split()[1]) for l in open(f"/proc/{proc.pid}/status")
                                            if l.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.5)
    stdout, _ = proc.communicate()
    with open(log_path) as f:
        stderr = f.read()
    row = {"model": name, "out_of_core": mode, "flags": " ".join(flags), "checkpoint_bytes": _dir_bytes(ckpt), "seconds": time.perf_counter() - t}
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
            layer = largest_layer_bytes(os.path.join(out, "model.onnx"))
            row.update(largest_layer_bytes=layer, bound_bytes=2 * layer + int(1.5 * 2**30),
                       worst_layer_rel_l2=max((l["rel_l2"] for l in report["numerics"].get("layers", [])), default=None),
                       logits_rel_l2=report["numerics"]["inputs"][0]["rel_l2"])
            quant = report.get("quantization") or {}
            if quant.get("logits_vs_fp32"):  # the quantized artifact's own error, against the checkpoint at fp32
                row["quantized_logits_vs_fp32"] = quant["logits_vs_fp32"]["rel_l2"]
                dense = (quant.get("dense") or {}).get("layers", [])
                kinds = [l.get("method", "").split(" (")[0] or "round-to-nearest" for l in dense]
                row["dense_methods"] = {m: kinds.count(m) for m in sorted(set(kinds))}
            auto = quant.get("auto")
            if auto:  # --quant auto: what it chose, the bytes it writes, and what measuring it took
                row["auto"] = {"choice": {p: list(auto["choice"].values()).count(p)
                                          for p in sorted(set(auto["choice"].values()))},
                               "weight_bytes": auto["weight_bytes"], "measured_rel_l2": auto["measured_rel_l2"],
                               "passes": auto.get("passes"), "uniform": auto["uniform"]}
            pruning = report.get("pruning")
            if pruning:
                row["pruning"] = {k: pruning[k] for k in ("experts_before", "experts_after", "weight_bytes_before",
                                                          "weight_bytes_after", "vs_unpruned")}
            whole = report["numerics"].get("end_to_end")  # out of core only (in memory: one session anyway)
            if whole is not None:
                row["end_to_end"] = ({"rel_l2": whole["rel_l2"], "child_peak_bytes": whole["peak_rss_bytes"]}
                                     if whole.get("ran") else {"not_run": whole.get("why", "")})
            stages = report.get("compile_memory") or {}
            if stages.get("peak_rss_bytes_after"):  # absolute; the baseline is subtracted for the table
                row["peak_stage"] = stages["peak_stage"]
                row["peak_over_base_after_kb"] = {k: v // 1024 - r["base_kb"]
                                                  for k, v in stages["peak_rss_bytes_after"].items()}
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def run_plan(name: str, workdir: str) -> dict:
    d = os.path.join(workdir, name + ".config")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(PLANS[name], f, indent=1)
    print(f"[{name}] moec plan", file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_WAIT_POLICY="passive", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, d, "--plan"], capture_output=True, text=True, env=env)
    row = {"model": name, "kind": "plan", "seconds": time.perf_counter() - t}
    if out.returncode != 0:
        return {**row, "status": f"exit {out.returncode}", "error": out.stderr.strip().splitlines()[-1:]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(status="planned" if r["rc"] == 0 else f"exit {r['rc']}", peak_over_base_kb=r["peak_kb"] - r["base_kb"],
               peak_kb=r["peak_kb"])
    if r["plan"]:
        p = r["plan"]
        top = p["memory_plan"]["profiles"]["max"]
        row.update(parameters=p["parameters"], moe_layers=p["moe_layers"]["found"], fused=p["moe_layers"]["fused"],
                   stages_s=p["seconds"], arena_bytes=top["arena_bytes"],
                   devices={x["precision"]: x["devices"] for x in p["placement"]},
                   weights={w["precision"]: w["total_bytes"] for w in p["weights"]})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["granite-1b"], choices=list(MODELS))
    ap.add_argument("--modes", nargs="*", default=["on"], choices=["on", "off"],
                    help="compile out of core (on, streamed) and/or in memory (off), side by side")
    ap.add_argument("--plans", nargs="*", default=[], choices=list(PLANS),
                    help="also run `moec plan` on these published configs")
    ap.add_argument("--workdir", default=None, help="where checkpoints and artifacts go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--render", metavar="FILE", help="print the table of a --json run's output instead of running")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            done = json.load(f)
        render([r for r in done if "out_of_core" in r], [r for r in done if "out_of_core" not in r])
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="moec-scale-")
    rows = [run_model(m, workdir, args.keep, mode) for m in args.models for mode in args.modes]
    plans = [run_plan(m, workdir) for m in args.plans]
    if args.json:
        print(json.dumps(rows + plans, indent=2))
        return 0
    render(rows, plans)
    return 0


def render(rows: list[dict], plans: list[dict]) -> None:
    print(f"{'model':<17} {'streamed':<8} {'ckpt GiB':>9} {'status':<16} {'wall s':>7} {'peak over base GiB':>19} "
          f"{'bound GiB':>10} {'artifact GiB':>13} {'worst layer':>12} {'logits':>9}")
    for r in rows:
        peak = r.get("peak_over_base_kb", r.get("peak_kb", 0)) / 2**20
        layer = f"{r['worst_layer_rel_l2']:.1e}" if r.get("worst_layer_rel_l2") is not None else "-"
        logits = f"{r['logits_rel_l2']:.1e}" if r.get("logits_rel_l2") is not None else "-"
        print(f"{r['model']:<17} {r['out_of_core']:<8} {r['checkpoint_bytes'] / 2**30:9.2f} {r['status']:<16} "
              f"{r['seconds']:7.0f} {peak:19.2f} {r.get('bound_bytes', 0) / 2**30:10.2f} "
              f"{r.get('artifact_bytes', 0) / 2**30:13.2f} {layer:>12} {logits:>9}")
        if r.get("timings_s"):
            print("  stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["timings_s"].items()))
        if r.get("peak_over_base_after_kb"):
            print("  peak over base as each stage ended (GiB): " + ", ".join(
                f"{k} {v / 2**20:.2f}" for k, v in r["peak_over_base_after_kb"].items()) + f"; set in {r['peak_stage']}")
        if r.get("pruning"):
            p = r["pruning"]
            print(f"  pruned: experts {p['experts_before']} -> {p['experts_after']}, their fp32 bytes "
                  f"{p['weight_bytes_before'] / 2**30:.2f} -> {p['weight_bytes_after'] / 2**30:.2f} GiB; logits vs the "
                  f"unpruned model: relative L2 {p['vs_unpruned']['rel_l2']:.1e}, top-1 agreement "
                  f"{p['vs_unpruned']['top1_agreement']:.0%}")
        if r.get("quantized_logits_vs_fp32") is not None:
            print(f"  quantized: logits vs fp32 relative L2 {r['quantized_logits_vs_fp32']:.3g}; dense Linears: "
                  + ", ".join(f"{n} {m}" for m, n in r.get("dense_methods", {}).items()))
        if r.get("auto"):
            a = r["auto"]
            print(f"  quant auto: {', '.join(f'{n} {p}' for p, n in a['choice'].items())}, "
                  f"{a['weight_bytes'] / 2**20:.0f} MiB of experts, logits {a['measured_rel_l2']:.3g} "
                  f"({a['passes']} passes); uniform: " + ", ".join(
                      f"{u['precision']} {u['weight_bytes'] / 2**20:.0f} MiB at {u['rel_l2']:.3g}" for u in a["uniform"]))
        if "end_to_end" in r:
            e = r["end_to_end"]
            print("  end to end: " + (f"relative L2 {e['rel_l2']:.1e}, its process peaked at "
                                      f"{e['child_peak_bytes'] / 2**30:.2f} GiB" if "rel_l2" in e else
                                      f"not run ({e['not_run']})"))
    if plans:
        print(f"\n{'moec plan':<12} {'params B':>9} {'status':<9} {'wall s':>7} {'peak RSS GiB':>13} "
              f"{'over base GiB':>14} {'MoE fused':>10}  devices of 80 GiB (fp32/bf16/int8/int4/int2)")
    for r in plans:
        devices = "/".join(str(v) for v in r.get("devices", {}).values())
        print(f"{r['model']:<12} {r.get('parameters', 0) / 1e9:9.1f} {r['status']:<9} {r['seconds']:7.1f} "
              f"{r.get('peak_kb', 0) / 2**20:13.2f} {r.get('peak_over_base_kb', 0) / 2**20:14.2f} "
              f"{r.get('fused', 0):>4}/{r.get('moe_layers', 0):<5}  {devices}")
        if r.get("stages_s"):
            print("  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["stages_s"].items()))


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: greedy text generation, side by side in one run.

Two real families at real shapes with random weights (real transformers classes, a byte-level BPE tokenizer
made here, nothing downloaded):
  gpt_oss   GPT-OSS-shaped, ~0.9B: H 1024, I 1024, 32 experts, top-4, 8 layers, vocab 32000
  qwen3_moe Qwen3-MoE-shaped, ~0.39B: H 1024, I 384, 32 experts, top-4, 8 layers, vocab 32000

Systems (same greedy tokens checked across all; prompt 32, 48 new tokens, batch 1 and 4, 2 threads):
  eager        transformers `generate` (fp32)
  genai-builder onnxruntime-genai's model builder (fp32), where it supports the family (GPT-OSS)
  moec         `moec compile` (fp32) run by onnxruntime-genai (attention as GroupQueryAttention)
  moec-own-attention the same with `--no-pass lower_attention`: the model's own attention ops
  moec-int4    `moec compile --quant int4 --block-size 32` run by onnxruntime-genai (fp32 activations: exact
               against the dequantized model)
  moec-int4-acc4 the same with `--accuracy-level 4`: ONNX Runtime quantizes the experts' activations to int8
               (what the genai builder's int4 does on CPU); verified against the dequantized model at 3e-2
  moec-int4-dense `--quant int4 --block-size 32 --quant-dense`: attention projections and the LM head as int4
               MatMulNBits too (routers stay fp32), fp32 activations (exact against the dequantized model; with
               `--accuracy-level 4` the dense layers' int8 activations flip a greedy token of GPT-OSS at step 7,
               which the compile's check refuses); its floor counts those layers' quantized bytes
  optimum      Optimum's ONNX export with past, run by its ORTModelForCausalLM (fp32; GPT-OSS's export runs
               every expert on every token, Qwen3-MoE's the routed ones), in its own venv
               (tools/setup_optimum.sh: optimum-onnx pins transformers 4.x); skipped when that venv is
               absent, and for families its export refuses
Every system is loaded once and run `--rounds` times (default 5) in an order that rotates each round; prefill and
decode tokens/s are the medians, reported separately (one run each was too noisy on these machines to rank
systems a few percent apart). The batch-1 decode step is also compared with its
memory-bandwidth floor: the bytes the step must read (every non-expert weight, the top-k experts of each
layer, the KV cache) over the copy bandwidth measured in the same run (STREAM convention: bytes read +
written per second).

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_generate.py [--families gpt_oss qwen3_moe]
        [--new-tokens 48] [--rounds 5] [--systems moec genai-builder ...] [--json out.json] [--work DIR]
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

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = {
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        hidden_size=1024, intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000, sliding_window=128,
        max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention"] * 4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
        max_position_embeddings=4096, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)),
}
BUILDER_FAMILIES = {"gpt_oss"}  # the MoE families onnxruntime-genai's builder supports, of these two
OPTIMUM_ALL_EXPERTS = {"gpt_oss"}  # families whose Optimum export runs every expert on every token
OPTIMUM_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-optimum", "bin",
                              "python")
PROMPT, THREADS = 32, 2
EOS, PAD = 1, 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_checkpoint(family: str, path: str) -> dict:
    """A Hugging Face directory (fp32 safetensors, tokenizer) of the family at its shape; returns facts the
    bandwidth floor needs."""
    import transformers

    from moec.zoo import save_byte_level_tokenizer

    cfg_cls, model_cls, kw = SHAPES[family]
    cfg = getattr(transformers, cfg_cls)(**kw, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2,
                                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS, PAD
    model.save_pretrained(path)
    save_byte_level_tokenizer(path, cfg.vocab_size)
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in experts)
    total = sum(p.numel() * 4 for p in model.parameters())
    facts = {"params": sum(p.numel() for p in model.parameters()), "expert_bytes": expert_bytes,
             "dense_bytes": total - expert_bytes - model.get_input_embeddings().weight.numel() * 4,
             "experts": kw.get("num_local_experts") or kw["num_experts"], "top_k": kw["num_experts_per_tok"],
             "layers": kw["num_hidden_layers"], "kv_heads": kw["num_key_value_heads"], "head_dim": kw["head_dim"]}
    del model
    return facts


def copy_bandwidth() -> float:
    """Bytes read + written per second copying 512 MiB (best of 5)."""
    a = np.ones(128 * 2**20, np.float32)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def floor_ms(facts: dict, expert_fraction_bytes: float, bandwidth: float, past: int) -> float:
    """A batch-1 decode step's bytes to read over the bandwidth: non-expert weights (the embedding is one
    row), top-k of every layer's experts, and the cache."""
    experts = expert_fraction_bytes * facts["top_k"] / facts["experts"]
    cache = 2 * facts["layers"] * facts["kv_heads"] * facts["head_dim"] * past * 4
    return 1e3 * (facts["dense_bytes"] + experts + cache) / bandwidth


def prompts(batch: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    return rng.integers(4, vocab, size=(batch, PROMPT)).astype(np.int64)


class EagerSystem:
    """transformers eager `generate`, the model loaded once."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(self, ids: np.ndarray, new: int) -> tuple[list, float, float]:
        with torch.no_grad():
            return time_generate(self.model, ids, new)


def time_generate(model, ids: np.ndarray, new: int) -> tuple[list, float, float]:
    """(new tokens, prefill s, decode s) of a transformers-style `generate` (transformers eager, Optimum's
    ORTModelForCausalLM): prefill = one new token, decode = the rest, after a warm-up."""
    x = torch.from_numpy(ids)
    kw = dict(do_sample=False, pad_token_id=PAD, attention_mask=torch.ones_like(x))
    model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    t = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
    total = time.perf_counter() - t
    return out[:, ids.shape[1]:].tolist(), prefill, max(total - prefill, 1e-9)


class GenaiSystem:
    """onnxruntime-genai over an artifact directory, the model loaded once (2 intra-op threads)."""

    def __init__(self, model_dir: str, window: int = 0):
        import onnxruntime_genai as og

        cfg_path = os.path.join(model_dir, "genai_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        self.og, self.window = og, window
        self.model = og.Model(og.Config(model_dir))

    def generate(self, ids: np.ndarray, n: int) -> tuple[list, float, float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        # the builder's sliding-window attention needs a cache of at least the window: max_length covers it,
        # and the loop stops after n tokens
        length = ids.shape[1] + n
        params.set_search_options(max_length=max(length, self.window), min_length=length, do_sample=False,
                                  batch_size=ids.shape[0])
        gen = og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(ids.astype(np.int32))
        gen.generate_next_token()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        decode = time.perf_counter() - t
        return [list(map(int, gen.get_sequence(r)))[ids.shape[1]:length] for r in range(ids.shape[0])], prefill, decode

    def run(self, ids: np.ndarray, new: int) -> tuple[list, float, float]:
        self.generate(ids, 2)  # warm-up
        return self.generate(ids, new)


def interleaved(systems: dict, ids: np.ndarray, new: int, rounds: int) -> dict[str, tuple[list, float, float]]:
    """Each system `rounds` times, in an order that rotates each round (a slow spell of the machine falls on
    every system alike); per system the first run's tokens (every run's must agree) and the median prefill
    and decode times."""
    names = list(systems)
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(systems[name].run(ids, new))
    out = {}
    for name, rs in runs.items():
        if any(toks != rs[0][0] for toks, _, _ in rs):
            raise RuntimeError(f"{name} generated different tokens in different rounds")
        out[name] = (rs[0][0], float(np.median([p for _, p, _ in rs])), float(np.median([d for _, _, d in rs])))
    return out


def compile_moec(src: str, out: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "moec.cli", "compile", src, "--out", out, "--force", "--quiet", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"moec compile failed ({r.returncode}): {r.stderr[-2000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    report["_compile_s"] = time.perf_counter() - t
    return report


def build_genai(src: str, out: str) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", src, "-o", out, "-p", "fp32", "-e", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"genai builder failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - t


SYSTEMS = ("moec", "moec-own-attention", "moec-int4", "moec-int4-acc4", "moec-int4-dense", "genai-builder", "optimum")


def bench_family(family: str, work: str, new: int, bandwidth: float, rounds: int,
                 wanted: tuple[str, ...] = SYSTEMS) -> dict:
    hf = os.path.join(work, f"{family}-hf")
    log(f"[{family}] writing the checkpoint")
    facts = make_checkpoint(family, hf)
    systems: dict[str, dict] = {}
    if "moec" in wanted:
        log(f"[{family}] moec compile (fp32)")
        rep = compile_moec(hf, os.path.join(work, f"{family}-moec"))
        systems["moec"] = {"dir": os.path.join(work, f"{family}-moec"), "compile_s": rep["_compile_s"],
                           "expert_bytes": facts["expert_bytes"]}
    if "moec-own-attention" in wanted:
        log(f"[{family}] moec compile --no-pass lower_attention (fp32, the model's own attention ops)")
        out = os.path.join(work, f"{family}-moec-own-attention")
        rep_own = compile_moec(hf, out, "--no-pass", "lower_attention")
        systems["moec-own-attention"] = {"dir": out, "compile_s": rep_own["_compile_s"],
                                         "expert_bytes": facts["expert_bytes"]}
    if "moec-int4" in wanted:
        log(f"[{family}] moec compile --quant int4")
        rep4 = compile_moec(hf, os.path.join(work, f"{family}-moec-int4"), "--quant", "int4", "--block-size", "32")
        systems["moec-int4"] = {"dir": os.path.join(work, f"{family}-moec-int4"), "compile_s": rep4["_compile_s"],
                                "expert_bytes": rep4["quantization"]["weight_bytes_quantized"]}
    if "moec-int4-acc4" in wanted:
        log(f"[{family}] moec compile --quant int4 --accuracy-level 4")
        out = os.path.join(work, f"{family}-moec-int4-acc4")
        rep4a = compile_moec(hf, out, "--quant", "int4", "--block-size", "32", "--accuracy-level", "4")
        systems["moec-int4-acc4"] = {"dir": out, "compile_s": rep4a["_compile_s"],
                                     "expert_bytes": rep4a["quantization"]["weight_bytes_quantized"]}
    if "moec-int4-dense" in wanted:
        log(f"[{family}] moec compile --quant int4 --quant-dense")
        out = os.path.join(work, f"{family}-moec-int4-dense")
        rep4d = compile_moec(hf, out, "--quant", "int4", "--block-size", "32", "--quant-dense")
        q = rep4d["quantization"]
        dense = q["dense"]["layers"]
        systems["moec-int4-dense"] = {
            "dir": out, "compile_s": rep4d["_compile_s"],
            "expert_bytes": q["weight_bytes_quantized"] - sum(l["weight_bytes_quantized"] for l in dense),
            "dense_bytes": facts["dense_bytes"] - sum(l["weight_bytes_fp32"] - l["weight_bytes_quantized"]
                                                      for l in dense)}
    if family in BUILDER_FAMILIES and "genai-builder" in wanted:
        log(f"[{family}] onnxruntime-genai builder (fp32)")
        out = os.path.join(work, f"{family}-builder")
        systems["genai-builder"] = {"dir": out, "compile_s": build_genai(hf, out), "expert_bytes": facts["expert_bytes"]}
    rows = []
    optimum_s, optimum_refused = 0.0, None
    if not os.path.exists(OPTIMUM_PYTHON):
        log("  optimum: skipped (run tools/setup_optimum.sh for its venv)")
    log(f"[{family}] loading transformers eager and every artifact in onnxruntime-genai")
    window = SHAPES[family][2].get("sliding_window") or 0
    runners = {"eager": EagerSystem(hf), **{name: GenaiSystem(s["dir"], window) for name, s in systems.items()}}
    for batch in (1, 4):
        ids = prompts(batch, SHAPES[family][2]["vocab_size"])
        log(f"[{family}] batch {batch}: {', '.join(runners)}, {rounds} rounds interleaved")
        measured = interleaved(runners, ids, new, rounds)
        ref = measured["eager"][0]
        results = {name: (*measured[name], s["expert_bytes"], s.get("dense_bytes", facts["dense_bytes"]))
                   for name, s in systems.items()}
        results = {"eager": (*measured["eager"], facts["expert_bytes"], facts["dense_bytes"]), **results}
        if "optimum" in wanted and os.path.exists(OPTIMUM_PYTHON) and optimum_refused is None:
            log(f"[{family}] batch {batch}: optimum (exporting once, then Optimum's ORTModelForCausalLM)")
            try:
                toks, prefill, decode, export_s = run_optimum(hf, os.path.join(work, f"{family}-optimum"), ids, new)
                # transformers 4.x's GPT-OSS experts compute every expert for every token (the export reads them
                # all); its Qwen3-MoE loop runs only the experts tokens were routed to
                dense = family in OPTIMUM_ALL_EXPERTS
                results["optimum"] = (toks, prefill, decode,
                                      facts["expert_bytes"] * (facts["experts"] / facts["top_k"] if dense else 1),
                                      facts["dense_bytes"])
                optimum_s = optimum_s or export_s
            except RuntimeError as exc:
                optimum_refused = str(exc)[-300:]
                log(f"  optimum cannot export {family}: {optimum_refused}")
        for name, (toks, prefill, decode, ebytes, dbytes) in results.items():
            step_ms = 1e3 * decode / (new - 1)
            row = {"family": family, "batch": batch, "system": name, "prefill_tok_s": batch * PROMPT / prefill,
                   "decode_tok_s": batch * (new - 1) / decode, "decode_step_ms": step_ms,
                   "same_tokens_as_eager": toks == ref,
                   "tokens_equal_fraction": float(np.mean(np.array(toks) == np.array(ref)))}
            if batch == 1:
                row["floor_ms"] = floor_ms({**facts, "dense_bytes": dbytes}, ebytes, bandwidth, PROMPT + new // 2)
                row["vs_floor"] = step_ms / row["floor_ms"]
            rows.append(row)
            log(f"  {name:14s} prefill {row['prefill_tok_s']:8.1f} tok/s  decode {row['decode_tok_s']:7.2f} tok/s"
                + (f"  step/floor {row['vs_floor']:.2f}" if "vs_floor" in row else "")
                + ("" if row["same_tokens_as_eager"] else f"  tokens equal {row['tokens_equal_fraction']:.0%}"))
    compile_s = {k: v["compile_s"] for k, v in systems.items()}
    if optimum_s:
        compile_s["optimum"] = optimum_s
    return {"facts": facts, "compile_s": compile_s, "rows": rows,
            "optimum_unsupported": optimum_refused}


def run_optimum(hf: str, out: str, ids: np.ndarray, new: int) -> tuple[list, float, float, float]:
    """Optimum's export and runtime, in its own venv (tools/optimum_generate.py)."""
    ids_path = out.rstrip("/") + "-ids.npy"
    np.save(ids_path, ids)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimum_generate.py")
    r = subprocess.run([OPTIMUM_PYTHON, script, hf, out, ids_path, str(new), str(THREADS)], capture_output=True,
                       text=True, env={**os.environ, "OMP_WAIT_POLICY": "passive"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip() or r.stdout.strip())
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["tokens"], res["prefill_s"], res["decode_s"], res["export_s"]


def table(results: dict) -> str:
    lines = ["| model | batch | system | prefill tok/s | decode tok/s | decode vs eager | step / floor | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for family, res in results["families"].items():
        eager = {r["batch"]: r["decode_tok_s"] for r in res["rows"] if r["system"] == "eager"}
        for r in res["rows"]:
            floor = f"{r['vs_floor']:.2f}" if "vs_floor" in r else "-"
            same = "yes" if r["same_tokens_as_eager"] else f"{r['tokens_equal_fraction']:.0%}"
            lines.append(f"| {family} | {r['batch']} | {r['system']} | {r['prefill_tok_s']:.0f} | "
                         f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / eager[r['batch']]:.2f}x | {floor} | {same} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5, help="runs of each system, interleaved; the median is reported")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS),
                    help="which systems besides transformers eager (default: all)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="keep checkpoints and artifacts here (default: a temporary directory)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run at toy sizes (checks the harness, not speed)")
    args = ap.parse_args()
    if args.tiny:
        for _, _, kw in SHAPES.values():
            kw.update(hidden_size=64, intermediate_size=64, num_hidden_layers=2, vocab_size=512, head_dim=16,
                      num_attention_heads=4, num_key_value_heads=2)
            kw.update({k: 8 for k in ("num_local_experts", "num_experts") if k in kw})
            kw.update({k: 32 for k in ("moe_intermediate_size",) if k in kw})
            if "layer_types" in kw:
                kw["layer_types"] = ["sliding_attention", "full_attention"]
    torch.set_num_threads(THREADS)
    work = args.work or tempfile.mkdtemp(prefix="moec-bench-generate-")
    os.makedirs(work, exist_ok=True)
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written)")
    results = {"threads": THREADS, "prompt": PROMPT, "new_tokens": args.new_tokens, "rounds": args.rounds,
               "copy_bandwidth_gb_s": bandwidth / 1e9, "families": {}}
    try:
        for family in args.families:
            results["families"][family] = bench_family(family, work, args.new_tokens, bandwidth, args.rounds,
                                                       tuple(args.systems))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

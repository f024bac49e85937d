"""Text-generation artifacts: a KV-cache decoder that onnxruntime-genai and ONNX Runtime run token for token
like transformers' greedy generate (tiny configs, random weights, real transformers classes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moec
from moec import greedy, zoo
from moec.errors import MoecError, SourceError
from moec.generation import CausalLMDecoder, decoder_source, probe_cache_layout
from moec.verify import OrtRunner

# sliding windows shorter than prompt + generation, so that the window is exercised; head size 16 (ONNX
# Runtime's GroupQueryAttention takes multiples of 8), so attention is lowered to it (DeepSeek-V3's MLA is not)
FAMILIES = {
    "mixtral": dict(sliding_window=8, head_dim=16),
    "qwen3_moe": dict(head_dim=16),
    "deepseek_v3": {},
    "gpt_oss": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], head_dim=16),
    "olmoe": dict(head_dim=16, hidden_size=64),  # its q/k norms span heads * head_dim = hidden
    "granitemoe": dict(head_dim=16),
    "llama4": dict(attention_chunk_size=4, head_dim=16),  # chunked attention, chunks shorter than the prompts
}
NEW_TOKENS = 64


def _model(family: str):
    model = zoo.build_hf_model(family, **FAMILIES[family])
    model.generation_config.eos_token_id = None  # random weights: run every step, as the golden does
    model.generation_config.pad_token_id = 0
    return model


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(1, vocab, size=n))) for n in (9, 4, 13)]


def _hf_generate(model, prompts: list[list[int]], new_tokens: int):
    """transformers' greedy generate on a left-padded batch: (new tokens [B, n], per-step logits [B, n, V])."""
    ids, mask = greedy.left_pad(prompts, 0)
    out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    tokens = out.sequences[:, ids.shape[1]:].numpy()
    logits = torch.stack(out.logits, 1).float().numpy()
    return tokens, logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_wrapper_is_transformers_generate(family):
    """The graph moec exports (CausalLMDecoder, fed by the greedy loop) is transformers' generate, token for
    token, at batch 3 with left padding."""
    model = _model(family)
    prompts = _prompts(model.config.vocab_size)
    want_tokens, want_logits = _hf_generate(model, prompts, 24)
    layout = probe_cache_layout(model)
    shapes = [s for h, k, v in zip(layout.kv_heads, layout.key_dims, layout.value_dims) for s in ((h, k), (h, v))]
    run = greedy.greedy(greedy.torch_step(CausalLMDecoder(model, layout.layers)), prompts, 24, shapes)
    np.testing.assert_array_equal(run.tokens, want_tokens)
    assert max(greedy.rel_l2(want_logits[r, s], run.logits[r, s]) for r in range(3) for s in range(24)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_artifact_generates_like_transformers(family, generation_artifact):
    """Compiled from a Hugging Face directory: ONNX Runtime (batch 3, left padding) and onnxruntime-genai
    (each prompt, and the 3 prompts of different lengths as one batch) give transformers' tokens for 64 steps;
    every step's logits within 1e-4 relative L2. (The run's shared compile: the generate endpoint's tests serve
    it too.)"""
    result, _, model = generation_artifact(family, **FAMILIES[family])
    out = Path(result.out_dir)
    report = result.report
    assert report["generation"]["task"] == "text-generation"
    assert report["numerics"]["generation"]["passed"], report["numerics"]["generation"]
    assert report["moe_layers"]["fused"] >= 1
    attention = next(p for p in report["passes"] if p["name"] == "lower_attention")["details"]["layers"]
    assert len(attention) == model.config.num_hidden_layers
    lowered = [l["lowered_to"] == "com.microsoft.GroupQueryAttention" for l in attention]
    assert not any(lowered) if family == "deepseek_v3" else all(lowered), attention
    prompts = _prompts(model.config.vocab_size)
    want_tokens, want_logits = _hf_generate(model, prompts, NEW_TOKENS)

    runner = OrtRunner(os.path.join(result.out_dir, "model.onnx"))
    assert runner.outputs[0] == "logits" and runner.outputs[1] == "present.0.key"
    info = report["generation"]["cache"]
    shapes = [s for h, k, v in zip(info["kv_heads"], info["key_dims"], info["value_dims"]) for s in ((h, k), (h, v))]
    run = greedy.greedy(greedy.session_step(runner), prompts, NEW_TOKENS, shapes)
    np.testing.assert_array_equal(run.tokens, want_tokens)
    worst = max(greedy.rel_l2(want_logits[r, s], run.logits[r, s]) for r in range(3) for s in range(NEW_TOKENS))
    assert worst < 1e-4, worst

    if family == "deepseek_v3":  # keys and values of different head sizes: genai cannot hold the cache
        assert not report["generation"]["genai_config"]
        assert "head size" in report["generation"]["genai_unsupported"]
        assert not (out / "genai_config.json").exists()
        return
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["num_key_value_heads"] == info["kv_heads"][0]
    eos, pad = report["generation"]["eos_token_ids"], report["generation"]["pad_token_id"]

    def comparable(tokens):  # genai stops at end-of-sequence and leaves generated pad tokens out
        return greedy.genai_comparable(tokens, eos, pad)

    # batch 1, each prompt; then the three prompts of different lengths as one batch, which genai takes padded on
    # the right: against transformers' left-padded batch, row for row
    batched = greedy.genai_generate(result.out_dir, prompts, NEW_TOKENS)
    padded = [comparable(want_tokens[row]) for row in (0, 1)]  # 9 and 4 tokens, padded to 13
    assert sum(map(len, padded)) >= 8, padded  # the padded rows are compared over a real stretch of the run
    for row, prompt in enumerate(prompts):
        want = comparable(want_tokens[row])
        got = greedy.genai_generate(result.out_dir, [prompt], NEW_TOKENS)[0]
        assert got[:len(want)] == want, (row, got, want)
        assert batched[row][:len(want)] == want, (row, batched[row], want)


def test_genai_gets_a_batch_padded_on_the_right_and_no_prompt_it_would_take_for_padding(tmp_path):
    """genai 0.18 masks the pad ids that end a row (and only those), so a batch goes in padded on the right, and a
    prompt ending in the pad id is refused before genai runs."""
    np.testing.assert_array_equal(greedy.right_pad([[5, 6, 7], [8]], 0), [[5, 6, 7], [8, 0, 0]])
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"pad_token_id": 0}}))
    with pytest.raises(MoecError, match="prompt 1 ends in the pad id 0: onnxruntime-genai would take its end"):
        greedy.genai_generate(str(tmp_path), [[5, 6], [7, 0]], 4)
    with pytest.raises(MoecError, match="prompt 0 is empty"):
        greedy.genai_generate(str(tmp_path), [[]], 4)


@pytest.mark.slow
def test_quantized_generation_is_exact_against_its_reference(tmp_path):
    """--quant on the KV-cache decoder, with the dense Linears and calibration too (GPTQ runs on the decoder's
    calibration batches, whose inputs include the empty cache)."""
    model = zoo.build_hf_model("qwen3_moe", head_dim=16, hidden_size=64, moe_intermediate_size=32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    model.save_pretrained(tmp_path / "hf")
    report = moec.compile(source=str(tmp_path / "hf"), out=str(tmp_path / "out"), extra={
        "quant": "int4", "block_size": 32, "quant_dense": True, "calibration": "random:16"}).report
    gen = report["numerics"]["generation"]
    assert gen["reference"] == "the dequantized reference" and gen["passed"]
    assert 0.0 <= gen["tokens_equal_to_fp32"] <= 1.0
    assert any(c["runner"] == "onnxruntime-genai" for c in gen["checks"])
    quant = report["quantization"]
    assert all(l["method"].startswith("gptq on ") for l in quant["layers"])
    dense = [l.get("method", "") for l in quant["dense"]["layers"]]
    assert len(dense) == 9 and all(m == "gptq" or m.startswith("round-to-nearest (") for m in dense), dense


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = _model("granitemoe")
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    model.save_pretrained(root / "hf")
    moec.compile(source=str(root / "hf"), out=str(root / "out"))
    return root / "out"


def test_tokenizer_and_generation_files_travel(artifact):
    report = json.loads((artifact / "report.json").read_text())
    assert "generation_config.json" in report["generation"]["tokenizer_files"]
    assert (artifact / "generation_config.json").exists() and (artifact / "genai_config.json").exists()
    assert {"genai_config.json", "generation_config.json"} <= set(report["files"])
    # the source's sampling settings are the runtime's defaults (verification itself is greedy)
    search = json.loads((artifact / "genai_config.json").read_text())["search"]
    assert (search["do_sample"], search["temperature"], search["top_p"], search["top_k"]) == (True, 0.7, 0.9, 20)
    assert search["repetition_penalty"] == 1.0 and search["past_present_share_buffer"] is False


def _moec(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "moec.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_WAIT_POLICY": "passive"})


def test_verify_replays_generation_and_names_the_first_diverging_step(artifact, tmp_path):
    ok = _moec("verify", artifact)
    assert ok.returncode == 0, ok.stderr
    assert "greedy generation (PASS): onnxruntime:" in ok.stdout
    assert "greedy generation (PASS): onnxruntime-genai" in ok.stdout
    golden = tmp_path / "golden"
    import shutil

    shutil.copytree(artifact / "golden", golden)
    meta = json.loads((golden / greedy.GOLDEN_FILE).read_text())
    tokens = meta["prompt_sets"][1]["tokens"]
    tokens[2][5] = (tokens[2][5] + 1) % 100  # row 2 diverges at step 5
    (golden / greedy.GOLDEN_FILE).write_text(json.dumps(meta))
    bad = _moec("verify", artifact, "--golden", golden)
    assert bad.returncode == 10
    out = bad.stdout + bad.stderr
    assert "prompt set 1, row 2: the first diverging token is at step 5" in out
    # onnxruntime-genai gives tokens only: its divergence says so instead of a NaN logits error
    assert "nan" not in out and "onnxruntime-genai: prompt set 1, row 2" in out and "gives no logits" in out


def test_verify_fails_on_logits_that_drift_without_changing_tokens(artifact, tmp_path):
    import shutil

    golden = tmp_path / "golden"
    shutil.copytree(artifact / "golden", golden)
    logits = np.load(golden / greedy.LOGITS_FILE)
    logits[0, 0, 3] *= 1.01  # 1% off at step 3: same argmax, logits over 1e-4
    np.save(golden / greedy.LOGITS_FILE, logits)
    bad = _moec("verify", artifact, "--golden", golden)
    assert bad.returncode == 10
    assert "over tolerance" in bad.stdout + bad.stderr


def test_logits_task_keeps_the_single_graph(tmp_path):
    _model("qwen3_moe").save_pretrained(tmp_path / "hf")
    from moec.sources import load_source

    src = load_source(str(tmp_path / "hf"), task="logits")
    assert src.input_names == ["input_ids"] and src.output_names == ["logits"]
    src = load_source(str(tmp_path / "hf"))
    assert src.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert src.input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert src.output_names[:2] == ["logits", "present.0.key"]


def test_decoder_inputs_are_consistent():
    src = decoder_source(_model("mixtral"), "t")
    for args in src.verification_inputs(None):
        ids, mask, pos = args[:3]
        past = args[3].shape[2]
        assert mask.shape[1] == past + ids.shape[1] and pos.shape == ids.shape
        assert int(pos.max()) < mask.shape[1]
    assert src.dim_ranges()["total"][0] == 1  # a one-token prompt runs (torch.export says 4)


def test_generation_refuses_models_it_cannot_serve(tmp_path):
    with pytest.raises(SourceError, match="--task text-generation needs a transformers causal LM"):
        moec.compile(source="moec.zoo:loop_moe", out=str(tmp_path / "o"), extra={"task": "text-generation"})
    assert not (tmp_path / "o").exists()
    r = _moec("compile", "moec.zoo:loop_moe", "--task", "text-generation", "--out", tmp_path / "o2")
    assert r.returncode == 3 and "returned a LoadedSource of Residual" in r.stderr and not (tmp_path / "o2").exists()


def test_prompt_longer_than_the_position_limit_is_refused():
    def never(feeds):  # the loop refuses before running anything
        raise AssertionError("ran")

    with pytest.raises(MoecError, match="need 300 positions; the model has 256"):
        greedy.greedy(never, [[1] * 290], 10, [(2, 12)], max_positions=256)


def test_demo_loads_as_a_decoder_when_asked():
    """With no source and --task text-generation, the demo is loaded as the KV-cache decoder (a cache for each
    of its 4 layers; without the task, a logits graph). What compile does with it is what it does with any
    decoder: test_artifact_generates_like_transformers[mixtral] compiles the same transformers class end to
    end (the 4-layer demo's own decoder compile took 33-41 s of CI's time)."""
    from moec.pipeline import load

    loaded = load(None, None, None, None, task="text-generation")
    assert loaded.identity["source"] == "builtin:mixtral-demo" and loaded.generation is not None
    assert loaded.generation.layout.kv_heads == (2, 2, 2, 2)
    assert loaded.src.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert loaded.src.input_names[3:] == [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    assert set(loaded.dim_ranges) >= {"batch", "seq", "past", "total"}
    plain = load(None, None, None, None)
    assert plain.generation is None and plain.src.input_names == ["input_ids"]


def test_a_model_without_a_plain_kv_cache_is_refused():
    """A hybrid (Mamba + attention) model keeps a recurrent state, not [batch, kv_heads, seq, head_dim]."""
    import transformers

    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention"],
        mamba_n_heads=4, mamba_d_head=24, mamba_d_state=16, shared_intermediate_size=40)
    model = transformers.GraniteMoeHybridForCausalLM(cfg).eval()
    with pytest.raises(SourceError, match="GraniteMoeHybridForCausalLM cannot run with a KV cache.*--task logits"):
        decoder_source(model, "hybrid")


def test_without_onnxruntime_genai_the_report_says_ort_verified_it(tmp_path, monkeypatch):
    monkeypatch.setattr(greedy, "genai_available", lambda: False)
    _model("granitemoe").save_pretrained(tmp_path / "hf")
    report = moec.compile(source=str(tmp_path / "hf"), out=str(tmp_path / "out")).report
    gen = report["numerics"]["generation"]
    assert gen["passed"] and gen["genai"] == "onnxruntime-genai is not installed: verified with ONNX Runtime directly"
    assert [c["runner"] for c in gen["checks"]] == ["onnxruntime"]
    # the artifact still carries genai_config.json for a machine that has genai
    assert (tmp_path / "out" / "genai_config.json").exists()

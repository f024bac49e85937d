"""A text-generation artifact served by a real Triton server through the generate extension."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
import torch
import transformers

from moec import greedy, zoo
from moec.pipeline import CompileOptions, compile

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    # a byte-level tokenizer needs 259+ tokens (256 bytes and the specials <pad> 0, <eos> 1, <bos> 2)
    # head size 16: attention lowered to GroupQueryAttention, served by the backend's onnxruntime-genai
    model = zoo.build_hf_model("qwen3_moe", vocab_size=320, eos_token_id=1, pad_token_id=0,
                               tie_word_embeddings=False, head_dim=16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    zoo.save_byte_level_tokenizer(str(root / "hf"), model.config.vocab_size)
    # zero the output rows of tokens that are not whole ASCII text (lone bytes of a UTF-8 sequence), so the
    # greedy continuation decodes to text both tokenizers spell the same way (their logit 0 never wins)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "hf")
    with torch.no_grad():
        for i in range(model.config.vocab_size):
            if not tokenizer.decode([i]).isascii():
                model.lm_head.weight[i] = 0.0
    model.save_pretrained(root / "hf")
    result = compile(source=str(root / "hf"), options=CompileOptions(
        out=str(root / "artifact"), triton_repo=str(root / "repo"), model_name="llm"))
    return model, result


def _post(url: str, path: str, body: dict) -> bytes:
    req = urllib.request.Request(f"http://{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def _hf_tokens(model, prompt, n, eos=(1,), pad=-1):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    # a single prompt has no padding, so genai keeps a generated <pad> in the sequence; it stops at <eos>
    return greedy.genai_comparable(out[0, len(prompt):].tolist(), list(eos), pad_id=pad)


def test_generate_endpoint_matches_transformers(served, triton):
    model, result = served
    assert result.report["generation"]["triton"].startswith("generate extension")
    cfg = open(os.path.join(result.triton_model_dir, "config.pbtxt")).read()
    assert "decoupled: true" in cfg and 'backend: "python"' in cfg
    server = triton(os.path.dirname(result.triton_model_dir))
    server.wait_model_ready("llm")
    for prompt in ([5, 9, 17, 33, 2, 77], [100, 3, 64]):
        want = _hf_tokens(model, prompt, 24)
        got = json.loads(_post(server.http_url, "/v2/models/llm/generate", {"input_ids": prompt, "max_tokens": 24}))
        assert got["output_ids"][:len(want)] == want
    # text in, text out through the artifact's tokenizer: the same tokens as transformers' generate on
    # the ids transformers' tokenizer gives the text, and the same text back
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(result.out_dir), "hf"))
    for text in ("the quick brown fox", "experts route tokens"):
        prompt = tokenizer.encode(text)
        want = _hf_tokens(model, prompt, 24)
        got = json.loads(_post(server.http_url, "/v2/models/llm/generate", {"text_input": text, "max_tokens": 24}))
        assert got["output_ids"] == want
        # genai's detokenizer leaves special tokens (a generated <pad>) out of the text
        assert got["text_output"] == tokenizer.decode(want, skip_special_tokens=True)
        assert got["text_output"].isascii() and len(got["text_output"]) > 0
    # streaming: one server-sent event per token
    events = [json.loads(line[len(b"data: "):]) for line in _post(
        server.http_url, "/v2/models/llm/generate_stream",
        {"input_ids": [5, 9, 17], "max_tokens": 12, "stream": True}).splitlines() if line.startswith(b"data: ")]
    # one token per event; the generate extension renders a one-element tensor as a scalar
    assert all(isinstance(e["output_ids"], int) for e in events)
    streamed = [e["output_ids"] for e in events]
    want = _hf_tokens(model, [5, 9, 17], 12)
    assert streamed == want


def test_moec_verify_replays_the_generation_golden_through_the_server(served, triton):
    _, result = served
    server = triton(os.path.dirname(result.triton_model_dir))
    server.wait_model_ready("llm")
    r = subprocess.run([sys.executable, "-m", "moec.cli", "verify", result.out_dir, "--server", server.http_url,
                        "--model-name", "llm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "greedy generation (PASS): triton" in r.stdout


def test_bad_requests_get_the_reason(served, triton):
    _, result = served
    server = triton(os.path.dirname(result.triton_model_dir))
    server.wait_model_ready("llm")
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        _post(server.http_url, "/v2/models/llm/generate", {"input_ids": [1] * 250, "max_tokens": 16})
    assert "need 266 positions; the model has 256" in err.value.read().decode()


# sliding windows shorter than the runs (GPT-OSS's sinks too), plain GQA, and Granite's scalings; attention
# lowered to GroupQueryAttention (head size 16) but for OLMoE, which keeps its own ops (head size 12). The first
# three are test_generation's models (the run's shared compiles); none has an end-of-sequence token, so every
# run goes to max_tokens.
OTHER_FAMILIES = {"mixtral": dict(sliding_window=8, head_dim=16),
                  "gpt_oss": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], head_dim=16),
                  "granitemoe": dict(head_dim=16), "olmoe": {}}


@pytest.fixture(scope="module")
def families_repo(generation_artifact, tmp_path_factory):
    """One repository serving a generation model per family, compiled without tokenizers (ids only)."""
    repo = tmp_path_factory.mktemp("families") / "repo"
    models = {}
    for family, overrides in OTHER_FAMILIES.items():
        _, own_repo, models[family] = generation_artifact(family, **overrides)
        shutil.copytree(own_repo / family, repo / family)
    return repo, models


def test_every_family_generates_like_transformers_through_the_server(families_repo, triton):
    import urllib.error

    repo, models = families_repo
    server = triton(str(repo))
    for family, model in models.items():
        server.wait_model_ready(family)
        compared = 0
        for prompt in ([5, 9, 17, 33, 2, 77], [100, 3, 64, 7, 8, 9, 10, 11, 12, 13, 14]):
            want = _hf_tokens(model, prompt, 32, eos=[], pad=0)  # without eos genai ends a run at a <pad>
            compared += len(want)
            got = json.loads(_post(server.http_url, f"/v2/models/{family}/generate",
                                   {"input_ids": prompt, "max_tokens": 32}))
            assert got["output_ids"] == want, (family, prompt)
            assert "text_output" not in got  # no tokenizer in the source: ids only
        assert compared >= 20, (family, compared)  # past the sliding window of 8, not stopped at once
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(server.http_url, "/v2/models/mixtral/generate", {"text_input": "hello", "max_tokens": 4})
    assert "has no tokenizer" in err.value.read().decode()

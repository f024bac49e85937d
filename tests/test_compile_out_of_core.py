"""Out-of-core compile: bf16 checkpoints streamed a layer at a time into an fp32 artifact, verified layer by layer.

The properties asserted are the streaming ones: no weight bytes inside model.onnx, every tensor converted
exactly, shards as asked, one decoder layer resident at a time, a corrupted layer named, nothing left behind
by a failure. Numerics: ONNX Runtime over the whole artifact against transformers' own fp32 load.
"""

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moec import zoo
from moec.cli import main
from moec.compile_out_of_core import wants_out_of_core
from moec.external_data import INLINE_BELOW, layer_key
from moec.lazy_checkpoint import LazyCheckpoint, decoder_layers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """bf16 checkpoints as `save_pretrained` writes them: per-expert tensors on disk, stacked in the module."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in ("qwen3_moe", "deepseek_v3"):
        path = str(root / family)
        zoo.build_hf_model(family).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
        out[family] = path
    return out


def _compile(source, out, *extra):
    return main(["compile", source, "--out", out, "--out-of-core", "on", "--task", "logits", "--quiet", *extra])


def _eager_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compiled(checkpoints, tmp_path_factory):
    out = {}
    for family, path in checkpoints.items():
        d = str(tmp_path_factory.mktemp("art") / family)
        assert _compile(path, d, "--shard-size", "150KB") == 0
        out[family] = d
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_the_streamed_artifact_matches_transformers_fp32_load(family, checkpoints, compiled):
    model = _eager_fp32(checkpoints[family])
    session = ort.InferenceSession(os.path.join(compiled[family], "model.onnx"))
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    report = json.load(open(os.path.join(compiled[family], "report.json")))
    assert report["out_of_core"] and report["numerics"]["passed"]
    assert report["moe_layers"]["fused"] == len(report["moe_layers"]["layers"]) >= 2
    assert [l["layer"] for l in report["numerics"]["layers"]] == [
        f"layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert all(l["rel_l2"] < 1e-5 for l in report["numerics"]["layers"])
    whole = report["numerics"]["end_to_end"]  # it fits: the whole artifact ran in one session too
    assert whole["ran"] and whole["rel_l2"] < 1e-5 and whole["peak_rss_bytes"] > 0
    assert len(whole["inputs"]) == len(report["numerics"]["inputs"])


def test_the_end_to_end_run_is_skipped_where_memory_would_not_hold_it(checkpoints, tmp_path, monkeypatch):
    from moec import compile_out_of_core

    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: 1 << 20)
    out = str(tmp_path / "out")
    assert _compile(checkpoints["qwen3_moe"], out) == 0
    whole = json.load(open(os.path.join(out, "report.json")))["numerics"]["end_to_end"]
    assert not whole["ran"] and "GiB are available" in whole["why"]


def test_a_whole_session_that_cannot_load_the_artifact_is_a_failure(compiled, tmp_path):
    """The child process's own failure (here: external data cut short) is a verification error, with ORT's words."""
    from types import SimpleNamespace

    from moec.errors import VerificationError
    from moec.verify_whole import run_whole

    d = str(tmp_path / "art")
    shutil.copytree(compiled["qwen3_moe"], d)
    data = next(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".data"))
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    probe = SimpleNamespace(feeds={"input_ids": np.zeros((1, 4), dtype=np.int64)}, expected={}, outputs={})
    with pytest.raises(VerificationError, match="could not run the whole artifact in one session"):
        run_whole(os.path.join(d, "model.onnx"), [probe], 1e-4)


def test_the_graph_holds_no_weight_bytes_and_shards_never_split_a_layer(compiled):
    d = compiled["qwen3_moe"]
    model = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    files_of: dict[str, set] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if not ext:
            assert len(t.raw_data) < INLINE_BELOW, t.name  # only scalars and small vectors stay inline
            continue
        files_of.setdefault(layer_key(t.name), set()).add(ext["location"])
    assert all(len(files) == 1 for key, files in files_of.items() if key), files_of
    shards = sorted({f for files in files_of.values() for f in files})
    assert len(shards) > 1
    groups_in = {f: {key for key, files in files_of.items() if f in files} for f in shards}
    for f in shards:  # 150KB asked: a shard holds at most that, unless one layer alone is larger
        assert os.path.getsize(os.path.join(d, f)) <= 150 * 1024 or len(groups_in[f]) == 1, (f, groups_in[f])


def test_bf16_tensors_are_converted_to_fp32_exactly(checkpoints, compiled):
    from onnx.numpy_helper import to_array
    from safetensors import safe_open

    d = compiled["qwen3_moe"]
    model = onnx.load(os.path.join(d, "model.onnx"))  # external data read
    arrays = {t.name: to_array(t) for t in model.graph.initializer}
    ck = LazyCheckpoint(checkpoints["qwen3_moe"])
    checked = 0
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        with safe_open(ck.files[name], "pt") as f:
            want = f.get_tensor(name)
        assert want.dtype == torch.bfloat16
        got = arrays["model." + name]
        assert got.dtype == np.float32 and np.array_equal(got, want.float().numpy())
        checked += 1
    assert checked == 3


def test_one_decoder_layer_is_resident_at_a_time(checkpoints, tmp_path, monkeypatch):
    """Before any layer is read, every other decoder layer's weights have been dropped again."""
    seen = []
    original = LazyCheckpoint.materialise

    def watched(self, model, group, dtype=torch.float32, **kw):
        _, layers = decoder_layers(model)
        resident = [i for i, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())]
        seen.append((group, resident))
        return original(self, model, group, dtype, **kw)

    monkeypatch.setattr(LazyCheckpoint, "materialise", watched)
    assert _compile(checkpoints["qwen3_moe"], str(tmp_path / "a")) == 0
    layer_loads = [r for g, r in seen if g]
    assert len(layer_loads) >= 4  # two layers written, two verified
    assert all(r == [] for r in layer_loads), seen


def test_the_embeddings_and_head_are_read_one_tensor_at_a_time(checkpoints, tmp_path, monkeypatch):
    """With a large vocabulary each is more than a decoder layer: no read of the group holds both, and the head is
    read only once the input embeddings were dropped (written apart; verified when it runs)."""
    loads = []
    original = LazyCheckpoint.materialise

    def watched(self, model, group, dtype=torch.float32, skip=None, **kw):
        if not group:
            read = [n for n in self.groups[""] if skip is None or not skip(n)]
            loads.append((read, not model.get_input_embeddings().weight.is_meta))
        return original(self, model, group, dtype, skip=skip, **kw)

    monkeypatch.setattr(LazyCheckpoint, "materialise", watched)
    out = str(tmp_path / "a")
    assert _compile(checkpoints["deepseek_v3"], out) == 0
    assert json.load(open(os.path.join(out, "report.json")))["numerics"]["passed"]
    assert loads and all(not {"model.embed_tokens.weight", "lm_head.weight"} <= set(read) for read, _ in loads)
    head = [embeddings_resident for read, embeddings_resident in loads if read == ["lm_head.weight"]]
    assert len(head) >= 2 and not any(head)  # written once, read again per verification probe


def test_layer_by_layer_verification_names_a_corrupted_layer(checkpoints, compiled, tmp_path):
    from moec.verify_layers import verify_layer_by_layer

    d = str(tmp_path / "copy")
    shutil.copytree(compiled["qwen3_moe"], d)
    model = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    target = next(t for t in model.graph.initializer if t.name == "model.model.layers.1.mlp.fc1")
    ext = {e.key: e.value for e in target.external_data}
    with open(os.path.join(d, ext["location"]), "r+b") as f:
        f.seek(int(ext["offset"]))
        f.write(np.random.default_rng(0).standard_normal(int(ext["length"]) // 4).astype(np.float32).tobytes())
    from moec.sources import CausalLMLogits

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    result = verify_layer_by_layer(os.path.join(d, "model.onnx"), LazyCheckpoint(checkpoints["qwen3_moe"]), 1e-4,
                                   [(ids,)], ["input_ids"], ["logits"], CausalLMLogits)
    assert result.layers[0].rel_l2 < 1e-5
    assert result.first_failing(1e-4).layer == "layers.1"
    assert not result.numerics(1e-4)["passed"]
    assert "starts at layers.1" in result.failure(1e-4)


def test_an_interrupt_while_streaming_leaves_nothing_behind(checkpoints, tmp_path, monkeypatch, capsys):
    from moec import compile_out_of_core

    calls = []

    def fail_second(self, key, values):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-stream
        yield from original(self, key, values)

    original = compile_out_of_core.LayerStreamer.fill
    monkeypatch.setattr(compile_out_of_core.LayerStreamer, "fill", fail_second)
    out = tmp_path / "out"
    assert _compile(checkpoints["qwen3_moe"], str(out)) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert calls == ["", "layers.0"]
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the temporary directory went too


def test_a_tensor_whose_shape_disagrees_is_named_and_nothing_written(checkpoints, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    ck = LazyCheckpoint(str(src))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors = load_file(ck.files[name])
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, ck.files[name], metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _compile(str(src), str(out)) == 3
    err = capsys.readouterr().err
    assert "o_proj.weight" in err and os.path.basename(ck.files[name]) in err
    assert not out.exists()


def test_a_truncated_shard_is_named(checkpoints, tmp_path, capsys):
    src = tmp_path / "trunc"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    shard = LazyCheckpoint(str(src)).files["model.layers.1.mlp.gate.weight"]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    assert _compile(str(src), str(tmp_path / "out")) == 3
    assert os.path.basename(shard) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fp16_converts_each_tensor_as_it_streams(checkpoints, tmp_path):
    """--dtype fp16 out of core: every floating-point weight written in fp16, each the checkpoint's value rounded
    as torch's .half() rounds it (and as the in-memory fp16 compile writes it); verified against eager fp16 layer
    by layer and end to end, and against fp32 within fp16's tolerance; fp32 inputs and outputs kept."""
    from onnx.numpy_helper import to_array
    from safetensors import safe_open

    path, out, whole = checkpoints["qwen3_moe"], str(tmp_path / "streamed"), str(tmp_path / "whole")
    assert _compile(path, out, "--dtype", "fp16") == 0
    model = onnx.load(os.path.join(out, "model.onnx"))
    arrays = {t.name: to_array(t, base_dir=out) for t in model.graph.initializer}
    floats = [a for a in arrays.values() if a.dtype.kind == "f"]
    assert floats and all(a.dtype == np.float16 for a in floats)
    ck = LazyCheckpoint(path)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        with safe_open(ck.files[name], "pt") as f:
            want = f.get_tensor(name).float().half().numpy()
        assert np.array_equal(arrays["model.model." + name], want), name
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT]
    report = json.load(open(os.path.join(out, "report.json")))
    n = report["numerics"]
    assert report["dtype"] == "fp16" and n["passed"] and n["against"] == "eager PyTorch in fp16"
    assert 1e-5 < n["inputs"][0]["rel_l2"] < 1e-2 and n["end_to_end"]["ran"] and n["end_to_end"]["rel_l2"] < 1e-2
    assert all(1e-6 < row["rel_l2"] < 1e-2 for row in n["vs_fp32"]["inputs"])
    assert main(["compile", path, "--out", whole, "--out-of-core", "off", "--task", "logits", "--quiet",
                 "--dtype", "fp16"]) == 0
    b = {t.name: to_array(t, base_dir=whole) for t in onnx.load(os.path.join(whole, "model.onnx")).graph.initializer}
    common = [k for k in arrays if k in b]
    assert len(common) >= 5 and all(np.array_equal(arrays[k], b[k]) for k in common)


def test_fp16_refuses_a_value_beyond_its_range_naming_the_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "ckpt")
    zoo.build_hf_model("qwen3_moe").to(torch.bfloat16).save_pretrained(path)
    state = load_file(os.path.join(path, "model.safetensors"))
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = 1e5
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    assert _compile(path, out, "--dtype", "fp16") != 0
    err = capsys.readouterr().err
    assert "layers.1.self_attn.o_proj.weight" in err and "beyond fp16's range" in err, err
    assert not os.path.exists(out)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fp16_and_bf16_are_refused_for_the_kv_cache_decoder(dtype, checkpoints, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["compile", checkpoints["qwen3_moe"], "--out", out, "--out-of-core", "on", "--quiet", "--dtype",
                 dtype]) == 2
    assert f"--task logits for an {dtype} input_ids -> logits graph" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_bf16_writes_the_checkpoints_bf16_bits_and_verifies_them_widened(checkpoints, tmp_path):
    """--dtype bf16 out of core from a bf16 checkpoint: every floating-point weight is the checkpoint's own bf16
    (no rounding at all), as the in-memory bf16 compile writes it; each segment and the whole artifact run widened
    to fp32 (the CPU provider has no bf16 kernels) against eager fp32 on those weights; `moec verify` replays it."""
    from onnx.numpy_helper import to_array
    from safetensors import safe_open

    path, out, whole = checkpoints["qwen3_moe"], str(tmp_path / "streamed"), str(tmp_path / "whole")
    assert _compile(path, out, "--dtype", "bf16") == 0
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    assert {t.data_type for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)} == {16}
    model = onnx.load(os.path.join(out, "model.onnx"))
    arrays = {t.name: to_array(t, base_dir=out) for t in model.graph.initializer}
    ck = LazyCheckpoint(path)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        with safe_open(ck.files[name], "pt") as f:
            want = f.get_tensor(name).view(torch.int16).numpy()
        assert np.array_equal(arrays["model.model." + name].view(np.int16), want), name
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT]
    report = json.load(open(os.path.join(out, "report.json")))
    n = report["numerics"]
    assert report["dtype"] == "bf16" and n["passed"] and n["against"] == "the bf16-weights reference"
    assert "widened to fp32" in n["evaluated_as"] and n["tolerance_rel_l2"] == 1e-2
    assert n["inputs"][0]["rel_l2"] < 1e-2 and n["end_to_end"]["ran"] and n["end_to_end"]["rel_l2"] < 1e-2
    assert n["end_to_end"]["vs_segmented"] < 1e-5  # the same widened graph, whole or a layer at a time
    # the checkpoint is bf16: its fp32 load is the same weights, so only the exporter's bf16 scalars differ
    assert all(row["rel_l2"] < 1e-2 for row in n["vs_fp32"]["inputs"])
    assert main(["verify", out]) == 0
    assert main(["compile", path, "--out", whole, "--out-of-core", "off", "--task", "logits", "--quiet",
                 "--dtype", "bf16"]) == 0
    b = {t.name: to_array(t, base_dir=whole) for t in onnx.load(os.path.join(whole, "model.onnx")).graph.initializer}
    common = [k for k in arrays if k in b]
    assert len(common) >= 5 and all(np.array_equal(arrays[k].view(np.int16), b[k].view(np.int16)) for k in common)


def test_options_it_does_not_stream_are_refused_by_name(checkpoints, tmp_path, capsys):
    assert _compile(checkpoints["qwen3_moe"], str(tmp_path / "out"), "--target", "tensorrt") == 2
    assert "--target tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_static_streams_the_logits_graph_at_the_example_shapes(checkpoints, tmp_path, capsys):
    """--static out of core: as in memory, input_ids -> logits with no dynamic dim, verified at the example's
    shapes; with --task text-generation refused before any work."""
    out = str(tmp_path / "out")
    assert main(["compile", checkpoints["qwen3_moe"], "--out", out, "--out-of-core", "on", "--static", "--quiet"]) == 0
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    dims = [[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
    assert dims == [[2, 8]] and [o.name for o in model.graph.output] == ["logits"]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["out_of_core"] and report["numerics"]["passed"]
    assert [i["input"] for i in report["numerics"]["inputs"]] == ["probe0 (input_ids (2, 8))"]
    assert any(n.startswith("--static") for n in report["capture"]["notes"])
    assert main(["compile", checkpoints["qwen3_moe"], "--out", str(tmp_path / "gen"), "--out-of-core", "on",
                 "--static", "--task", "text-generation", "--quiet"]) == 3
    assert "--static with --task text-generation" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()


def test_without_a_task_it_streams_the_kv_cache_decoder(checkpoints, tmp_path):
    """The same decoder an in-memory compile makes: same inputs and outputs, same values on a prefill with a
    cached prefix and left padding, genai_config.json beside it."""
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    assert main(["compile", checkpoints["deepseek_v3"], "--out", str(streamed), "--out-of-core", "on", "--quiet"]) == 0
    assert main(["compile", checkpoints["deepseek_v3"], "--out", str(whole), "--out-of-core", "off", "--quiet"]) == 0
    a = ort.InferenceSession(str(streamed / "model.onnx"))
    b = ort.InferenceSession(str(whole / "model.onnx"))
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    assert "past_key_values.0.key" in [i.name for i in a.get_inputs()]
    report = json.load(open(streamed / "report.json"))
    assert report["numerics"]["passed"] and len(report["numerics"]["inputs"]) == 2  # prefill and a decode step
    rng = np.random.default_rng(0)
    feeds = {}
    for i in a.get_inputs():
        shape = [{"batch": 2, "seq": 3, "past": 4, "total": 7}.get(d, d) for d in i.shape]
        feeds[i.name] = (rng.integers(0, 128, shape) if i.name == "input_ids" else np.ones(shape) if
                         i.name == "attention_mask" else np.tile(np.arange(4, 7), (2, 1)) if i.name == "position_ids"
                         else rng.standard_normal(shape)).astype(np.int64 if "float" not in i.type else np.float32)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        assert x.shape == y.shape and np.linalg.norm(x - y) / np.linalg.norm(y) < 1e-5


def test_the_streamed_decoder_lowers_attention_as_in_memory(hf_dir, hf_decoder, tmp_path):
    """Attention becomes GroupQueryAttention out of core too (decided on the meta decoder): the same nodes as
    the in-memory compile's (the run's shared one), and the same outputs on a batched chunk after a prefix, a
    decode step and a prompt."""
    outs = {"on": str(tmp_path / "on"), "off": hf_decoder("qwen3_moe").out_dir}
    assert main(["compile", str(hf_dir("qwen3_moe")), "--out", outs["on"], "--out-of-core", "on", "--quiet"]) == 0

    def attention_ops(mode):
        graph = onnx.load(os.path.join(outs[mode], "model.onnx"), load_external_data=False).graph
        return [a.g.node[-1].op_type for n in graph.node if n.op_type == "If" for a in n.attribute
                if a.name == "else_branch"]
    assert attention_ops("on") == attention_ops("off") == ["GroupQueryAttention"] * 2
    a, b = (ort.InferenceSession(os.path.join(outs[mode], "model.onnx")) for mode in ("on", "off"))
    rng = np.random.default_rng(0)
    for batch, seq, past in [(2, 3, 4), (1, 1, 6), (3, 5, 0)]:
        sizes = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        feeds = {}
        for i in a.get_inputs():
            shape = [sizes.get(d, d) for d in i.shape]
            feeds[i.name] = (rng.integers(0, 128, shape) if i.name == "input_ids" else np.ones(shape, np.int64)
                             if i.name == "attention_mask" else np.tile(np.arange(past, past + seq), (batch, 1))
                             if i.name == "position_ids" else rng.standard_normal(shape).astype(np.float32))
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_auto_streams_only_what_would_not_fit(checkpoints, monkeypatch):
    from moec import compile_out_of_core

    path = checkpoints["qwen3_moe"]
    fp32 = LazyCheckpoint(path).numel * 4
    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: fp32)  # 100% of what is free
    assert wants_out_of_core(path, "auto")
    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: fp32 * 100)
    assert not wants_out_of_core(path, "auto")
    assert wants_out_of_core(path, "on") and not wants_out_of_core(path, "off")
    assert not wants_out_of_core("moec.zoo:qwen3_moe", "auto")  # a factory is a module already in memory


@pytest.mark.parametrize("quant", [["int4"], ["int8", "--asymmetric"]])
def test_quantized_experts_stream_the_codes_the_in_memory_compile_makes(quant, checkpoints, tmp_path):
    from onnx.numpy_helper import to_array

    streamed, whole = str(tmp_path / "streamed"), str(tmp_path / "whole")
    assert _compile(checkpoints["qwen3_moe"], streamed, "--quant", *quant, "--accuracy-budget", "0.9") == 0
    assert main(["compile", checkpoints["qwen3_moe"], "--out", whole, "--out-of-core", "off", "--task", "logits",
                 "--quiet", "--quant", *quant]) == 0
    a = {t.name: to_array(t, base_dir=streamed) for t in onnx.load(os.path.join(streamed, "model.onnx")).graph.initializer}
    b = {t.name: to_array(t) for t in onnx.load(os.path.join(whole, "model.onnx")).graph.initializer}
    codes = [n for n in a if n.endswith(("mlp.fc1", "mlp.fc2", "fc1_scales", "fc2_scales", "fc1_zero_points"))]
    assert len(codes) >= 8 and all(a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]) for n in codes), codes
    report = json.load(open(os.path.join(streamed, "report.json")))
    q = report["quantization"]
    assert q["weight_bytes_quantized"] < q["weight_bytes_fp32"] and len(q["layers"]) == 2
    assert report["numerics"]["passed"] and report["numerics"]["against"] == "the dequantized reference"
    assert report["numerics"]["inputs"][0]["rel_l2"] < 1e-5  # exact against the dequantized layers
    assert q["logits_vs_fp32"]["rel_l2"] > 1e-4  # and quantization did move the logits from full precision
    assert q["accuracy_budget"] == 0.9  # gated, and within it


def test_quant_auto_out_of_core_chooses_what_the_in_memory_compile_chooses(checkpoints, tmp_path, capsys):
    """--quant auto streamed: the same sensitivities, uniform errors and choice as the whole-model search (the
    errors measured a decoder layer at a time, many choices a pass), each layer written at its precision with the
    in-memory compile's codes, verified exactly against the dequantized reference and within the budget."""
    from onnx.numpy_helper import to_array

    streamed, whole = str(tmp_path / "streamed"), str(tmp_path / "whole")
    assert _compile(checkpoints["qwen3_moe"], streamed, "--quant", "auto", "--accuracy-budget", "0.1") == 0
    assert main(["compile", checkpoints["qwen3_moe"], "--out", whole, "--out-of-core", "off", "--task", "logits",
                 "--quiet", "--quant", "auto", "--accuracy-budget", "0.1"]) == 0
    report = json.load(open(os.path.join(streamed, "report.json")))
    q, w = report["quantization"], json.load(open(os.path.join(whole, "report.json")))["quantization"]
    auto, want = q["auto"], w["auto"]
    inner = {k.removeprefix("model."): v for k, v in want["choice"].items()}  # in memory: under the task wrapper
    assert auto["choice"] == inner and sorted(inner.values()) == ["int4", "int8"]  # int8 within, int4 over
    for path, errors in auto["sensitivity"].items():
        assert errors == pytest.approx(want["sensitivity"]["model." + path], rel=1e-4)
    assert [u["rel_l2"] for u in auto["uniform"]] == pytest.approx([u["rel_l2"] for u in want["uniform"]], rel=1e-4)
    assert auto["passes"] >= 2 and auto["measured_rel_l2"] <= 0.1
    assert q["logits_vs_fp32"]["rel_l2"] == pytest.approx(auto["measured_rel_l2"], rel=1e-3)  # what it measured
    assert q["weight_bytes_quantized"] == w["weight_bytes_quantized"] < auto["uniform"][2]["weight_bytes"]
    assert sorted(l["quantization"].split()[0] for l in q["layers"]) == ["int4", "int8"]
    assert report["numerics"]["passed"] and report["numerics"]["inputs"][0]["rel_l2"] < 1e-5
    a = {t.name: to_array(t, base_dir=streamed) for t in onnx.load(os.path.join(streamed, "model.onnx")).graph.initializer}
    b = {t.name: to_array(t) for t in onnx.load(os.path.join(whole, "model.onnx")).graph.initializer}
    codes = [n for n in a if n.endswith(("mlp.fc1", "mlp.fc2", "fc1_scales", "fc2_scales"))]
    assert len(codes) == 8 and all(a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]) for n in codes), codes
    assert json.load(open(os.path.join(streamed, "golden", "manifest.json")))["precision"] == "auto"
    capsys.readouterr()
    assert main(["inspect", streamed, "--quant"]) == 0
    assert "--quant auto, budget 0.1" in capsys.readouterr().out


def test_quant_auto_with_calibration_out_of_core_measures_and_writes_the_in_memory_gptq_codes(checkpoints, tmp_path,
                                                                                            monkeypatch, capsys):
    """--quant auto --calibration streamed: every layer's experts GPTQ-solved at each precision first (the
    calibration data carried a layer at a time), the search measuring those codes: the in-memory search's
    sensitivities (GPTQ's, not round-to-nearest's), choice and codes byte for byte; the writer writes the codes
    the search measured (neither solved again nor the data carried again); the solved codes' work directory gone
    after. A layer whose experts are read whole can't be calibrated out of core: refused by name."""
    from onnx.numpy_helper import to_array

    import moec.gptq
    from moec.calibrate_streamed import LayerInputs
    from moec.quantize_streamed import StreamedQuantizer

    flags = ("--quant", "auto", "--accuracy-budget", "0.1", "--calibration", "random:16")
    streamed, whole = str(tmp_path / "streamed"), str(tmp_path / "whole")
    solved, carried = [], []
    with pytest.MonkeyPatch.context() as m:
        solve, advance = moec.gptq.quantize_expert, LayerInputs.advance
        m.setattr(moec.gptq, "quantize_expert", lambda *a, **k: (solved.append(a[5]), solve(*a, **k))[1])
        m.setattr(LayerInputs, "advance", lambda self, key, *a, **k: (carried.append(key), advance(self, key, *a, **k))[1])
        assert _compile(checkpoints["qwen3_moe"], streamed, *flags) == 0
    assert carried == ["layers.0", "layers.1"]  # once, before the search
    assert len(solved) == 2 * 8 * 3  # each layer's 8 experts at int2, int4 and int8: none solved again to write
    assert main(["compile", checkpoints["qwen3_moe"], "--out", whole, "--out-of-core", "off", "--task", "logits",
                 "--quiet", *flags]) == 0
    assert sorted(os.listdir(tmp_path)) == ["streamed", "whole"]  # no work directory left beside them
    q, w = (json.load(open(os.path.join(d, "report.json")))["quantization"] for d in (streamed, whole))
    auto, want = q["auto"], w["auto"]
    assert auto["choice"] == {k.removeprefix("model."): v for k, v in want["choice"].items()}
    assert sorted(auto["choice"].values()) == ["int4", "int8"]
    for path, errors in auto["sensitivity"].items():
        assert errors == pytest.approx(want["sensitivity"]["model." + path], rel=1e-4)
    assert "GPTQ" in auto["measured_on"] and q["method"] == "gptq (calibrated)"
    assert [l["method"] for l in q["layers"]] == [l["method"] for l in w["layers"]]
    assert all(l["method"].startswith("gptq on ") and not l["method"].startswith("gptq on 0 ") for l in q["layers"])
    assert q["logits_vs_fp32"]["rel_l2"] == pytest.approx(auto["measured_rel_l2"], rel=1e-3)
    assert auto["measured_rel_l2"] <= 0.1
    a = {t.name: to_array(t, base_dir=streamed) for t in onnx.load(os.path.join(streamed, "model.onnx")).graph.initializer}
    b = {t.name: to_array(t) for t in onnx.load(os.path.join(whole, "model.onnx")).graph.initializer}
    codes = [n for n in a if n.endswith(("mlp.fc1", "mlp.fc2", "fc1_scales", "fc2_scales"))]
    assert len(codes) == 8 and all(a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]) for n in codes), codes
    assert json.load(open(os.path.join(streamed, "report.json")))["numerics"]["passed"]
    # the routing the report gives is that one run's: the in-memory compile's counts
    rs, rw = (json.load(open(os.path.join(d, "report.json")))["routing"] for d in (streamed, whole))
    assert len(rs) == 2 and [l["counts"] for l in rs] == [l["counts"] for l in rw] and rs[0]["tokens"] > 0

    short = tmp_path / "short.npy"  # 4 tokens for 8 experts: named while the codes are solved, nothing left
    np.save(short, np.array([[1, 2, 3, 4]]))
    capsys.readouterr()
    assert _compile(checkpoints["qwen3_moe"], str(tmp_path / "refused"), *flags[:4], "--calibration", str(short)) == 24
    assert "4 calibration tokens reach model.layers.0.mlp, fewer than its 8 experts" in capsys.readouterr().err
    monkeypatch.setattr(StreamedQuantizer, "_streamable", lambda self, model, planned: None)
    assert _compile(checkpoints["qwen3_moe"], str(tmp_path / "refused"), *flags) == 2
    assert "model.layers.0.mlp: its experts are read whole" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["short.npy", "streamed", "whole"]


def test_quant_auto_out_of_core_keeps_layers_at_full_precision_under_a_tight_budget(checkpoints, tmp_path):
    out = str(tmp_path / "out")
    assert _compile(checkpoints["deepseek_v3"], out, "--quant", "auto", "--accuracy-budget", "1e-5") == 0
    report = json.load(open(os.path.join(out, "report.json")))
    q = report["quantization"]
    assert set(q["auto"]["choice"].values()) == {"fp32"} and q["logits_vs_fp32"]["rel_l2"] < 1e-5
    assert all(l["method"] == "kept at full precision" for l in q["layers"]) and len(q["layers"]) == 2
    assert all(l["lowered_to"].startswith("com.microsoft.MoE") for l in report["moe_layers"]["layers"])
    assert report["numerics"]["passed"]


def test_an_accuracy_budget_the_quantization_exceeds_writes_nothing(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compile(checkpoints["qwen3_moe"], str(out), "--quant", "int4", "--accuracy-budget", "0.001") == 16
    err = capsys.readouterr().err
    assert "--accuracy-budget 0.001: int4 per-row quantization moves the logits by relative L2" in err
    assert "Worst layers: model.layers." in err and not out.exists()


def test_quant_dense_streams_the_in_memory_codes_head_and_shared_experts(tmp_path, monkeypatch):
    """--quant-dense out of core: attention, shared experts and an LM head tied to the embeddings become the
    in-memory compile's MatMulNBits byte for byte; the router and the shared-expert gate stay fp32; each layer's
    Linears are quantized when that layer streams; verified exactly against the dequantized reference."""
    from onnx.numpy_helper import to_array

    from moec.targets.onnxruntime import quantize_dense

    path = str(tmp_path / "ckpt")
    zoo.build_hf_model("qwen2_moe", hidden_size=64, head_dim=16, tie_word_embeddings=True).to(
        torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    quantized, linear = [], quantize_dense.quantize_linear

    def spy(path, lin, *args, **kwargs):  # the paths quantized, in order, and whether the weight was read yet
        quantized.append((path, lin.weight.is_meta))
        return linear(path, lin, *args, **kwargs)

    monkeypatch.setattr(quantize_dense, "quantize_linear", spy)
    arts, reports = {}, {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert main(["compile", path, "--out", out, "--out-of-core", mode, "--task", "logits", "--quiet", "--quant",
                     "int4", "--quant-dense"]) == 0
        arts[mode] = {t.name: to_array(t, base_dir=out) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}
        reports[mode] = json.load(open(os.path.join(out, "report.json")))
        if mode == "on":
            streamed = [p for p, meta in quantized if not meta]
            # the graph's (meta) pass first, then per layer group as it streams: head, layer 0, layer 1
            assert streamed == ["lm_head"] + [p for p, meta in quantized if meta and p != "lm_head"]
            assert [layer_key(p + ".") for p in streamed] == [""] + ["layers.0"] * 6 + ["layers.1"] * 6
    packed = sorted(n for n in arts["on"] if n.endswith(".packed"))
    assert packed == sorted(n for n in arts["off"] if n.endswith(".packed")) and len(packed) == 13
    assert "model.lm_head.packed" in packed and "model.model.layers.1.mlp.shared.up_proj.packed" in packed
    shared = set(arts["on"]) & set(arts["off"])
    assert [n for n in shared if not np.array_equal(arts["on"][n], arts["off"][n])] == []
    on, off = (reports[m]["quantization"] for m in ("on", "off"))
    kept = {k["path"]: k["reason"] for k in on["dense"]["kept_fp32"]}
    assert "chooses experts" in kept["model.layers.0.mlp.shared_gate"]
    assert len(on["dense"]["layers"]) == len(off["dense"]["layers"]) == 13
    assert on["weight_bytes_quantized"] == off["weight_bytes_quantized"] < on["weight_bytes_fp32"] / 5
    n = reports["on"]["numerics"]
    assert n["passed"] and n["against"] == "the dequantized reference" and n["inputs"][0]["rel_l2"] < 1e-5
    assert n["end_to_end"]["ran"] and n["end_to_end"]["rel_l2"] < 1e-5
    assert abs(on["logits_vs_fp32"]["rel_l2"] - off["logits_vs_fp32"]["rel_l2"]) < 1e-5 * off["logits_vs_fp32"]["rel_l2"]
    assert all(0 < l["rel_l2_vs_fp32"] < 0.2 for l in on["dense"]["layers"])


def test_calibration_carries_the_data_a_layer_at_a_time_into_the_in_memory_gptq_codes(checkpoints, tmp_path,
                                                                                          monkeypatch):
    """--calibration out of core: the calibration batches advance one decoder layer at a time (in order, each
    layer read once for them), and each streamed layer's experts are GPTQ-solved on the tokens routed to them:
    the codes are the in-memory compile's byte for byte, so are the choices, and the routing statistics; the
    artifact verifies exactly against its (read back) codes dequantized."""
    from onnx.numpy_helper import to_array

    from moec.calibrate_streamed import LayerInputs
    from moec.stream_experts import ExpertReader

    advanced, advance, load = [], LayerInputs.advance, ExpertReader._load
    reads: dict = {}  # layer -> (fused layer, expert) -> reads from the checkpoint while the data went through it
    inside: list = []

    def spy(self, key, prune=None):
        advanced.append(key)
        reads[key], inside[:] = {}, [key]
        try:
            return advance(self, key, prune)
        finally:
            inside.clear()

    def counted(self, layer, e, values=None):
        if inside:
            reads[inside[0]][(layer.path, e)] = reads[inside[0]].get((layer.path, e), 0) + 1
        return load(self, layer, e, values)

    monkeypatch.setattr(LayerInputs, "advance", spy)
    monkeypatch.setattr(ExpertReader, "_load", counted)
    arts, reports = {}, {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert main(["compile", checkpoints["qwen3_moe"], "--out", out, "--out-of-core", mode, "--task", "logits",
                     "--quiet", "--quant", "int4", "--calibration", "random:16"]) == 0
        arts[mode] = {t.name: to_array(t, base_dir=out) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}
        reports[mode] = json.load(open(os.path.join(out, "report.json")))
    assert advanced == ["layers.0", "layers.1"]
    # the batches carried through a layer (two runs), then its routing counted: each of its 8 experts read from
    # the checkpoint once for all of it (KeptExperts), not once a run
    for key in advanced:
        assert sorted(reads[key].values()) == [1] * 8, (key, reads[key])
    codes = [n for n in arts["on"] if n.endswith(("mlp.fc1", "mlp.fc2", "fc1_scales", "fc2_scales"))]
    assert len(codes) == 8 and all(np.array_equal(arts["on"][n], arts["off"][n]) for n in codes)
    on, off = (reports[m]["quantization"] for m in ("on", "off"))
    assert [l["method"] for l in on["layers"]] == [l["method"] for l in off["layers"]]
    assert all(l["method"].startswith("gptq on ") and not l["method"].startswith("gptq on 0 ") for l in on["layers"])
    assert on["method"] == "gptq (calibrated)"
    assert reports["on"]["calibration"] == reports["off"]["calibration"]
    for a, b in zip(reports["on"]["routing"], reports["off"]["routing"]):
        assert a["counts"] == b["counts"] and np.allclose(a["contribution"], b["contribution"], rtol=1e-4)
    n = reports["on"]["numerics"]
    assert n["passed"] and n["inputs"][0]["rel_l2"] < 1e-5 and n["end_to_end"]["rel_l2"] < 1e-5
    assert abs(on["logits_vs_fp32"]["rel_l2"] - off["logits_vs_fp32"]["rel_l2"]) < 1e-5


def test_calibration_with_quant_dense_out_of_core_calibrates_each_layers_linears(tmp_path):
    """Out of core, --calibration with --quant-dense calibrates each decoder layer's dense Linears as the data
    reaches the layer, and the head once it went through them all (its group written last): on correlated states
    (spectrum 1) GPTQ's codes are kept for some, the artifact's MatMulNBits codes are theirs (not
    round-to-nearest's), and the verification's reference computes with them (exact); the report says how each
    was chosen, and the capture notes how."""
    from onnx.numpy_helper import to_array

    from moec.quant import QuantSpec, quantize_nbits

    path = str(tmp_path / "ckpt")
    # the head tied to the input embeddings: its reference is a new parameter, the embeddings keep theirs
    zoo.build_hf_model("qwen3_moe", hidden_size=64, head_dim=16, moe_intermediate_size=32, spectrum=1.0,
                       tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    out = str(tmp_path / "out")
    assert _compile(path, out, "--quant", "int4", "--block-size", "32", "--quant-dense", "--calibration",
                    "random:16") == 0
    report = json.load(open(os.path.join(out, "report.json")))
    q = report["quantization"]
    assert all(l["method"].startswith("gptq on ") for l in q["layers"])
    methods = {l["path"]: l["method"] for l in q["dense"]["layers"]}
    assert len(methods) == 9
    assert methods.pop("lm_head") == "gptq"  # on its own held-out tokens: the logits
    gptq = [p for p, m in methods.items() if m == "gptq"]
    assert gptq and set(methods.values()) <= {"gptq"} | {
        f"round-to-nearest (GPTQ's codes moved layers.{i}'s output more on held-out calibration data)" for i in (0, 1)}
    assert any("each decoder layer's dense Linears keep GPTQ's codes" in n and "the output head's where" in n
               for n in report["capture"]["notes"])
    weights = _eager_fp32(path).state_dict()
    written = {t.name: t for t in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph.initializer}
    gptq.append("lm_head")
    rounded = [p for p in methods if p not in gptq]
    for p in gptq + rounded:  # GPTQ's codes are what was written where they were kept, round-to-nearest's elsewhere
        name = next(n for n in written if n.endswith(f"{p}.packed"))
        nearest = quantize_nbits(weights[f"{p}.weight"], QuantSpec(4, 32, True), p, reference=False)[0].packed
        same = np.array_equal(to_array(written[name], base_dir=out).reshape(nearest.shape), nearest)
        assert same == (p in rounded), p
    n = report["numerics"]
    assert n["passed"] and n["inputs"][0]["rel_l2"] < 1e-5 and n["end_to_end"]["rel_l2"] < 1e-5


def test_calibration_too_short_for_the_experts_is_named_and_nothing_written(checkpoints, tmp_path, capsys):
    data = tmp_path / "short.npy"
    np.save(data, np.array([[1, 2, 3, 4]], dtype=np.int64))  # 4 tokens for 8 experts
    out = tmp_path / "out"
    assert _compile(checkpoints["qwen3_moe"], str(out), "--quant", "int4", "--calibration", str(data)) == 24
    err = capsys.readouterr().err
    assert "4 calibration tokens reach model.layers.0.mlp, fewer than its 8 experts" in err
    assert not out.exists()


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "granitemoe"])
def test_quantized_experts_are_read_one_expert_at_a_time(family, checkpoints, tmp_path, monkeypatch):
    """With --quant, no load reads a layer's experts whole: the layer loader skips every expert tensor and each
    expert load holds one expert (per-expert names renamed to expert 0, tensors stored stacked sliced to one);
    the artifact is still the in-memory compile's, codes and biases byte for byte. GPT-OSS and Granite-MoE store
    their experts stacked on disk (and GPT-OSS has [E, N] biases beside them); DeepSeek-V3 stores them per expert,
    as Qwen3-MoE does (whose codes test_quantized_experts_stream_the_codes_the_in_memory_compile_makes compares),
    with a shared expert and a selection bias beside them."""
    from onnx.numpy_helper import to_array

    from moec import lazy_checkpoint, stream_experts
    from moec.stream_experts import expert_index

    path = checkpoints.get(family)
    if path is None:
        path = str(tmp_path / "ckpt")
        zoo.build_hf_model(family).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    shapes = LazyCheckpoint(path).shapes
    experts = {n for n, shape in shapes.items() if layer_key(n) and (expert_index(n) is not None or len(shape) == 3)}
    assert experts
    layer_loads, expert_loads = [], []
    whole, one = lazy_checkpoint.load_converted, stream_experts.load_converted

    def layer_load(model, state, dtype=torch.float32):
        layer_loads.append(set(state))
        return whole(model, state, dtype)

    def expert_load(model, state, dtype=torch.float32):
        expert_loads.append({n: tuple(t.shape) if isinstance(t, torch.Tensor) else None for n, t in state.items()})
        return one(model, state, dtype)

    monkeypatch.setattr(lazy_checkpoint, "load_converted", layer_load)
    monkeypatch.setattr(stream_experts, "load_converted", expert_load)
    streamed, in_memory = str(tmp_path / "streamed"), str(tmp_path / "whole")
    assert _compile(path, streamed, "--quant", "int4") == 0
    assert not any(names & experts for names in layer_loads)  # the layer loader never read an expert tensor
    assert expert_loads and all(expert_index(n) in (None, 0) for load in expert_loads for n in load)
    assert all(shape[0] == 1 for load in expert_loads for shape in load.values() if shape is not None)
    report = json.load(open(os.path.join(streamed, "report.json")))
    assert report["numerics"]["passed"] and report["numerics"]["inputs"][0]["rel_l2"] < 1e-5, report["numerics"]
    assert main(["compile", path, "--out", in_memory, "--out-of-core", "off", "--task", "logits", "--quiet",
                 "--quant", "int4"]) == 0
    a = {t.name: to_array(t, base_dir=streamed) for t in onnx.load(os.path.join(streamed, "model.onnx")).graph.initializer}
    b = {t.name: to_array(t) for t in onnx.load(os.path.join(in_memory, "model.onnx")).graph.initializer}
    moe = [n for n in b if ".fc1" in n or ".fc2" in n]
    common = [n for n in b if n in a]  # routers, shared experts, attention: all the in-memory compile's too
    assert len(moe) >= 4 and set(moe) <= set(common) and len(common) >= len(moe) + 4
    assert all(a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]) for n in common)


def test_a_reading_the_experts_do_not_follow_is_refused_naming_the_layer(checkpoints, tmp_path, monkeypatch, capsys):
    """The layer as written, run with its experts read one at a time, checks the fused reading on the real weights:
    a wrong reading (gate and up swapped) stops the compile at that layer, nothing written."""
    from moec import plan_model

    real = plan_model.reading_of

    def swapped(original, fused, tensor_index=None):
        layout, biases, one_by_one = real(original, fused, tensor_index)
        return layout.replace("gate|up", "up|gate"), biases, one_by_one

    monkeypatch.setattr(plan_model, "reading_of", swapped)
    out = str(tmp_path / "out")
    assert _compile(checkpoints["qwen3_moe"], out, "--quant", "int4") != 0
    err = capsys.readouterr().err
    assert "model.layers.0.mlp" in err and "do not reproduce the layer as written" in err, err
    assert not os.path.exists(out)


def test_a_triton_repository_entry_is_written_as_for_any_artifact(checkpoints, tmp_path):
    repo = tmp_path / "repo"
    assert _compile(checkpoints["qwen3_moe"], str(tmp_path / "out"), "--triton-repo", str(repo), "--model-name",
                    "big", "--device-memory", "1GiB") == 0
    assert (repo / "big" / "config.pbtxt").is_file() and (repo / "big" / "1" / "model.onnx").is_file()
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert report["triton"]["model_dir"] == str(repo / "big")
    # --device-memory: checked on the plan from shapes; what it derives sizes the Triton model as in memory
    memory = report["memory"]
    assert memory["device_memory"]["fits"] and memory["device_memory"]["budget_bytes"] == 2**30
    config = (repo / "big" / "config.pbtxt").read_text()
    assert f"max_batch_size: {memory['derived']['triton_max_batch_size']}" in config
    assert f"count: {memory['derived']['triton_instances']}" in config


def test_a_device_memory_the_model_exceeds_is_refused_before_any_weight_is_read(checkpoints, tmp_path, capsys,
                                                                                 monkeypatch):
    read = []
    monkeypatch.setattr(LazyCheckpoint, "materialise", lambda *a, **k: read.append(a))
    out = tmp_path / "out"
    assert _compile(checkpoints["qwen3_moe"], str(out), "--device-memory", "1MiB") == 19
    err = capsys.readouterr().err
    assert "does not fit in 1.00 MiB at the max profile" in err and "Nothing was written" in err
    assert read == [] and not out.exists()


def test_what_can_be_refused_is_refused_before_any_work(checkpoints, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert _compile(checkpoints["qwen3_moe"], str(existing)) == 9  # never overwritten without --force
    fp8 = tmp_path / "fp8"
    shutil.copytree(checkpoints["qwen3_moe"], fp8)
    cfg = json.load(open(fp8 / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    json.dump(cfg, open(fp8 / "config.json", "w"))
    capsys.readouterr()
    assert _compile(str(fp8), str(tmp_path / "out")) == 2
    assert "is a fp8 checkpoint" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_moec_verify_replays_the_goldens_one_layer_at_a_time(compiled, tmp_path, capsys):
    d = str(tmp_path / "copy")
    shutil.copytree(compiled["deepseek_v3"], d)
    capsys.readouterr()
    assert main(["verify", d]) == 0
    assert "one decoder layer at a time" in capsys.readouterr().out
    model = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    target = next(t for t in model.graph.initializer if t.name == "model.model.layers.2.mlp.fc2")
    ext = {e.key: e.value for e in target.external_data}
    with open(os.path.join(d, ext["location"]), "r+b") as f:  # a corrupted expert weight in the last layer
        f.seek(int(ext["offset"]))
        f.write(np.ones(int(ext["length"]) // 4, np.float32).tobytes())
    assert main(["verify", d]) != 0


def test_the_report_keeps_what_capture_rewrote(tmp_path):
    """Llama 4's complex rotary embeddings are rewritten at conversion; the streamed report says so, as the
    in-memory one does."""
    path, out = str(tmp_path / "llama4"), str(tmp_path / "out")
    zoo.build_hf_model("llama4").to(torch.bfloat16).save_pretrained(path)
    assert _compile(path, out) == 0
    notes = json.load(open(os.path.join(out, "report.json")))["capture"]["notes"]
    assert any(n.startswith("rewrite_complex_rope: ") for n in notes)

"""compressed-tensors, GPTQ and AWQ checkpoints compiled out of core: the checkpoint's codes, one Linear at a time.

The checkpoints are tests/test_gptq_checkpoint.py's (written from GPTQ's and AWQ's published layouts, the expected
weights and codes computed there from the formats' formulas) and tests/test_compressed_tensors_checkpoint.py's
(written by compressed-tensors itself). Asserted: the streamed artifact carries exactly the codes, scales and zero
points the in-memory fold writes (and the attention the formats' dequantization), only one expert's Linears are
ever held unpacked, the layer-by-layer and end-to-end checks ran; what can't be folded is refused before anything
is captured, or, found while streaming, with nothing written.
"""

import json
import os
import weakref

import numpy as np
import onnx
import pytest
import torch
from onnx.numpy_helper import to_array
from safetensors.torch import load_file, save_file

from moec.cli import main
from moec.external_data import layer_key
from moec.errors import MoecError
from moec.fold_checkpoint import READERS
from moec.lazy_checkpoint import LazyCheckpoint
from moec.packed_stream import PackedStream
from test_gptq_checkpoint import CASES, write_checkpoint


def _initializers(out):
    return {t.name: to_array(t) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}


def _compile(path, out, mode, *args):
    return main(["compile", path, "--out", out, "--out-of-core", mode, "--task", "logits", "--quiet", *args])


def _alive(monkeypatch):
    """Records which experts' Linears were unpacked, and the most unpacked Linears alive at once anywhere in the
    process (weak references: a Linear counts until nothing holds it)."""
    alive, seen, most = weakref.WeakValueDictionary(), set(), [0]
    linear = PackedStream.linear

    def spy(self, prefix):
        got = linear(self, prefix)
        alive[id(got)] = got
        seen.add((layer_key(prefix + "."), self.linears[prefix].expert))
        most[0] = max(most[0], len(alive))
        return got

    monkeypatch.setattr(PackedStream, "linear", spy)
    return seen, most


def _streamed_is_in_memory(path, tmp_path, monkeypatch, fmt, zero_points, experts, dense=4):
    """Compiles `path` both ways; returns the out-of-core artifact's initializers, having asserted they equal the
    in-memory fold's on every shared name (the QMoE codes, scales and zero points among them), that every one of
    the two MoE layers' `experts` was read, and that at most one layer's `dense` quantized Linears (attention,
    shared experts) or one expert's three were ever unpacked at once (of dense + 3 x experts a layer)."""
    seen, most = _alive(monkeypatch)
    arts = {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert _compile(path, out, mode) == 0
        arts[mode] = _initializers(out)
        if mode == "on":
            report = json.load(open(os.path.join(out, "report.json")))
            q, n = report["quantization"], report["numerics"]
            assert report["out_of_core"] and q["checkpoint_format"] == fmt and q["method"] == "the checkpoint's codes"
            assert n["passed"] and n["end_to_end"]["ran"] and n["end_to_end"]["rel_l2"] < 1e-5
            assert q["logits_vs_fp32"]["rel_l2"] < 1e-5  # the reference is the checkpoint's weights: nothing moved
            assert any("dequantized to fp32 weights" in note for note in report["capture"]["notes"])
            assert len({k for k in seen if k[1] is not None}) == 2 * experts and 3 <= most[0] <= max(dense, 3)
    shared = set(arts["on"]) & set(arts["off"])
    qmoe = [n for n in shared if n.rsplit(".", 1)[-1].startswith(("fc1", "fc2"))]
    assert len(qmoe) == 2 * (4 + 2 * zero_points)  # fc1/fc2 codes and scales (and zero points) of two layers
    assert [n for n in shared if not np.array_equal(arts["on"][n], arts["off"][n])] == []
    return arts["on"]


def test_gptq_streams_the_checkpoints_codes_and_zero_points(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, sym=False)  # GPTQ's original format (zero points stored minus one)
    art = _streamed_is_in_memory(path, tmp_path, monkeypatch, "GPTQ", zero_points=True, experts=8)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert np.array_equal(art["model." + name], expected[name].numpy())  # exactly the format's dequantization


def test_awq_streams_through_mixtrals_renaming(tmp_path, monkeypatch):
    """Mixtral's checkpoints name experts block_sparse_moe.experts.N.w1/w2/w3: the codes follow transformers'
    renaming and stacking exactly as the weights do."""
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, fmt="awq", sym=False, family="mixtral")
    art = _streamed_is_in_memory(path, tmp_path, monkeypatch, "AWQ (GEMM)", zero_points=True, experts=6)
    for e in range(6):  # QMoE's fc2: each expert's w2 codes, two 4-bit columns a byte, low first
        packed = art["model.model.layers.1.mlp.fc2"][e]
        got = np.stack([(packed >> (4 * i)) & 15 for i in range(2)], -1).reshape(packed.shape[0], -1)
        assert np.array_equal(got, expected[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight:codes"].numpy())


def test_deepseek_v3_streams_gptq_v2_per_channel(tmp_path, monkeypatch):
    """DeepSeek-V3: a dense first layer, shared experts and MLA attention quantized beside the routed experts
    (five attention and three shared-expert Linears a layer, dequantized), grouped routing; GPTQ's v2 zero points,
    one scale per output channel (QMoE's per-row int4)."""
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, sym=False, v1=False, group=-1, family="deepseek_v3")
    _streamed_is_in_memory(path, tmp_path, monkeypatch, "GPTQ", zero_points=True, experts=8, dense=8)


def test_quant_dense_streams_the_checkpoints_attention_codes(tmp_path):
    """--quant-dense out of core: the checkpoint's own attention codes and zero points go into MatMulNBits as in
    memory (error 0 against the checkpoint's weights), the LM head (float in the checkpoint) round-to-nearest;
    the reference for verification is the checkpoint's weights with the head as MatMulNBits dequantizes it."""
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, sym=False)
    arts = {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert _compile(path, out, mode, "--quant-dense") == 0
        arts[mode] = _initializers(out)
    shared = set(arts["on"]) & set(arts["off"])
    assert sum(n.endswith(".packed") for n in shared) == 9 and sum(n.endswith(".zero_points") for n in shared) == 9
    assert [n for n in shared if not np.array_equal(arts["on"][n], arts["off"][n])] == []
    packed = arts["on"]["model.model.layers.1.self_attn.o_proj.packed"]  # two 4-bit columns a byte, low first
    got = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
    assert np.array_equal(got, expected["model.layers.1.self_attn.o_proj.weight:codes"].numpy())
    report = json.load(open(os.path.join(str(tmp_path / "on"), "report.json")))
    dense = {l["path"]: l for l in report["quantization"]["dense"]["layers"]}
    attention = [p for p in dense if ".self_attn." in p]
    assert len(attention) == 8 and all(dense[p]["method"] == "the checkpoint's codes" and dense[p]["rel_l2_vs_fp32"] == 0
                                       for p in attention)
    assert "method" not in dense["lm_head"] and dense["lm_head"]["rel_l2_vs_fp32"] > 0
    n = report["numerics"]
    assert n["passed"] and n["inputs"][0]["rel_l2"] < 1e-5 and n["against"].endswith("as MatMulNBits dequantizes them")
    assert report["quantization"]["logits_vs_fp32"]["rel_l2"] > 1e-4  # the head's rounding, measured from fp32


def test_calibration_solves_only_the_linears_without_codes_of_their_own(tmp_path, monkeypatch):
    """--quant-dense --calibration out of core on a checkpoint whose attention and shared experts are GPTQ codes
    (DeepSeek-V3; its dense first layer's MLP has none): GPTQ runs on that MLP only, and the others keep the
    checkpoint's codes, a shared expert found by where it was read (fusion moves it under the fused layer). The
    data reaches the layers in order though the dense first layer has no tensor large enough for the data file
    (its group is written in its place, not after the others)."""
    import moec.targets.onnxruntime.quantize_dense as quantize_dense

    solved, calibrated_codes = [], quantize_dense.calibrated_codes

    def spy(module, targets, *args, **kwargs):
        solved.extend(p for p, _ in targets)
        return calibrated_codes(module, targets, *args, **kwargs)

    monkeypatch.setattr(quantize_dense, "calibrated_codes", spy)
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    write_checkpoint(path, sym=False, v1=False, family="deepseek_v3", moe_intermediate_size=32, q_lora_rank=32)
    assert _compile(path, out, "on", "--quant-dense", "--calibration", "random:16") == 0
    assert solved == [f"lm.model.model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    report = json.load(open(os.path.join(out, "report.json")))
    methods = {l["path"]: l.get("method", "") for l in report["quantization"]["dense"]["layers"]}
    own = [p for p in methods if ".self_attn." in p or ".shared." in p]
    assert len(own) == 3 * 5 + 2 * 3 and all(methods[p] == "the checkpoint's codes" for p in own), methods
    n = report["numerics"]
    assert n["passed"] and n["inputs"][0]["rel_l2"] < 1e-5 and n["end_to_end"]["rel_l2"] < 1e-5


def test_compressed_tensors_streams_as_in_memory(tmp_path):
    """A checkpoint written by compressed-tensors itself, compiled both ways."""
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors_checkpoint import write_checkpoint as write_ct

    path = write_ct(str(tmp_path / "ckpt"))
    arts = {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert _compile(path, out, mode) == 0
        arts[mode] = _initializers(out)
    report = json.load(open(os.path.join(str(tmp_path / "on"), "report.json")))
    assert report["quantization"]["checkpoint_format"] == "compressed-tensors pack-quantized"
    assert report["numerics"]["passed"] and report["numerics"]["end_to_end"]["ran"]
    shared = set(arts["on"]) & set(arts["off"])
    assert sum(n.endswith(("fc1", "fc2", "fc1_scales", "fc2_scales")) for n in shared) == 8
    assert [n for n in shared if not np.array_equal(arts["on"][n], arts["off"][n])] == []


@pytest.mark.parametrize("case", list(CASES))
def test_each_linear_reads_as_the_formats_dequantization(case, tmp_path):
    """Every GPTQ / AWQ variant (symmetric, asymmetric, v1 and v2 zero points, int8 per channel): the decoded
    weight of each Linear is the format's formula's, its scheme known from the headers alone."""
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, **CASES[case])
    ck = LazyCheckpoint(path)
    stream = PackedStream(ck, READERS[CASES[case].get("fmt", "gptq")]()(path))
    group, bits = CASES[case].get("group", 16), CASES[case].get("bits", 4)
    assert (stream.spec.bits, stream.spec.block_size, stream.spec.symmetric) == (
        bits, None if group == -1 else group, CASES[case].get("sym", True))
    stream.decode_in()
    weights = [n for n in expected if not n.endswith(":codes")]
    assert sorted(weights) == sorted(ck.decoded)
    for name in weights:
        assert torch.equal(ck.decoded[name](None), expected[name]), name


def test_act_order_is_refused_before_anything_is_captured(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, act_order=True)
    out = tmp_path / "out"
    assert main(["compile", path, "--out", str(out), "--out-of-core", "on", "--task", "logits"]) == 17
    captured = capsys.readouterr()
    assert "g_idx' assigns input columns to groups out of order" in captured.err
    assert "capture:" not in captured.out and not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--quant", "int8"], "already quantized (int4 block 16); --quant would re-quantize"),
    (["--dtype", "fp16"], "--dtype fp16 with experts already quantized in the model"),
    (["--quant", "auto", "--accuracy-budget", "0.1"], "is already quantized (gptq); its codes are folded as they are"),
])
def test_flags_the_checkpoint_contradicts_are_refused(args, message, tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    write_checkpoint(path)
    out = tmp_path / "out"
    assert _compile(path, str(out), "on", *args) != 0
    assert message in capsys.readouterr().err and not out.exists()


def test_a_disagreement_found_while_streaming_writes_nothing(tmp_path, capsys):
    """The config says sym, the zero points are not all 2^(bits-1): found when the first Linear is read."""
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, sym=False)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"]["sym"] = True
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    out = tmp_path / "out"
    assert _compile(path, str(out), "on") == 17
    assert "qzeros' holds zero points other than 8, but the config says sym" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_experts_with_different_schemes_are_named_from_the_headers(tmp_path):
    """One expert's Linear stored per channel beside experts in groups of 16 (compressed-tensors' scheme is per
    Linear, read from its scale's shape): QMoE takes one scheme a model, refused before anything is read."""
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors_checkpoint import write_checkpoint as write_ct

    path = write_ct(str(tmp_path / "ckpt"))
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    odd = "model.layers.1.mlp.experts.3.up_proj"
    state[f"{odd}.weight_scale"] = state[f"{odd}.weight_scale"][:, :1].contiguous()
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(MoecError, match=f"experts are quantized with different schemes.*'{odd}' int4 per-row"):
        PackedStream(LazyCheckpoint(path), READERS["compressed-tensors"]()(path))


def test_parameters_count_the_weights_the_codes_stand_for(tmp_path, monkeypatch):
    """auto weighs a packed checkpoint by the weights it stands for (the in-memory fold holds them in fp32)."""
    from moec import compile_out_of_core
    from moec.compile_out_of_core import wants_out_of_core
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path)
    ck = LazyCheckpoint(path)
    plain = sum(int(np.prod(s)) for n, s in ck.shapes.items() if not n.endswith(("qweight", "qzeros", "scales", "g_idx")))
    weights = plain + sum(w.numel() for n, w in expected.items() if not n.endswith(":codes"))
    stream = PackedStream(ck, READERS["gptq"]()(path))
    assert stream.parameters() == weights  # every quantized Linear counted as its [N, K]
    stream.decode_in()
    assert ck.numel == weights and "model.layers.0.mlp.experts.5.down_proj.weight" in ck.groups["layers.0"]
    assert not [n for n in ck.shapes if n.endswith(("qweight", "qzeros", "scales", "g_idx"))]
    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: weights * 4)
    assert wants_out_of_core(path, "auto")
    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: weights * 400)
    assert not wants_out_of_core(path, "auto")

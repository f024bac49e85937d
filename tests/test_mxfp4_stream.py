"""GPT-OSS MXFP4 checkpoints compiled out of core: the checkpoint's codes folded one expert at a time.

The checkpoints are tests/test_mxfp4_checkpoint.py's (written from the OCP microscaling specification over a real
transformers GPT-OSS model, the expected codes decoded there from E2M1's bit fields). Asserted: the streamed
artifact carries exactly the codes the in-memory fold writes (per row and in blocks of 32), no expert is ever
decoded whole, the layer-by-layer and end-to-end checks ran. Bad tensors are tests/test_mxfp4_checkpoint.py's,
in both modes.
"""

import json
import os

import numpy as np
import onnx
import pytest
from onnx.numpy_helper import to_array

from moec.cli import main
from moec.lazy_checkpoint import LazyCheckpoint
from moec.mxfp4_stream import Mxfp4Stream, mxfp4_parameters
from test_mxfp4_checkpoint import write_checkpoint


def _initializers(out):
    return {t.name: to_array(t) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}


@pytest.mark.parametrize("exponents,spec,task", [((120, 123), "int8 per-row", "logits"),
                                                 ((112, 124), "int8 block 32", "text-generation")])
def test_the_checkpoints_codes_stream_one_expert_at_a_time(exponents, spec, task, tmp_path, monkeypatch):
    """Narrow exponent spans fold per row (ORT's exact fp32 kernel), wide ones keep MXFP4's blocks of 32, as in
    memory; every expert is decoded alone (the whole stack of a layer is never asked for)."""
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    expected = write_checkpoint(path, exponents=exponents, seed=1)
    asked = []
    value = Mxfp4Stream._value
    monkeypatch.setattr(Mxfp4Stream, "_value", lambda self, p, expert: asked.append(expert) or value(self, p, expert))
    assert main(["compile", path, "--out", out, "--out-of-core", "on", "--task", task, "--quiet"]) == 0
    assert asked and None not in asked  # decoded expert by expert, never a whole layer's stack

    report = json.load(open(os.path.join(out, "report.json")))
    q = report["quantization"]
    assert report["out_of_core"] and "MXFP4" in q["checkpoint_format"] and q["spec"] == spec
    assert q["method"] == "the checkpoint's codes" and all(l["method"] == q["method"] for l in q["layers"])
    assert q["onnxruntime_quantizes_activations"] == (spec == "int8 block 32")
    n = report["numerics"]
    assert n["passed"] and n["end_to_end"]["ran"] and len(n["layers"]) == 2
    if spec == "int8 per-row":  # ORT's fp32 kernel: the artifact is the checkpoint's model to fp32 rounding
        assert max(l["rel_l2"] for l in n["layers"]) < 1e-5 and n["end_to_end"]["rel_l2"] < 1e-5
    assert q["logits_vs_fp32"]["rel_l2"] < 1e-5  # the reference is the checkpoint's weights: nothing moved

    art = _initializers(out)
    for layer in (0, 1):
        for fc, proj in (("fc1", "gate_up_proj"), ("fc2", "down_proj")):
            exp = expected[f"model.layers.{layer}.mlp.experts.{proj}"]
            codes = art[f"model.model.layers.{layer}.mlp.{fc}"].astype(np.int64) - 128
            scales = art[f"model.model.layers.{layer}.mlp.{fc}_scales"]
            if spec == "int8 per-row":
                base = exp["exponents"].min(-1, keepdims=True)
                assert np.array_equal(codes, exp["doubled"] << np.repeat(exp["exponents"] - base, 32, axis=-1))
                assert np.array_equal(scales, np.ldexp(1.0, base[..., 0] - 128).astype(np.float32))
            else:  # the checkpoint's FP4 values, doubled, in its own order (fc1's gate/up rows interleaved)
                assert np.array_equal(codes, exp["doubled"])
                assert np.array_equal(scales, np.ldexp(1.0, exp["exponents"] - 128).astype(np.float32))
    if task == "text-generation":
        assert report["generation"]["genai_config"]


def test_the_streamed_artifact_is_the_in_memory_folds(tmp_path):
    """Byte for byte on every initializer the two artifacts share (QMoE codes and scales included)."""
    path = str(tmp_path / "ckpt")
    write_checkpoint(path)
    arts = {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert main(["compile", path, "--out", out, "--out-of-core", mode, "--task", "logits", "--quiet"]) == 0
        arts[mode] = _initializers(out)
    shared = set(arts["on"]) & set(arts["off"])
    assert sum(n.endswith(("fc1", "fc2", "fc1_scales", "fc2_scales")) for n in shared) == 8
    assert [n for n in shared if not np.array_equal(arts["on"][n], arts["off"][n])] == []


def test_re_quantizing_flags_and_unstreamed_options_are_refused(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    write_checkpoint(path)
    out = tmp_path / "out"
    assert main(["compile", path, "--out", str(out), "--out-of-core", "on", "--quant", "int4", "--quiet"]) != 0
    assert "already quantized (MXFP4, folded as int8 codes); --quant would re-quantize" in capsys.readouterr().err
    assert main(["compile", path, "--out", str(out), "--out-of-core", "on", "--target", "tensorrt", "--quiet"]) == 2
    assert "--target tensorrt: not available in an out-of-core compile" in capsys.readouterr().err
    assert not out.exists()


def test_auto_counts_the_values_mxfp4_stores(tmp_path, monkeypatch):
    """The in-memory fold holds the experts dequantized: auto weighs the checkpoint by the values it stores
    (two a byte of `_blocks`), not by its bytes."""
    from moec import compile_out_of_core
    from moec.compile_out_of_core import wants_out_of_core

    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path)
    ck = LazyCheckpoint(path)
    experts = sum(int(np.prod(e["weight"].shape)) for e in expected.values())
    scales = sum(int(np.prod(e["exponents"].shape)) for e in expected.values())
    values = mxfp4_parameters(ck)
    assert values == ck.numel + experts // 2 - scales  # the headers count bytes of blocks (half the values)
    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: values * 4)
    assert wants_out_of_core(path, "auto")
    monkeypatch.setattr(compile_out_of_core, "_available_memory", lambda: values * 400)
    assert not wants_out_of_core(path, "auto")


def test_fp16_scales_are_refused_beyond_their_exact_range(tmp_path, capsys):
    """--dtype fp16 keeps QMoE's scales 2^(e - 128) in fp16: exact for exponents 104-143, refused below (they
    would flush to zero) before any expert is decoded into the artifact; within it, verified against the
    checkpoint's weights in fp16."""
    low, ok = str(tmp_path / "low"), str(tmp_path / "ok")
    write_checkpoint(low, exponents=(100, 103))
    out = tmp_path / "out"
    args = ["--out-of-core", "on", "--task", "logits", "--dtype", "fp16", "--quiet"]
    assert main(["compile", low, "--out", str(out), *args]) == 17
    assert "exponents 104-143; this checkpoint's span 100-103" in capsys.readouterr().err and not out.exists()
    write_checkpoint(ok, exponents=(120, 123))
    assert main(["compile", ok, "--out", str(out), *args]) == 0
    report = json.load(open(os.path.join(str(out), "report.json")))
    assert report["dtype"] == "fp16" and report["numerics"]["passed"]
    assert report["numerics"]["against"] == "the checkpoint's weights in fp16"

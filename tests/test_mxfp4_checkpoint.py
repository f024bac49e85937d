"""GPT-OSS MXFP4 expert checkpoints folded without re-quantizing.

The checkpoints are written from the OCP microscaling specification as GPT-OSS stores them (`*_blocks` uint8
[E, N, K/32, 16], two E2M1 codes a byte with the even column in the low nibble, `*_scales` uint8 E8M0 exponents
[E, N, K/32]), over a real transformers GPT-OSS model. The expected weights are decoded here from E2M1's bit
fields, independently of moec's table, and checked against transformers' own MXFP4 dequantization (its CPU
loading path).
"""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx.numpy_helper import to_array
from safetensors.torch import load_file, save_file

from moec import zoo
from moec.cli import main
from moec.fold_checkpoint import load_quantized_checkpoint


def e2m1(code: np.ndarray) -> np.ndarray:
    """E2M1's value from its bits: sign (bit 3), exponent (bits 1-2, bias 1), mantissa (bit 0); exponent 0 is
    subnormal (0 or 0.5)."""
    sign = np.where(code & 8, -1.0, 1.0)
    exp, man = (code >> 1) & 3, code & 1
    return sign * np.where(exp == 0, man * 0.5, (1 + man * 0.5) * 2.0 ** (exp - 1))


def write_checkpoint(path, exponents=(120, 123), seed=0):
    """A GPT-OSS checkpoint with MXFP4 experts; returns per expert parameter (its on-disk name less the suffix)
    the dequantized [E, N, K] weights, the doubled FP4 values and the exponents."""
    zoo.build_hf_model("gpt_oss", hidden_size=64, intermediate_size=32, head_dim=16).save_pretrained(path)
    state = load_file(os.path.join(path, "model.safetensors"))
    rng = np.random.default_rng(seed)
    expected = {}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, k, n = state[name].shape  # the model's [E, K, N]: x @ W
        del state[name]
        blocks = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
        scales = rng.integers(exponents[0], exponents[1] + 1, (e, n, k // 32), dtype=np.uint8)
        state[name + "_blocks"], state[name + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
        codes = np.stack([blocks & 15, blocks >> 4], -1).reshape(e, n, k)
        values = e2m1(codes)
        weight = values.reshape(e, n, k // 32, 32) * 2.0 ** (scales.astype(np.float64) - 127)[..., None]
        expected[name] = dict(weight=torch.from_numpy(weight.reshape(e, n, k).astype(np.float32)),
                              doubled=(2 * values).astype(np.int64), exponents=scales.astype(np.int64))
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return expected


def _unpacked_initializers(out):
    return {t.name: to_array(t) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}


def test_weights_are_transformers_own_dequantization(tmp_path):
    """moec's fp32 model holds exactly what transformers' MXFP4 loader gives (bf16 holds these values exactly)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path)
    model, spec, codes, notes, fmt = load_quantized_checkpoint(path)
    ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.bfloat16)
    ours, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    for name, exp in expected.items():
        assert torch.equal(ours[name], exp["weight"].transpose(1, 2))
        assert torch.equal(theirs[name].float(), ours[name])
    assert len(codes) == 4 and "MXFP4" in fmt and any("without re-quantizing" in n for n in notes)


def test_narrow_exponent_spans_fold_per_row_exactly(tmp_path):
    """Within a span of 4 exponents a row's doubled FP4 values fit int8 at its smallest exponent: per-row
    codes, ONNX Runtime's fp32 kernel, exact against the checkpoint's weights."""
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    expected = write_checkpoint(path, exponents=(120, 123))
    assert main(["compile", path, "--out", out, "--task", "logits", "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    q = report["quantization"]
    assert "MXFP4" in q["checkpoint_format"] and q["spec"] == "int8 per-row"
    assert not q["onnxruntime_quantizes_activations"]
    assert report["numerics"]["passed"] and max(r["rel_l2"] for r in report["numerics"]["inputs"]) < 1e-4
    # the reference ran the codes' dequantization: the same model as the checkpoint's weights
    assert q["logits_vs_fp32"]["rel_l2"] < 1e-5
    art = _unpacked_initializers(out)
    for layer in (0, 1):
        for fc, proj in (("fc1", "gate_up_proj"), ("fc2", "down_proj")):
            exp = expected[f"model.layers.{layer}.mlp.experts.{proj}"]
            base = exp["exponents"].min(-1, keepdims=True)
            shift = np.repeat(exp["exponents"] - base, 32, axis=-1)
            # fc1 keeps the checkpoint's interleaved gate/up rows: QMoE's SwiGLU reads them interleaved too
            codes = art[f"model.model.layers.{layer}.mlp.{fc}"].astype(np.int64)
            assert np.array_equal(codes - 128, exp["doubled"] << shift)
            scales = art[f"model.model.layers.{layer}.mlp.{fc}_scales"]
            assert np.array_equal(scales, np.ldexp(1.0, base[..., 0] - 128).astype(np.float32))


def test_wide_exponent_spans_keep_the_checkpoints_blocks(tmp_path):
    """Rows spanning more exponents keep MXFP4's blocks of 32: codes 128 + 2 * FP4 byte for byte in the
    checkpoint's order, scales 2^(e - 128); ORT runs block-wise int8 with int8 activations (flagged)."""
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    expected = write_checkpoint(path, exponents=(112, 124), seed=1)
    assert main(["compile", path, "--out", out, "--task", "logits", "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    q = report["quantization"]
    assert q["spec"] == "int8 block 32" and q["onnxruntime_quantizes_activations"]
    assert report["numerics"]["passed"] and max(r["rel_l2"] for r in report["numerics"]["inputs"]) < 3e-2
    art = _unpacked_initializers(out)
    for fc, proj in (("fc1", "gate_up_proj"), ("fc2", "down_proj")):
        exp = expected[f"model.layers.1.mlp.experts.{proj}"]
        assert np.array_equal(art[f"model.model.layers.1.mlp.{fc}"].astype(np.int64) - 128, exp["doubled"])
        assert np.array_equal(art[f"model.model.layers.1.mlp.{fc}_scales"],
                              np.ldexp(1.0, exp["exponents"] - 128).astype(np.float32))


def _edit_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("model.layers.1.mlp.experts.down_proj_scales"),
     "'model.layers.1.mlp.experts.down_proj_blocks' has no 'model.layers.1.mlp.experts.down_proj_scales'"),
    (lambda s: s.pop("model.layers.0.mlp.experts.gate_up_proj_blocks"),
     "'model.layers.0.mlp.experts.gate_up_proj_scales' has no 'model.layers.0.mlp.experts.gate_up_proj_blocks'"),
    (lambda s: s["model.layers.1.mlp.experts.gate_up_proj_scales"].fill_(254),  # 6 * 2^127 overflows fp32
     "'model.layers.1.mlp.experts.gate_up_proj_scales' scales"),
    (lambda s: s.update({"model.layers.0.mlp.experts.gate_up_proj_blocks":
                         s["model.layers.0.mlp.experts.gate_up_proj_blocks"].to(torch.int32)}),
     "'model.layers.0.mlp.experts.gate_up_proj_blocks' is torch.int32"),
    (lambda s: s["model.layers.0.mlp.experts.gate_up_proj_scales"].__setitem__((0, 3, 1), 255),
     "'model.layers.0.mlp.experts.gate_up_proj_scales' holds 1 NaN exponents"),
    (lambda s: s.update({"model.layers.0.mlp.experts.down_proj_blocks":
                         s["model.layers.0.mlp.experts.down_proj_blocks"][:, :32].contiguous(),
                         "model.layers.0.mlp.experts.down_proj_scales":
                         s["model.layers.0.mlp.experts.down_proj_scales"][:, :32].contiguous()}),
     "the model of config.json wants 'model.layers.0.mlp.experts.down_proj' as [4, 32, 64]"),
    (lambda s: s.update({"model.layers.0.mlp.experts.down_proj_scales":
                         s["model.layers.0.mlp.experts.down_proj_scales"].to(torch.int16)}),
     "'model.layers.0.mlp.experts.down_proj_scales' is torch.int16"),
])
@pytest.mark.parametrize("mode", ["off", "on"])  # on: moec/mxfp4_stream.py's scan, before capture
def test_bad_mxfp4_tensors_are_named_and_nothing_is_written(edit, message, mode, tmp_path, capsys):
    path, out = str(tmp_path / "ckpt"), tmp_path / "out"
    write_checkpoint(path)
    _edit_tensors(path, edit)
    assert main(["compile", path, "--out", str(out), "--task", "logits", "--quiet", "--out-of-core", mode]) == 17
    err = capsys.readouterr().err
    assert message in err and "model.safetensors" in err
    assert not out.exists()


@pytest.mark.parametrize("mode", ["off", "on"])
def test_experts_stored_unquantized_beside_mxfp4_ones_are_named(mode, tmp_path, capsys):
    path, out = str(tmp_path / "ckpt"), tmp_path / "out"
    write_checkpoint(path)

    def plain_down(state):
        del state["model.layers.1.mlp.experts.down_proj_blocks"], state["model.layers.1.mlp.experts.down_proj_scales"]
        state["model.layers.1.mlp.experts.down_proj"] = torch.zeros(4, 32, 64)

    _edit_tensors(path, plain_down)
    assert main(["compile", path, "--out", str(out), "--task", "logits", "--quiet", "--out-of-core", mode]) == 17
    assert ("'model.layers.1.mlp.experts.down_proj' is stored unquantized (1 such expert tensors) while 3 others are "
            "MXFP4") in capsys.readouterr().err
    assert not out.exists()

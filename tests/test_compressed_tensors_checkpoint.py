"""Folding compressed-tensors pack-quantized checkpoints, built with compressed-tensors itself.

compressed-tensors quantizes nn.Linear modules, and transformers 5 keeps a MoE's experts as stacked parameters,
so the fixture first gives the model per-expert Linears (the layout llm-compressor's MoE checkpoints have on
disk, `mlp.experts.N.gate_proj`), then applies the library's own W4A16 / W8A16 scheme, scales from min/max
(`calculate_qparams`; the library has no observers of its own), compresses to pack-quantized and saves.
"""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")

from moec import zoo  # noqa: E402
from moec.cli import main  # noqa: E402
from moec.compressed_tensors_checkpoint import unpack_int32  # noqa: E402
from moec.fold_checkpoint import load_quantized_checkpoint  # noqa: E402
from moec.errors import MoecError  # noqa: E402

INTERMEDIATE = 32  # the zoo's 24 is no multiple of 16: compressed-tensors can't pack a ragged group


class _Expert(nn.Module):
    def __init__(self, hidden, inter, act_fn):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _LinearExperts(nn.ModuleList):
    """transformers' stacked experts as a list of per-expert Linears: same forward, same weights."""

    @classmethod
    def of(cls, fused):
        e, two_i, h = fused.gate_up_proj.shape
        mods = cls([_Expert(h, two_i // 2, fused.act_fn) for _ in range(e)])
        with torch.no_grad():
            for i, m in enumerate(mods):
                m.gate_proj.weight.copy_(fused.gate_up_proj[i, : two_i // 2])
                m.up_proj.weight.copy_(fused.gate_up_proj[i, two_i // 2:])
                m.down_proj.weight.copy_(fused.down_proj[i])
        return mods

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in top_k_index.unique().tolist():
            tok, slot = torch.where(top_k_index == e)
            out.index_add_(0, tok, self[e](hidden[tok]) * top_k_weights[tok, slot, None])
        return out


def write_checkpoint(path, strategy="group", group_size=16, symmetric=True, bits=4, activations=False):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = zoo.build_hf_model("qwen3_moe", moe_intermediate_size=INTERMEDIATE)
    for name, mod in list(model.named_modules()):
        if name.endswith("mlp.experts") and hasattr(mod, "gate_up_proj"):
            model.get_submodule(name.rsplit(".", 1)[0]).experts = _LinearExperts.of(mod)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                               group_size=group_size if strategy == "group" else None)
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True) if activations else None
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)},
        ignore=["lm_head", "re:.*mlp.gate$"], quantization_status=QuantizationStatus.INITIALIZED,
        format="pack-quantized")
    apply_quantization_config(model, config)
    with torch.no_grad():
        for _, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            w = m.weight
            g = w.unflatten(-1, (-1, group_size)) if strategy == "group" else w.unsqueeze(1)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.copy_(zp.reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {
        "int4-group16": write_checkpoint(str(root / "g16")),
        "int4-channel-asym": write_checkpoint(str(root / "ch"), strategy="channel", symmetric=False),
        "int8-channel-asym": write_checkpoint(str(root / "i8"), strategy="channel", symmetric=False, bits=8),
    }


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _ort_codes(artifact, name):
    from onnx.numpy_helper import to_array

    model = onnx.load(os.path.join(artifact, "model.onnx"))
    return {t.name: to_array(t) for t in model.graph.initializer if t.name.startswith(name)}


@pytest.mark.parametrize("scheme", ["int4-group16", "int4-channel-asym", "int8-channel-asym"])
def test_the_artifact_carries_the_checkpoints_codes_and_is_exact(scheme, checkpoints, tmp_path):
    path = checkpoints[scheme]
    out = str(tmp_path / "a")
    assert main(["compile", path, "--out", out, "--task", "logits", "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    q = report["quantization"]
    assert q["checkpoint_format"] == "compressed-tensors pack-quantized"
    assert report["moe_layers"]["fused"] == 2 and all(l["lowered_to"].startswith("com.microsoft.QMoE")
                                                      for l in report["moe_layers"]["layers"])
    assert report["numerics"]["passed"] and max(r["rel_l2"] for r in report["numerics"]["inputs"]) < 1e-4

    # QMoE's fc2 (down) bytes are the checkpoint's codes, expert by expert (unsigned codes, first column in the
    # low bits in both), and its scales the checkpoint's scales; fc1 interleaves gate and up rows.
    bits = int(scheme[3])
    raw = _tensors(path)
    art = _ort_codes(out, "model.model.layers.1.mlp.fc")
    per_byte = 8 // bits
    for e in range(8):
        for proj, fc, rows in (("down_proj", "fc2", slice(None)), ("gate_proj", "fc1", slice(0, None, 2)),
                               ("up_proj", "fc1", slice(1, None, 2))):
            prefix = f"model.layers.1.mlp.experts.{e}.{proj}"
            n, k = raw[f"{prefix}.weight_shape"].tolist()
            codes = unpack_int32(raw[f"{prefix}.weight_packed"], bits, k, dim=1).numpy()
            packed = art[f"model.model.layers.1.mlp.{fc}"][e][rows]
            got = np.stack([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], -1).reshape(n, -1)
            assert np.array_equal(got[:, :k], codes), prefix
            scales = art[f"model.model.layers.1.mlp.{fc}_scales"][e][rows]
            want = raw[f"{prefix}.weight_scale"].float().numpy()
            assert np.array_equal(scales.reshape(want.shape), want), prefix


def test_quant_dense_carries_the_symmetric_attention_codes(checkpoints, tmp_path):
    """--quant-dense on a symmetric checkpoint: MatMulNBits gets the attention's own codes (no zero points) and
    scales."""
    out = str(tmp_path / "a")
    assert main(["compile", checkpoints["int4-group16"], "--out", out, "--task", "logits", "--quant-dense",
                 "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["numerics"]["passed"]
    dense = {l["path"]: l for l in report["quantization"]["dense"]["layers"]}
    assert sum(l.get("method") == "the checkpoint's codes" and l["rel_l2_vs_fp32"] == 0 for l in dense.values()) == 8
    raw = _tensors(checkpoints["int4-group16"])
    art = _ort_codes(out, "model.model.layers.0.self_attn.k_proj")
    n, k = raw["model.layers.0.self_attn.k_proj.weight_shape"].tolist()
    codes = unpack_int32(raw["model.layers.0.self_attn.k_proj.weight_packed"], 4, k, dim=1).numpy()
    packed = art["model.model.layers.0.self_attn.k_proj.packed"]
    assert np.array_equal(np.stack([packed & 15, packed >> 4], -1).reshape(n, -1), codes)
    assert np.array_equal(art["model.model.layers.0.self_attn.k_proj.scales"],
                          raw["model.layers.0.self_attn.k_proj.weight_scale"].float().numpy().reshape(-1))
    assert "model.model.layers.0.self_attn.k_proj.zero_points" not in art


def test_symmetric_checkpoints_match_transformers_own_load(checkpoints):
    from transformers import AutoModelForCausalLM

    path = checkpoints["int4-group16"]
    ours, spec, codes, notes, fmt = load_quantized_checkpoint(path)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # dequantizes on load
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.linalg.norm(a - b) / torch.linalg.norm(b) < 1e-5
    # 2 layers x 2 stacked expert tensors, and the 8 attention Linears' own codes (for --quant-dense)
    assert spec.bits == 4 and spec.block_size == 16 and spec.symmetric and len(codes) == 4 + 8
    assert any("dequantized to fp32" in n for n in notes)  # the attention Linears


@pytest.mark.parametrize("scheme", ["int4-channel-asym", "int8-channel-asym"])
def test_asymmetric_weights_equal_compressed_tensors_own_decompression(scheme, checkpoints):
    """transformers can't load these; compressed-tensors' own decompressor is the independent reference."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    path = checkpoints[scheme]
    cfg = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    ct_scheme = QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])
    raw = _tensors(path)
    model, spec, codes, notes, fmt = load_quantized_checkpoint(path)
    params = dict(model.named_parameters())
    assert not spec.symmetric
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        parts = {k[len(prefix) + 1:]: v for k, v in raw.items() if k.startswith(prefix + ".")}
        theirs = PackedQuantizationCompressor.decompress(parts, ct_scheme)["weight"]
        assert torch.equal(params[f"{prefix}.weight"], theirs.float()), prefix
    stacked = params["model.layers.1.mlp.experts.down_proj"]
    for e in (0, 5):
        prefix = f"model.layers.1.mlp.experts.{e}.down_proj"
        parts = {k[len(prefix) + 1:]: v for k, v in raw.items() if k.startswith(prefix + ".")}
        assert torch.equal(stacked[e], PackedQuantizationCompressor.decompress(parts, ct_scheme)["weight"].float())


def _edit_config(path, tmp_path, edit):
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(path, dst)
    cfg = json.load(open(dst / "config.json"))
    edit(cfg["quantization_config"])
    json.dump(cfg, open(dst / "config.json", "w"))
    return str(dst)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     "quantizes activations"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=8), "group_size 8"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "strategy 'tensor'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "packs to int32"),
])
def test_unsupported_or_inconsistent_schemes_are_named(edit, message, checkpoints, tmp_path, capsys):
    path = _edit_config(checkpoints["int4-group16"], tmp_path, edit)
    out = tmp_path / "out"
    assert main(["compile", path, "--out", str(out), "--task", "logits", "--quiet"]) == 17
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_act_order_groups_are_refused_by_tensor(checkpoints, tmp_path):
    from safetensors.torch import save_file

    path = _edit_config(checkpoints["int4-group16"], tmp_path, lambda q: None)
    tensors = _tensors(path)
    name = "model.layers.0.mlp.experts.2.gate_proj"
    tensors[f"{name}.weight_g_idx"] = torch.randperm(48) // 16  # columns permuted among groups
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoecError, match=f"{name}.weight_g_idx"):
        load_quantized_checkpoint(path)

"""GPTQ and AWQ checkpoints folded without re-quantizing.

Neither format's library installs here (both need CUDA builds), so the checkpoints are written from the formats'
published layouts: AutoGPTQ / GPTQModel's `qweight` [K/8, N] (input rows packed, zero points stored minus one
in the original format) and AutoAWQ's GEMM packing (output columns packed in the order 0 2 4 6 1 3 5 7), per
expert Linear as MoE checkpoints store them, with random codes, scales and zero points. The expected weights
are computed here from the formats' dequantization formulas, independently of moec's readers.
"""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from moec import zoo
from moec.cli import main
from moec.errors import MoecError
from moec.fold_checkpoint import load_quantized_checkpoint

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack(values: np.ndarray, bits: int, axis: int, order=None) -> torch.Tensor:
    """Pack `values` (< 2^bits) along `axis` into int32 words, the first in the lowest bits (or in `order`)."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., list(order)]
    words = (v << (np.arange(per, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32))


def write_checkpoint(path, fmt="gptq", bits=4, group=16, sym=True, v1=True, act_order=False, seed=0,
                     family="qwen3_moe", **config):
    """Returns the dequantized weights the checkpoint stands for, by on-disk name. `config`: the tiny config's
    sizes overridden."""
    sizes = {"qwen3_moe": dict(moe_intermediate_size=32), "mixtral": dict(intermediate_size=32),
             "deepseek_v3": {}}[family]  # DeepSeek-V3's 24-wide experts: per channel (group -1) only
    zoo.build_hf_model(family, **{**sizes, **config}).save_pretrained(path)
    state = load_file(os.path.join(path, "model.safetensors"))
    rng = np.random.default_rng(seed)
    expected = {}
    for name in [n for n in state if state[n].dim() == 2 and ("experts." in n or "self_attn" in n)]:
        n_out, k = state[name].shape
        g = 1 if group == -1 else k // group
        q = rng.integers(0, 1 << bits, (k, n_out))
        # (GPTQ's original format stores zero - 1, so it can't hold a zero point of 0: v1 draws from 1)
        low = 1 if fmt == "gptq" and v1 else 0
        zeros = np.full((g, n_out), 1 << (bits - 1)) if sym else rng.integers(low, 1 << bits, (g, n_out))
        scales = torch.from_numpy(rng.uniform(0.002, 0.02, (g, n_out))).half()
        g_idx = np.zeros(k, dtype=np.int64) if group == -1 else np.arange(k) // group
        if act_order:
            g_idx = rng.permutation(g_idx)
        prefix = name[: -len(".weight")]
        del state[name]
        if fmt == "gptq":
            state[f"{prefix}.qweight"] = _pack(q, bits, 0)
            state[f"{prefix}.qzeros"] = _pack(zeros - 1 if v1 else zeros, bits, 1)
            state[f"{prefix}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:  # AWQ GEMM: no g_idx, zero points as they are
            state[f"{prefix}.qweight"] = _pack(q, 4, 1, AWQ_ORDER)
            state[f"{prefix}.qzeros"] = _pack(zeros, 4, 1, AWQ_ORDER)
        state[f"{prefix}.scales"] = scales
        s = scales.float().numpy()
        expected[name] = torch.from_numpy((s[g_idx, np.arange(n_out)[:, None]] *
                                           (q.T - zeros[g_idx, np.arange(n_out)[:, None]])).astype(np.float32))
        expected[name + ":codes"] = torch.from_numpy(q.T.copy())
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = ({"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                                   "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2"} if fmt == "gptq" else
                                  {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm"})
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return expected


CASES = {"gptq-int4-sym": dict(), "gptq-int4-asym-v2": dict(sym=False, v1=False), "gptq-int4-asym-v1": dict(sym=False), "gptq-int8-channel-asym": dict(bits=8, sym=False, group=-1),
         "awq-int4": dict(fmt="awq", sym=False)}


@pytest.mark.parametrize("case", list(CASES))
def test_weights_are_the_formats_dequantization_and_the_artifact_carries_the_codes(case, tmp_path):
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, **CASES[case])
    model, spec, codes, notes, fmt = load_quantized_checkpoint(path)
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.0.self_attn.q_proj.weight"], expected["model.layers.0.self_attn.q_proj.weight"])
    for e in range(8):
        gate, up = (expected[f"model.layers.1.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up"))
        assert torch.equal(params["model.layers.1.mlp.experts.gate_up_proj"][e], torch.cat([gate, up]))
    group = CASES[case].get("group", 16)
    # 2 layers x 2 stacked expert tensors, and the 8 attention Linears' own codes (for --quant-dense)
    assert len(codes) == 4 + 8 and spec.bits == CASES[case].get("bits", 4)
    assert spec.block_size == (None if group == -1 else group)
    assert spec.symmetric == CASES[case].get("sym", True)

    out = str(tmp_path / "out")
    assert main(["compile", path, "--out", out, "--task", "logits", "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["quantization"]["checkpoint_format"] == fmt
    assert report["numerics"]["passed"] and max(r["rel_l2"] for r in report["numerics"]["inputs"]) < 1e-4
    from onnx.numpy_helper import to_array

    art = {t.name: to_array(t) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}
    bits, per = spec.bits, 8 // spec.bits
    for e in range(8):  # QMoE's fc2 holds each expert's down_proj codes, two 4-bit columns a byte, low first
        packed = art["model.model.layers.0.mlp.fc2"][e]
        got = np.stack([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], -1).reshape(packed.shape[0], -1)
        assert np.array_equal(got, expected[f"model.layers.0.mlp.experts.{e}.down_proj.weight:codes"].numpy())


def test_a_mixtral_layout_checkpoint_follows_transformers_renaming(tmp_path):
    """Mixtral's checkpoints name experts block_sparse_moe.experts.N.w1/w2/w3; the model has mlp.experts stacked."""
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, sym=False, v1=False, family="mixtral")
    model, spec, codes, notes, fmt = load_quantized_checkpoint(path)
    params = dict(model.named_parameters())
    for e in range(6):
        w1, w3 = (expected[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w3"))
        assert torch.equal(params["model.layers.0.mlp.experts.gate_up_proj"][e], torch.cat([w1, w3]))
    assert len(codes) == 4 + 8 and not spec.symmetric
    out = str(tmp_path / "out")
    assert main(["compile", path, "--out", out, "--task", "logits", "--quiet"]) == 0
    assert json.load(open(os.path.join(out, "report.json")))["moe_layers"]["fused"] == 2


def test_act_order_is_refused_with_the_reason(tmp_path):
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, act_order=True)
    with pytest.raises(MoecError, match=r"g_idx.*act-order"):
        load_quantized_checkpoint(path)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(bits=3), "3-bit GPTQ"),
    (lambda q: q.update(group_size=8), "group_size 8"),
    (lambda q: q.update(group_size=32), "need"),  # the tensors were written with groups of 16
    (lambda q: q.update(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    (lambda q: q.update(sym=True), "config says sym"),  # the tensors are asymmetric
])
def test_configs_that_disagree_or_cant_fold_are_named(edit, message, tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, sym=False)
    cfg = json.load(open(os.path.join(path, "config.json")))
    edit(cfg["quantization_config"])
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    assert main(["compile", path, "--out", str(tmp_path / "out"), "--task", "logits", "--quiet"]) == 17
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quant_dense_folds_the_checkpoints_attention_codes(tmp_path):
    """--quant-dense: the checkpoint's own attention codes go into MatMulNBits unchanged (exact: no error against
    the checkpoint's weights); the LM head, not quantized in the checkpoint, is round-to-nearest as usual."""
    path = str(tmp_path / "ckpt")
    expected = write_checkpoint(path, sym=False)
    out = str(tmp_path / "out")
    assert main(["compile", path, "--out", out, "--task", "logits", "--quant-dense", "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["numerics"]["passed"]
    dense = {l["path"]: l for l in report["quantization"]["dense"]["layers"]}
    attention = [p for p in dense if ".self_attn." in p]
    assert len(attention) == 8 and all(dense[p]["method"] == "the checkpoint's codes" and dense[p]["rel_l2_vs_fp32"] == 0
                                       for p in attention)
    assert "method" not in dense["model.lm_head"]
    from onnx.numpy_helper import to_array

    art = {t.name: to_array(t) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        packed = art[f"model.{name}.packed"]  # uint8 [N, K / 16, 8]: two 4-bit columns a byte, low first
        got = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
        assert np.array_equal(got, expected[f"{name}.weight:codes"].numpy())

"""Packed int8/int4 expert checkpoints ("moec-packed/1"): write them, and fold them without re-quantizing.

A Hugging Face model directory whose `moec_quant.json` lists quantized expert tensors. For each, the
safetensors file holds `<name>.qweight` (uint8, ONNX Runtime's QMoE layout: [E, N, K * bits / 8], 4-bit
even column in the low nibble), `<name>.scales` ([E, N, K / block] or [E, N]) and, when asymmetric,
`<name>.qzeros`. Loading dequantizes them for the eager model (the exact reference) and keeps the
codes on the parameters, so the QMoE artifact carries the checkpoint's codes unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from moec.quant import PackedWeight, QuantError, QuantSpec, WeightCodes, dequantize, pack, quantize, unpack

FORMAT = "moec-packed/1"
MANIFEST = "moec_quant.json"


def save_packed(model, path: str, spec: QuantSpec, expert_params: list[str]) -> None:
    """Save `model` (a transformers model) with the named 3-D expert parameters quantized and packed."""
    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    tensors, listed = {}, {}
    for name, t in model.state_dict().items():
        if name in expert_params:
            p = pack(quantize(t, spec, name))
            tensors[f"{name}.qweight"] = torch.from_numpy(p.weight)
            tensors[f"{name}.scales"] = torch.from_numpy(p.scales)
            if p.zero_points is not None:
                tensors[f"{name}.qzeros"] = torch.from_numpy(p.zero_points)
            listed[name] = {"shape": list(t.shape)}
        else:
            tensors[name] = t.detach().contiguous()
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, "spec": asdict(spec), "tensors": listed}, f, indent=2, sort_keys=True)


def is_packed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def load_packed(path: str):
    """(model with dequantized expert weights carrying their codes, the checkpoint's QuantSpec)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise QuantError(f"{path}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
    spec = QuantSpec(**manifest["spec"])
    raw = load_file(os.path.join(path, "model.safetensors"))
    state, codes = {}, {}
    for name, meta in manifest["tensors"].items():
        e, n, k = meta["shape"]
        try:
            zp = raw.pop(f"{name}.qzeros", None)
            packed = PackedWeight(raw.pop(f"{name}.qweight").numpy(), raw.pop(f"{name}.scales").numpy(),
                                  None if zp is None else zp.numpy(), spec, k)
        except KeyError as exc:
            raise QuantError(f"{path}: packed tensor {name} lacks {exc.args[0]}.") from exc
        q = unpack(packed, name)
        if tuple(q.shape) != (e, n, k):
            raise QuantError(f"{name}: packed weights unpack to {tuple(q.shape)}, the manifest says {(e, n, k)}.")
        state[name] = dequantize(q)
        codes[name] = q
    state.update(raw)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise QuantError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    params = dict(model.named_parameters())
    table = WeightCodes()
    for name, q in codes.items():
        table.attach(params[name], q)  # fuse_moe stacks these into the fused layer; they go out unchanged
    return model, spec, table

"""Fold compressed-tensors `pack-quantized` checkpoints (llm-compressor's W4A16 / W8A16 output) without re-quantizing.

Matches: a Hugging Face directory whose config.json has a `quantization_config` with `quant_method`
"compressed-tensors" and format "pack-quantized": every quantized Linear is stored as `<name>.weight_packed`
(int32, `32 / bits` codes per word, the first column in the lowest bits, each code offset by 2^(bits-1)),
`<name>.weight_scale` ([N, K / group] or [N, 1] per channel), `<name>.weight_shape` ([N, K]) and, when
asymmetric, `<name>.weight_zero_point` (int32, packed the same way along the rows: [ceil(N * bits / 32), G]).
Produces: the config's transformers model with every quantized weight dequantized exactly in fp32, as
(code - zero point) * scale — the arithmetic ONNX Runtime's QMoE does — and, for the stacked expert parameters,
the checkpoint's own codes, scales and zero points (moec.quant.WeightCodes) in moec's layout (unsigned codes,
zero point 2^(bits-1) when symmetric): fuse_moe stacks them into the fused layers and the QMoE artifact
carries them unchanged. The expert layout transformers' conversion gives (per-expert Linears on disk, stacked
in the model) is followed by running the same conversion over the codes and the scales, and every expert
tensor is checked to dequantize to exactly the weight the model got. Other quantized Linears (attention)
stay dequantized fp32 weights, with a note.
Refuses (QuantError, naming the file or tensor): activation quantization, strategies other than group and
channel, group sizes QMoE can't take, bit widths other than 4 and 8, non-integer types, act-order with a
permutation, experts quantized with different schemes, packed tensors whose shapes disagree with weight_shape
or their scales.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from moec.quant import BLOCK_SIZES, QuantError, QuantizedWeight, QuantSpec, WeightCodes, dequantize

FORMAT = "compressed-tensors pack-quantized"
_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def quantization_config(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" else None


def is_compressed_tensors(path: str) -> bool:
    return quantization_config(path) is not None


def check_config(path: str, qc: dict) -> int:
    """The bit width every weight scheme uses; refuses what QMoE can't take exactly."""
    where = f"{path}/config.json quantization_config"
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise QuantError(f"{where}: no config_groups; nothing says how the weights are quantized.")
    bits = set()
    for name, group in groups.items():
        w = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            raise QuantError(f"{where}: group '{name}' quantizes activations too; moec folds weight-only schemes "
                             "(W4A16, W8A16): ONNX Runtime's QMoE takes fp32 activations.")
        if (group.get("format") or fmt) != "pack-quantized":
            raise QuantError(f"{where}: group '{name}' has format '{group.get('format') or fmt}'; moec folds "
                             "'pack-quantized' (integer codes packed in int32).")
        if w.get("type") != "int" or w.get("num_bits") not in (4, 8):
            raise QuantError(f"{where}: group '{name}' quantizes weights to {w.get('type')}{w.get('num_bits')}; moec "
                             "folds int4 and int8 weights.")
        if w.get("strategy") not in ("group", "channel"):
            raise QuantError(f"{where}: group '{name}' uses strategy '{w.get('strategy')}'; QMoE takes per-group "
                             "(block) and per-channel (row) scales.")
        if w.get("strategy") == "group" and w.get("group_size") not in BLOCK_SIZES:
            raise QuantError(f"{where}: group '{name}' has group_size {w.get('group_size')}; QMoE takes blocks of "
                             f"{', '.join(map(str, BLOCK_SIZES))}.")
        if w.get("dynamic"):
            raise QuantError(f"{where}: group '{name}' has dynamic weight scales; a checkpoint must store them.")
        bits.add(int(w["num_bits"]))
    if len(bits) > 1:
        raise QuantError(f"{where}: groups quantize to {sorted(bits)} bits; one expert precision per model is "
                         "supported.")
    return bits.pop()


@dataclass
class PackedLinear:
    """One quantized Linear of the checkpoint, unpacked: unsigned codes, fp32 scales and zero points per group."""

    codes: torch.Tensor  # int32 [N, K], 0 .. 2^bits - 1
    scales: torch.Tensor  # float32 [N, G]
    zero_points: Optional[torch.Tensor]  # int32 [N, G], or None: symmetric (2^(bits-1))
    spec: QuantSpec

    def dequantized(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.scales.shape[1]
        zp = self.zero_points if self.zero_points is not None else torch.full_like(self.scales, 1 << (self.spec.bits - 1),
                                                                                   dtype=torch.int32)
        blocks = (self.codes.reshape(n, g, k // g) - zp[..., None]).float() * self.scales[..., None]
        return blocks.reshape(n, k)


def unpack_int32(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """compressed-tensors' int32 packing undone along `dim`: `count` unsigned codes."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        words = words.transpose(0, 1)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)[:, :count]
    codes = codes.to(torch.int32)
    return codes.transpose(0, 1).contiguous() if dim == 0 else codes


def read_linear(name: str, parts: dict[str, torch.Tensor], bits: int, file: str) -> PackedLinear:
    def named(what: str) -> str:
        return f"'{file}': tensor '{name}.{what}'"

    shape = parts.get("weight_shape")
    if shape is None or "weight_scale" not in parts:
        raise QuantError(f"{named('weight_packed')} lacks its weight_shape or weight_scale; not a pack-quantized "
                         "Linear.")
    n, k = (int(x) for x in shape.tolist())
    packed = parts["weight_packed"]
    per = 32 // bits
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, -(-k // per)):
        raise QuantError(f"{named('weight_packed')} is {packed.dtype} {tuple(packed.shape)}; weight_shape [{n}, {k}] "
                         f"at {bits} bits packs to int32 {(n, -(-k // per))}. The quantization config and the tensors "
                         "disagree.")
    scale = parts["weight_scale"]
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise QuantError(f"{named('weight_scale')} is {tuple(scale.shape)}; weights [{n}, {k}] need [{n}, G] with G "
                         "dividing the columns.")
    g = int(scale.shape[1])
    block = None if g == 1 else k // g
    if block is not None and block not in BLOCK_SIZES:
        raise QuantError(f"{named('weight_scale')}: groups of {block} columns; QMoE takes blocks of "
                         f"{', '.join(map(str, BLOCK_SIZES))}.")
    g_idx = parts.get("weight_g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // (k // g)):
        raise QuantError(f"{named('weight_g_idx')}: act-order groups (columns permuted among groups); QMoE's "
                         "blocks are contiguous columns, so these codes can't be folded exactly.")
    zp = parts.get("weight_zero_point")
    if zp is not None:
        if zp.dtype != torch.int32 or tuple(zp.shape) != (-(-n // per), g):
            raise QuantError(f"{named('weight_zero_point')} is {zp.dtype} {tuple(zp.shape)}; expected int32 "
                             f"{(-(-n // per), g)} (packed along the rows).")
        zp = unpack_int32(zp, bits, n, dim=0)
    return PackedLinear(unpack_int32(packed, bits, k, dim=1), scale.float(), zp, QuantSpec(bits, block, zp is None))


def load_compressed_tensors(path: str):
    """(model with exactly dequantized weights, the experts' QuantSpec or None, their codes, notes)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from moec.lazy_checkpoint import load_converted, parameters_on_meta
    from moec.safetensors_check import checkpoint_files

    qc = quantization_config(path)
    bits = check_config(path, qc)
    raw: dict[str, dict[str, torch.Tensor]] = {}  # quantized Linear -> its parts
    where: dict[str, str] = {}
    plain: dict[str, torch.Tensor] = {}
    for fname in checkpoint_files(path):
        file = os.path.join(path, fname)
        with safe_open(file, "pt") as f:
            for key in f.keys():
                prefix, _, part = key.rpartition(".")
                if part in _PARTS:
                    raw.setdefault(prefix, {})[part] = f.get_tensor(key)
                    where[prefix] = file
                else:
                    plain[key] = f.get_tensor(key)
    linears = {}
    for prefix, parts in raw.items():
        if "weight_packed" not in parts:
            raise QuantError(f"'{where[prefix]}': '{prefix}' has {sorted(parts)} but no weight_packed; only "
                             "pack-quantized weights are folded.")
        linears[prefix] = read_linear(prefix, parts, bits, where[prefix])
    if not linears:
        raise QuantError(f"'{path}': config.json says compressed-tensors, but no tensor is pack-quantized.")

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # moec folds the codes itself; transformers' quantizer must not wrap layers

    def build(state: dict) -> torch.nn.Module:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        info = load_converted(model, state)
        bad = sorted(info.unexpected_keys or []) + [k for k, *_ in (info.mismatched_keys or [])]
        if bad:
            raise QuantError(f"'{path}': tensor '{bad[0]}' does not fit the model of config.json ({len(bad)} such).")
        return model

    model = build({**plain, **{f"{p}.weight": l.dequantized() for p, l in linears.items()}})
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise QuantError(f"'{path}': the checkpoint lacks '{missing[0]}' ({len(missing)} parameters); transformers "
                         "would initialize them randomly.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    codes, spec, notes = _expert_codes(path, model, linears, build)
    dense = [p for p in linears if p not in set(codes.sources)]
    if dense:
        notes.append(f"{len(dense)} other quantized Linear layers (e.g. {dense[0]}) dequantized to fp32 weights "
                     "(--quant-dense re-quantizes them for MatMulNBits)")
    return model.eval(), spec, codes.table, notes


@dataclass
class _Codes:
    table: WeightCodes
    sources: list[str]  # module prefixes of the checkpoint Linears whose codes reached expert parameters


def _expert_codes(path: str, model, linears: dict[str, PackedLinear], build) -> tuple[_Codes, Optional[QuantSpec], list]:
    """Each stacked expert parameter's codes, scales and zero points: the checkpoint's, laid out as transformers
    laid out the weights (the same conversion run over them), checked to dequantize to exactly the weight."""
    def expanded(field):
        out = {}
        for p, l in linears.items():
            t = getattr(l, field)
            if t is None:
                continue
            k = l.codes.shape[1]
            out[f"{p}.weight"] = t.float() if field == "codes" else t.float().repeat_interleave(k // t.shape[1], 1)
        return out

    stacked = {n for n, p in model.named_parameters() if p.dim() == 3}
    maps = {field: {n: p.detach() for n, p in build(expanded(field)).named_parameters()}
            for field in ("codes", "scales", "zero_points") if any(getattr(l, field) is not None for l in linears.values())}
    params = dict(model.named_parameters())
    table, specs, sources = WeightCodes(), set(), []
    for name in sorted(stacked):
        c = maps["codes"].get(name)
        if c is None or c.is_meta:
            continue
        weight = params[name]
        spec = _spec_of(name, linears)
        step = spec.block_size or c.shape[-1]
        scales = maps["scales"][name][..., ::step].contiguous()
        zps = maps["zero_points"][name][..., ::step].round().to(torch.int32) if "zero_points" in maps else None
        q = QuantizedWeight(c.round().to(torch.int32), scales, zps, spec)
        if not torch.equal(dequantize(q), weight):
            raise QuantError(f"'{path}': the codes of '{name}' do not dequantize to its weight once laid out as "
                             "transformers lays out the experts (a transform moec can't follow the codes through); "
                             "not folded.")
        table.attach(weight, q)
        specs.add(spec)
        sources += [p for p in linears if name.rsplit(".", 1)[0] in p]
    if len(specs) > 1:
        raise QuantError(f"'{path}': experts are quantized with different schemes ({', '.join(s.name for s in specs)}); "
                         "one expert precision per model is supported.")
    notes = [f"{FORMAT} expert weights ({next(iter(specs)).name}) folded without re-quantizing"] if specs else []
    return _Codes(table, sources), (next(iter(specs)) if specs else None), notes


def _spec_of(name: str, linears: dict[str, PackedLinear]) -> QuantSpec:
    """The scheme of the checkpoint Linears a stacked parameter came from (its module path is their prefix)."""
    module = name.rsplit(".", 1)[0]
    specs = {l.spec for p, l in linears.items() if p.startswith(module + ".")}
    if len(specs) != 1:
        raise QuantError(f"'{name}': its experts are quantized with {len(specs)} different schemes; QMoE takes one "
                         "per layer.")
    return specs.pop()

"""Fold compressed-tensors `pack-quantized` checkpoints (llm-compressor's W4A16 / W8A16 output) without re-quantizing.

Matches: a Hugging Face directory whose config.json has a `quantization_config` with `quant_method`
"compressed-tensors" and format "pack-quantized": every quantized Linear is stored as `<name>.weight_packed`
(int32, `32 / bits` codes per word, the first column in the lowest bits, each code offset by 2^(bits-1)),
`<name>.weight_scale` ([N, K / group] or [N, 1] per channel), `<name>.weight_shape` ([N, K]) and, when
asymmetric, `<name>.weight_zero_point` (int32, packed the same way along the rows: [ceil(N * bits / 32), G]).
Produces: the format's reading (`linear_format`, a moec.fold_checkpoint.LinearFormat): each quantized Linear as a
moec.fold_checkpoint.PackedLinear (unsigned codes: the stored ones; fp32
scales; zero points unpacked), which moec.fold_checkpoint folds into the model and its experts' QMoE codes.
Refuses (QuantError, naming the file or tensor): activation quantization, strategies other than group and
channel, group sizes QMoE can't take, bit widths other than 4 and 8, non-integer types, act-order with a
permutation, packed tensors whose shapes disagree with weight_shape or their scales.
"""

from __future__ import annotations

import sys

import torch

from moec.fold_checkpoint import LinearFormat, PackedLinear, groups_in_order
from moec.quant import BLOCK_SIZES, QuantError, QuantSpec

FORMAT = "compressed-tensors pack-quantized"
_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


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


def unpack_int32(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """compressed-tensors' int32 packing undone along `dim`: `count` unsigned codes (int32). In int32 (or its
    bytes) throughout: an arithmetic shift's sign bits fall outside the mask. `packed` may be a transposed view
    (GPTQ's qweight.T unpacks along its rows straight into [N, K])."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32)
    if dim == 0:  # [R, C] words -> [R * per, C] codes
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(words.shape[0] * per, words.shape[1])[:count]
    if sys.byteorder == "little":  # a word's bytes low first: unpack bytes (a quarter of the traffic)
        b = words.contiguous().view(torch.uint8)
        codes = b if bits == 8 else torch.stack([(b >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)], -1)
    else:
        codes = (words[..., None] >> shifts) & ((1 << bits) - 1)  # [R, C, per]
    return codes.reshape(words.shape[0], -1)[:, :count].to(torch.int32).contiguous()


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
    if g_idx is not None and not groups_in_order(g_idx, k, k // g):
        raise QuantError(f"{named('weight_g_idx')}: act-order groups (columns permuted among groups); QMoE's "
                         "blocks are contiguous columns, so these codes can't be folded exactly.")
    zp = parts.get("weight_zero_point")
    if zp is not None:
        if zp.dtype != torch.int32 or tuple(zp.shape) != (-(-n // per), g):
            raise QuantError(f"{named('weight_zero_point')} is {zp.dtype} {tuple(zp.shape)}; expected int32 "
                             f"{(-(-n // per), g)} (packed along the rows).")
        zp = unpack_int32(zp, bits, n, dim=0)
    return PackedLinear(unpack_int32(packed, bits, k, dim=1), scale.float(), zp, QuantSpec(bits, block, zp is None))


def linear_format(path: str) -> LinearFormat:
    """The checkpoint's reading (moec.fold_checkpoint.LinearFormat), its config checked."""
    from moec.fold_checkpoint import quantization_config

    qc = quantization_config(path)
    bits = check_config(path, qc)

    def read(prefix: str, parts: dict[str, torch.Tensor], file: str) -> PackedLinear:
        if "weight_packed" not in parts:
            raise QuantError(f"'{file}': '{prefix}' has {sorted(parts)} but no weight_packed; only pack-quantized "
                             "weights are folded.")
        return read_linear(prefix, parts, bits, file)

    def layout(prefix: str, shapes: dict[str, tuple], file: str, small) -> tuple[tuple[int, int], QuantSpec]:
        if "weight_packed" not in shapes or "weight_shape" not in shapes or "weight_scale" not in shapes:
            raise QuantError(f"'{file}': '{prefix}' has {sorted(shapes)}; a pack-quantized Linear has weight_packed, "
                             "weight_scale and weight_shape.")
        shape = small("weight_shape")
        if shape.numel() != 2:
            raise QuantError(f"'{file}': tensor '{prefix}.weight_shape' holds {shape.numel()} values; [N, K] expected.")
        n, k = (int(x) for x in shape.tolist())
        g = shapes["weight_scale"][-1] if len(shapes["weight_scale"]) == 2 else 0
        if not g or k % g:
            raise QuantError(f"'{file}': tensor '{prefix}.weight_scale' is {tuple(shapes['weight_scale'])}; weights "
                             f"[{n}, {k}] need [{n}, G] with G dividing the columns.")
        return (n, k), QuantSpec(bits, None if g == 1 else k // g, "weight_zero_point" not in shapes)

    groups = (qc.get("config_groups") or {}).values()
    act_order = any((g.get("weights") or {}).get("actorder") for g in groups)
    return LinearFormat(FORMAT, _PARTS, read, layout, "weight_g_idx" if act_order else "")

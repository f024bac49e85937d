"""Fold GPT-OSS's MXFP4 expert checkpoints (`quant_method: mxfp4`) into QMoE int8 codes without re-quantizing.

Matches: a Hugging Face checkpoint whose config.json's quantization_config says `mxfp4` and whose stacked
expert tensors are stored as OCP microscaling FP4 (the layout of openai/gpt-oss-* and of transformers'
GPT-OSS integration): `<experts>.<proj>_blocks` uint8 [E, N, K/32, 16], two E2M1 codes a byte (column 2j in
the low nibble, 2j + 1 in the high one), and `<experts>.<proj>_scales` uint8 [E, N, K/32], one E8M0 exponent
per block of 32 input columns; weight = FP4[code] * 2^(scale - 127), and the model holds its transpose
[E, K, N] (transformers' dequantization transposes). Every other tensor is a plain one.
Produces: what moec.fold_checkpoint.load_quantized_checkpoint gives — the fp32 model holding the exact
dequantization (every FP4 value times a power of two is exact in fp32), and per expert parameter its codes
for QMoE. FP4's values doubled are the integers 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12, so each block is exactly
int8 codes 128 + 2 * FP4 with scale 2^(scale - 128). Where every row's blocks share a span of exponents that
its doubled values still fit in 8 bits at the row's smallest exponent, the codes are rescaled to one scale
per row: ONNX Runtime's per-row int8 QMoE runs fp32 activations and is exact. Otherwise they stay in blocks
of 32, which ORT runs with int8 activations (flagged by the pipeline, like any block-wise int8); the note
says which and why. Either way the codes dequantize to exactly the checkpoint's weights (checked).
Refuses (QuantError, naming the tensor and its file): a `_blocks` without its `_scales` (or the reverse),
dtypes other than uint8, shapes that disagree with each other or with the model of config.json, the E8M0 NaN
exponent 255 and exponents that overflow fp32, and checkpoints with some experts stored unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.fold_checkpoint import complete, model_builder, quantization_config, read_tensors
from moec.quant import QuantError, QuantizedWeight, QuantSpec, WeightCodes, dequantize

FORMAT = "MXFP4 (OCP microscaling FP4, E8M0 scales per 32)"
BLOCK = 32
PARTS = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
# E2M1 code -> twice its value: an integer, so a block is exactly int8 codes at scale 2^(e - 128)
DOUBLED_FP4 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int32)
# a byte of `_blocks` -> its two doubled values, column 2j (low nibble) first
DOUBLED_PAIRS = torch.stack([DOUBLED_FP4[torch.arange(256) & 0x0F], DOUBLED_FP4[torch.arange(256) >> 4]], dim=-1)
NAN_EXPONENT = 255


@dataclass
class Mxfp4Tensor:
    """One stacked expert projection as stored: doubled FP4 values and block exponents."""

    name: str  # the model parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    file: str  # the file holding its _blocks
    doubled: torch.Tensor  # int32 [E, N, K], 2 * the FP4 value
    exponents: torch.Tensor  # int32 [E, N, K / 32], the stored E8M0 exponent

    def dequantized(self) -> torch.Tensor:
        """float32 [E, N, K], exactly FP4 * 2^(e - 127)."""
        e, n, k = self.doubled.shape
        blocks = self.doubled.reshape(e, n, k // BLOCK, BLOCK).float()
        # a small integer times a power of two: exact in fp32 (what ldexp gives, without its per-element cost)
        scale = torch.ldexp(torch.ones(self.exponents.shape), self.exponents - 128)
        return (blocks * scale[..., None]).reshape(e, n, k)

    def _row_shifts(self):
        """(blocks [E, N, G, 32], each block's peak |value|, the row's smallest exponent among its nonzero blocks
        (128 for an all-zero row: any scale serves), each block's shift above it (0 for all-zero blocks))."""
        e, n, k = self.doubled.shape
        blocks = self.doubled.reshape(e, n, k // BLOCK, BLOCK)
        peak = blocks.abs().amax(-1)  # [E, N, G]
        live = peak > 0
        base = torch.where(live, self.exponents, torch.full_like(self.exponents, 1 << 20)).amin(-1, keepdim=True)
        base = torch.where(base == 1 << 20, torch.full_like(base, 128), base)
        shift = torch.where(live, self.exponents - base, torch.zeros_like(self.exponents))
        return blocks, peak, base, shift

    def row_span_fits(self) -> bool:
        """Whether each row's values, at its smallest exponent among nonzero blocks, fit int8 (|v| <= 127)."""
        _, peak, _, shift = self._row_shifts()
        # a block's peak is at least 1, and 1 * 2^7 > 127: a span of 7 never fits (capped so the shift stays small)
        return bool(((shift < 7) & ((peak << shift.clamp(max=7)) <= 127)).all())

    def codes(self, per_row: bool) -> QuantizedWeight:
        if not per_row:
            scales = torch.ldexp(torch.ones(self.exponents.shape), self.exponents - 128)
            return QuantizedWeight(self.doubled + 128, scales, None, QuantSpec(8, BLOCK))
        blocks, _, base, shift = self._row_shifts()
        values = (blocks << shift[..., None]).reshape(self.doubled.shape)
        return QuantizedWeight(values + 128, torch.ldexp(torch.ones(base.shape), base - 128), None, QuantSpec(8))


def decode(name: str, file: str, scales_file: str, blocks: torch.Tensor, scales: torch.Tensor) -> Mxfp4Tensor:
    """One projection's `_blocks` and `_scales` (all its experts, or a slice of them) unpacked and checked: uint8,
    shapes that agree, no NaN exponent, no weight beyond fp32's range."""
    for part, t, f in ((f"{name}_blocks", blocks, file), (f"{name}_scales", scales, scales_file)):
        if t.dtype != torch.uint8:
            raise QuantError(f"{f}: '{part}' is {t.dtype}; MXFP4 blocks and E8M0 scales are uint8.")
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise QuantError(f"{file}: '{name}_blocks' has shape {tuple(blocks.shape)} and '{name}_scales' "
                         f"{tuple(scales.shape)}; MXFP4 needs [E, N, G, 16] blocks and [E, N, G] scales.")
    nan = int((scales == NAN_EXPONENT).sum())
    if nan:
        raise QuantError(f"{scales_file}: '{name}_scales' holds {nan} NaN exponents (E8M0 255); the weights "
                         "they scale are undefined.")
    doubled = DOUBLED_PAIRS[blocks.long()].reshape(*blocks.shape[:2], -1)  # [E, N, K]
    t = Mxfp4Tensor(name, file, doubled, scales.to(torch.int32))
    # 6 * 2^127 and beyond: exponents 253 and 254 overflow fp32 for the larger FP4 values (12 * 2^(e - 128) is
    # finite below 250, so only those blocks are computed)
    hot = t.exponents >= 250
    inf = 0
    if bool(hot.any()):
        e, n, k = doubled.shape
        values = torch.ldexp(doubled.reshape(e, n, k // BLOCK, BLOCK)[hot].float(), (t.exponents[hot] - 128)[:, None])
        inf = int((~torch.isfinite(values)).sum())
    if inf:
        raise QuantError(f"{scales_file}: '{name}_scales' scales {inf} weights beyond fp32's range (exponents "
                         "253-254 with large FP4 values); not a usable checkpoint.")
    return t


def check_against_model(path: str, model: torch.nn.Module, stored: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Every MXFP4 projection (name -> its `_blocks` file and [E, N, K] weights) is one of the model's stacked
    expert parameters, in its transpose's shape, and every stacked expert parameter is MXFP4 (QMoE's codes would
    otherwise cover some layers only; one expert precision per model is folded)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, (file, (e, n, k)) in stored.items():
        want = shapes.get(name)
        if want != (e, k, n):
            raise QuantError(f"{file}: '{name}_blocks' holds [{e}, {n}, {k}] weights (experts, rows, columns); "
                             + (f"the model of config.json has no '{name}'." if want is None else
                                f"the model of config.json wants '{name}' as {list(want)} (its transpose)."))
    plain = sorted(n for n in shapes if n.endswith(("experts.gate_up_proj", "experts.down_proj")) and n not in stored)
    if plain:
        raise QuantError(f"'{path}': '{plain[0]}' is stored unquantized ({len(plain)} such expert tensors) while "
                         f"{len(stored)} others are MXFP4; moec folds checkpoints whose experts are all MXFP4. Not "
                         "folded; nothing was written.")


def folded_spec(per_row: bool, tensors: int) -> tuple[QuantSpec, str]:
    """The QMoE codes' spec for per-row or block codes, and the report's note saying why."""
    spec = QuantSpec(8) if per_row else QuantSpec(8, BLOCK)
    why = ("every row's block exponents span little enough for one scale per row: ONNX Runtime's exact fp32 kernel"
           if per_row else "some rows' block exponents span too much for one int8 scale per row: blocks of 32, which "
           "ONNX Runtime runs with int8 activations")
    return spec, f"{FORMAT} expert weights ({tensors} tensors) folded without re-quantizing as {spec.name} codes ({why})"


def read_mxfp4(path: str) -> tuple[list[Mxfp4Tensor], dict[str, torch.Tensor]]:
    """The checkpoint's MXFP4 projections (unpacked, checked) and its plain tensors."""
    raw, where, plain = read_tensors(path, PARTS)
    out = []
    for prefix, parts in raw.items():
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales = parts.get(f"{proj}_blocks"), parts.get(f"{proj}_scales")
            if blocks is None and scales is None:
                continue
            name = f"{prefix}.{proj}"
            if blocks is None or scales is None:
                have, lack = ("_blocks", "_scales") if scales is None else ("_scales", "_blocks")
                raise QuantError(f"{where[name + have]}: '{name}{have}' has no '{name}{lack}' in the checkpoint; an "
                                 "MXFP4 tensor needs both.")
            out.append(decode(name, where[f"{name}_blocks"], where[f"{name}_scales"], blocks, scales))
    return out, plain


def load_mxfp4(path: str):
    """(model with exactly dequantized weights, the experts' QuantSpec, their codes, notes, format name), as
    moec.fold_checkpoint.load_quantized_checkpoint."""
    qc = quantization_config(path) or {}
    tensors, plain = read_mxfp4(path)
    if not tensors:
        raise QuantError(f"'{path}': config.json says mxfp4, but the checkpoint has no '*_blocks' / '*_scales' "
                         "expert tensors.")
    build = model_builder(path)
    check_against_model(path, build({}), {t.name: (t.file, tuple(t.doubled.shape)) for t in tensors})
    model = complete(path, build({**plain, **{t.name: t.dequantized().transpose(1, 2) for t in tensors}}))
    per_row = all(t.row_span_fits() for t in tensors)
    params = dict(model.named_parameters())
    table = WeightCodes()
    for t in tensors:
        q = t.codes(per_row)
        # in range (pack would wrap anything else into a byte) and dequantizing to exactly the weights
        if int(q.codes.min()) < 0 or int(q.codes.max()) > 255 or not torch.equal(dequantize(q).transpose(1, 2),
                                                                                 params[t.name]):
            raise QuantError(f"{t.file}: the int8 codes of '{t.name}' do not dequantize to its MXFP4 weights; not "
                             "folded.")
        table.attach(params[t.name], q, transposed=True)
    spec, note = folded_spec(per_row, len(tensors))
    notes = [note]
    skipped = qc.get("modules_to_not_convert") or []
    if skipped:
        notes.append(f"{len(skipped)} module patterns the checkpoint keeps unquantized (e.g. {skipped[0]}) loaded as "
                     "their fp32 values")
    return model.eval(), spec, table, notes, FORMAT

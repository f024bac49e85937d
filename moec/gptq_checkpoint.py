"""Read GPTQ and AWQ checkpoints' packed Linears (AutoGPTQ / GPTQModel and AutoAWQ layouts) for moec.fold_checkpoint.

GPTQ (`quant_method: gptq`): per Linear `qweight` int32 [K * bits / 32, N] (32 / bits input rows per word, the
first in the lowest bits), `qzeros` int32 [G, N * bits / 32] (packed along the outputs the same way), `scales`
[G, N] (fp16) and `g_idx` int32 [K] (each input column's group); W[n, k] = scales[g, n] * (q[k, n] - z[g, n])
with g = g_idx[k]. Checkpoints in GPTQ's original format (`checkpoint_format` "gptq", the default) store z - 1;
"gptq_v2" stores z.
AWQ (`quant_method: awq`, `version: gemm`): `qweight` int32 [K, N / 8], `qzeros` int32 [G, N / 8], `scales` [G, N];
eight 4-bit output columns per word in the order 0, 2, 4, 6, 1, 3, 5, 7 from the lowest bits; zero points as
stored. Each format's reading (`gptq_format`, `awq_format`: a moec.fold_checkpoint.LinearFormat) turns a Linear into a
moec.fold_checkpoint.PackedLinear in moec's [N, K] layout: unsigned codes unchanged, scales
widened to fp32 exactly, zero points dropped when they are all 2^(bits-1) (symmetric).
Refuses (QuantError, naming the tensor and file): bit widths QMoE can't take (GPTQ's 3 bits), group sizes it
can't take, act-order (`desc_act`) whose g_idx permutes columns among groups (QMoE's blocks are contiguous
columns: the permutation can't be folded exactly), AWQ versions other than gemm, and tensors whose shapes
disagree with the config or each other.
"""

from __future__ import annotations

import torch

from moec.compressed_tensors_checkpoint import unpack_int32
from moec.fold_checkpoint import LinearFormat, PackedLinear, groups_in_order, quantization_config
from moec.quant import BLOCK_SIZES, QuantError, QuantSpec

GPTQ = "GPTQ"
AWQ = "AWQ (GEMM)"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column (within a word's eight) held by nibble i
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _group_size(path: str, qc: dict) -> int:
    gs = int(qc.get("group_size", -1))
    if gs != -1 and gs not in BLOCK_SIZES:
        raise QuantError(f"{path}/config.json quantization_config: group_size {gs}; QMoE takes blocks of "
                         f"{', '.join(map(str, BLOCK_SIZES))} (or -1, one scale per output channel).")
    return gs


def gptq_format(path: str) -> LinearFormat:
    """The GPTQ checkpoint's reading (moec.fold_checkpoint.LinearFormat), its config checked."""
    qc = quantization_config(path)
    bits = int(qc.get("bits", 0))
    if bits not in (2, 4, 8):
        raise QuantError(f"{path}/config.json quantization_config: {bits}-bit GPTQ; QMoE takes 2, 4 or 8 bits (3-bit "
                         "GPTQ packs codes across words).")
    gs = _group_size(path, qc)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantError(f"{path}/config.json quantization_config: checkpoint_format '{fmt}' (a kernel's repacked "
                         "layout); moec reads GPTQ's own 'gptq' and 'gptq_v2' layouts.")
    v1 = fmt == "gptq"
    symmetric = bool(qc.get("sym", True))
    per = 32 // bits

    def read(prefix: str, parts: dict[str, torch.Tensor], file: str) -> PackedLinear:
        _require(prefix, parts, ("qweight", "qzeros", "scales"), file)
        qweight = parts["qweight"]
        k, n = qweight.shape[0] * per, qweight.shape[1]
        codes = unpack_int32(qweight.T, bits, k, dim=1)  # [N, K], unpacked along K
        g = _groups(prefix, k, gs, file)
        scales = _scales(prefix, parts["scales"], g, n, file)
        zeros = unpack_int32(parts["qzeros"], bits, n, dim=1) if tuple(parts["qzeros"].shape) == (g, -(-n // per)) \
            else _bad(prefix, "qzeros", parts["qzeros"], (g, -(-n // per)), file)
        if v1:
            zeros = zeros + 1  # GPTQ's original format stores zero - 1
            if int(zeros.max()) >= 1 << bits:  # a zero point of 0, stored as -1: GPTQ v1's known overflow
                raise QuantError(f"'{file}': tensor '{prefix}.qzeros' holds a zero point of 0, which GPTQ's original "
                                 f"format stores as -1 and its kernels read back as {1 << bits}; QMoE's {bits}-bit zero "
                                 "points can't hold that. Convert the checkpoint to gptq_v2.")
        g_idx = parts.get("g_idx")
        if g_idx is not None:
            if not groups_in_order(g_idx, k, None if gs == -1 else gs):
                raise QuantError(f"'{file}': tensor '{prefix}.g_idx' assigns input columns to groups out of order "
                                 "(act-order, desc_act); QMoE's blocks are contiguous columns and each expert's "
                                 "permutation differs, so these codes can't be folded exactly. Re-quantize without "
                                 "desc_act, or compile with --quant to re-quantize.")
        return _linear(codes, scales, zeros.T.contiguous(), bits, gs, symmetric, file, prefix)

    def layout(prefix: str, shapes: dict[str, tuple], file: str, small) -> tuple[tuple[int, int], QuantSpec]:
        _require(prefix, shapes, ("qweight", "qzeros", "scales"), file)
        rows, n = _matrix(prefix, "qweight", shapes, file)
        return (n, rows * per), QuantSpec(bits, None if gs == -1 else gs, symmetric)

    return LinearFormat(GPTQ, _PARTS, read, layout, "g_idx" if qc.get("desc_act") else "")


def awq_format(path: str) -> LinearFormat:
    """The AWQ (GEMM) checkpoint's reading (moec.fold_checkpoint.LinearFormat), its config checked."""
    qc = quantization_config(path)
    if str(qc.get("version", "gemm")).lower() != "gemm":
        raise QuantError(f"{path}/config.json quantization_config: AWQ version '{qc.get('version')}'; moec reads the "
                         "GEMM packing.")
    if int(qc.get("bits", qc.get("w_bit", 4))) != 4 or not qc.get("zero_point", True):
        raise QuantError(f"{path}/config.json quantization_config: AWQ with {qc.get('bits')} bits / zero_point "
                         f"{qc.get('zero_point')}; moec reads 4-bit AWQ with zero points.")
    gs = _group_size(path, qc)

    def read(prefix: str, parts: dict[str, torch.Tensor], file: str) -> PackedLinear:
        _require(prefix, parts, ("qweight", "qzeros", "scales"), file)
        k, n = parts["qweight"].shape[0], parts["qweight"].shape[1] * 8
        codes = _unpack_awq(parts["qweight"]).T.contiguous()  # [N, K]
        g = _groups(prefix, k, gs, file)
        scales = _scales(prefix, parts["scales"], g, n, file)
        if tuple(parts["qzeros"].shape) != (g, n // 8):
            _bad(prefix, "qzeros", parts["qzeros"], (g, n // 8), file)
        return _linear(codes, scales, _unpack_awq(parts["qzeros"]).T.contiguous(), 4, gs, False, file, prefix)

    def layout(prefix: str, shapes: dict[str, tuple], file: str, small) -> tuple[tuple[int, int], QuantSpec]:
        _require(prefix, shapes, ("qweight", "qzeros", "scales"), file)
        k, words = _matrix(prefix, "qweight", shapes, file)
        return (words * 8, k), QuantSpec(4, None if gs == -1 else gs, False)

    return LinearFormat(AWQ, _PARTS, read, layout)


def _matrix(prefix: str, part: str, shapes: dict[str, tuple], file: str) -> tuple[int, int]:
    shape = tuple(shapes[part])
    if len(shape) != 2:
        raise QuantError(f"'{file}': tensor '{prefix}.{part}' is {shape}; a packed Linear's {part} is 2-D.")
    return shape


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> codes [R, C] in column order (int32 throughout: the mask drops the sign bits)."""
    words = packed.to(torch.int32)
    out = torch.empty(words.shape[0], words.shape[1], 8, dtype=torch.int32)
    for i, col in enumerate(AWQ_ORDER):
        out[..., col] = (words >> (4 * i)) & 0xF
    return out.reshape(words.shape[0], -1)


def _linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, gs: int, symmetric: bool,
            file: str, prefix: str) -> PackedLinear:
    """The config says whether zero points are implicit (symmetric: 2^(bits-1)); an asymmetric checkpoint keeps
    them all, even where they happen to be 2^(bits-1), so that every expert has one scheme."""
    if symmetric and not bool((zeros == (1 << (bits - 1))).all()):
        raise QuantError(f"'{file}': tensor '{prefix}.qzeros' holds zero points other than {1 << (bits - 1)}, but the "
                         "config says sym; the quantization config and the tensors disagree.")
    return PackedLinear(codes, scales, None if symmetric else zeros.to(torch.int32),
                        QuantSpec(bits, None if gs == -1 else gs, symmetric))


def _groups(prefix: str, k: int, gs: int, file: str) -> int:
    if gs != -1 and k % gs:
        raise QuantError(f"'{file}': '{prefix}' has {k} input columns, which groups of {gs} don't divide; QMoE's "
                         "blocks must.")
    return 1 if gs == -1 else k // gs


def _scales(prefix: str, scales: torch.Tensor, g: int, n: int, file: str) -> torch.Tensor:
    if tuple(scales.shape) != (g, n):
        _bad(prefix, "scales", scales, (g, n), file)
    return scales.float().T.contiguous()  # fp16 -> fp32 is exact


def _require(prefix: str, parts: dict, names: tuple, file: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise QuantError(f"'{file}': '{prefix}' has {sorted(parts)} but no {', '.join(missing)}; the quantization "
                         "config and the tensors disagree.")


def _bad(prefix: str, what: str, t: torch.Tensor, want: tuple, file: str):
    raise QuantError(f"'{file}': tensor '{prefix}.{what}' is {tuple(t.shape)}; its qweight and the config's group "
                     f"size need {want}. The quantization config and the tensors disagree.")

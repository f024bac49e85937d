"""Weight-only round-to-nearest quantization of expert weights, in ONNX Runtime's QMoE layout.

Layout (ORT 1.31 ``com.microsoft.QMoE``, quant_type 'int', weights_prepacked=0), for a weight
``W [E, N, K]`` (N output rows, K input features):
- codes: unsigned, ``uint8 [E, N, ceil(K * bits / 8)]``, little-endian within a byte: 4-bit, two
  codes per byte, the even column in the low nibble; 2-bit, four codes per byte, column 4j + i in
  bits 2i..2i+1 of byte j;
- scales: ``[E, N, K / block]`` (block-wise) or ``[E, N]`` (one per row);
- zero points: absent for symmetric quantization (ORT then uses 2^(bits-1)); for asymmetric,
  ``uint8 [E, N, ceil(K / block * bits / 8)]`` (or ``[E, ceil(N * bits / 8)]`` per row), packed
  like the codes;
- dequantized = (code - zero_point) * scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from moec.errors import MoecError

BLOCK_SIZES = (16, 32, 64, 128)
BITS = (2, 4, 8)


class QuantError(MoecError):
    """Quantization can't be done as asked (block size, bits, non-finite weights, bad scales)."""

    exit_code = 17


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_size: Optional[int] = None  # None: one scale per output row
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in BITS:
            raise QuantError(f"{self.bits}-bit weights: ONNX Runtime's QMoE runs 2, 4 or 8 bits (choose int2, int4 or "
                             "int8).")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise QuantError(f"block size {self.block_size}: QMoE takes {', '.join(map(str, BLOCK_SIZES))} "
                             "(or none for one scale per row).")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f" block {self.block_size}" if self.block_size else " per-row") + (
            "" if self.symmetric else " asymmetric")


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # int32 [E, N, K], 0..qmax
    scales: torch.Tensor  # float32 [E, N, G] (G = K / block, or 1 per row)
    zero_points: Optional[torch.Tensor]  # int32 [E, N, G] or None (symmetric: 2^(bits-1))
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


class WeightCodes:
    """Pre-quantized weights' own codes (packed checkpoints, folded Q/DQ), by weight tensor.

    Loading and folding record them here; fuse_moe stacks them with the expert weights into the fused
    layer's declared `quantized` field, and quantize_experts then writes them unchanged. Keyed by the
    tensor object (held here, so an id is never reused while its entry lives). Codes are always [E, N, K]
    with blocks along K; `transposed` says they describe the weight's transpose (a parameter stored
    [E, K, N], x @ W, as GPT-OSS's experts are), and only a reading that transposes it gets them."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[torch.Tensor, QuantizedWeight, bool]] = {}

    def attach(self, weight: torch.Tensor, codes: QuantizedWeight, transposed: bool = False) -> None:
        self._by_id[id(weight)] = (weight, codes, transposed)

    def get(self, weight: Optional[torch.Tensor], transposed: bool = False) -> Optional[QuantizedWeight]:
        entry = self._by_id.get(id(weight)) if weight is not None else None
        return entry[1] if entry is not None and entry[0] is weight and entry[2] == transposed else None

    def clear(self) -> None:
        """Drop every entry (and the reference to its weight) once the codes live in the fused layers."""
        self._by_id.clear()

    def keep_only(self, weights) -> None:
        """Keep the entries of these tensors (a module's parameters still in use: a pre-quantized checkpoint's
        dense Linears, whose codes quantize_dense folds), dropping the rest and the references to their weights."""
        alive = {id(w) for w in weights}
        self._by_id = {k: v for k, v in self._by_id.items() if k in alive}

    def __len__(self) -> int:
        return len(self._by_id)


def _groups(k: int, spec: QuantSpec, name: str) -> int:
    if spec.block_size is None:
        return 1
    if k % spec.block_size:
        raise QuantError(f"{name}: block size {spec.block_size} does not divide its input dimension {k}; "
                         f"choose a block size that divides {k}.")
    return k // spec.block_size


def quantize(weight: torch.Tensor, spec: QuantSpec, name: str,
             clip: Optional[tuple[float, ...]] = None) -> QuantizedWeight:
    """Round-to-nearest, per block of `block_size` input features (or per row). `weight` is [E, N, K].
    The scale spans the block's range (its largest magnitude, symmetric), clipped per block to whichever of
    the `clip` ratios gives the least squared error; by default no clipping, except at 2 bits
    (CLIP_RATIOS_2BIT)."""
    if weight.dim() != 3:
        raise QuantError(f"{name}: expected a stacked [experts, rows, cols] weight, got shape {tuple(weight.shape)}.")
    w = weight.detach().float()
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise QuantError(f"{name}: {bad} non-finite values (NaN/inf) in the weights; nothing was written.")
    e, n, k = w.shape
    g = _groups(k, spec, name)
    blocks = w.reshape(e, n, g, k // g)
    if clip is None:
        clip = CLIP_RATIOS_2BIT if spec.bits == 2 else ()
    ratio = _clip_ratios(blocks, spec, clip) if clip else 1.0
    codes, scales, zps = _round(blocks, spec, ratio)
    zps = None if zps is None else zps.to(torch.int32)
    return QuantizedWeight(codes.reshape(e, n, k).to(torch.int32), scales.float(), zps, spec)


def quantized_shape(weight: torch.Tensor, spec: QuantSpec, name: str) -> QuantizedWeight:
    """What `quantize` would return, as meta tensors: an out-of-core compile's graph is captured from shapes
    before any weight is read (its codes are computed a layer at a time, afterwards)."""
    e, n, k = weight.shape
    g = _groups(k, spec, name)

    def meta(*shape, dtype=torch.int32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    return QuantizedWeight(meta(e, n, k), meta(e, n, g, dtype=torch.float32),
                           None if spec.symmetric else meta(e, n, g), spec)


def packed_shapes(q: QuantizedWeight) -> tuple[tuple, tuple, Optional[tuple]]:
    """The shapes `pack(q)` gives its weight, scales and zero points (uint8, float32, uint8), from shapes alone."""
    e, n, k = q.shape
    per = 8 // q.spec.bits
    g = q.scales.shape[-1]
    scales = (e, n) if q.spec.block_size is None else (e, n, g)
    zps = None
    if q.zero_points is not None:
        zps = (e, -(-n // per)) if q.spec.block_size is None else (e, n, -(-g // per))
    return (e, n, -(-k // per)), scales, zps


# At 2 bits the largest magnitude is a poor scale: a block of Gaussian weights then rounds most of its values
# to zero (measured: a SwiGLU layer's output 1.05-1.3 relative L2 from fp32). Shrinking the range by one of
# these ratios (values beyond it clamp to the end codes) is searched per block for the least squared error.
CLIP_RATIOS_2BIT = tuple(round(0.25 + 0.05 * i, 2) for i in range(16))  # 0.25 .. 1.0


def _clip_ratios(blocks: torch.Tensor, spec: QuantSpec, ratios: tuple[float, ...]) -> torch.Tensor:
    """[E, N, G]: per block, the one of `ratios` with the least squared error (one expert at a
    time, so the temporaries stay the size of one expert's weight). Each ratio's error is `_round`'s then
    `_squared_error`'s, computed in place in one buffer from the blocks' extent found once: the same values
    (the codes' offset by the zero point is exact in float) in about half the time (int2 out of core
    quantizes every expert as it streams)."""
    out = []
    for chunk in blocks.split(1):
        buf, extent = torch.empty_like(chunk), _extent(chunk, spec)
        best_err, best = None, None
        for ratio in ratios:
            scales, zps = _scales(extent, spec, ratio)
            s = scales.unsqueeze(-1)
            torch.div(chunk, s, out=buf).round_()
            if zps is None:  # symmetric: codes - zp, clamped as the codes are
                zp = float(1 << (spec.bits - 1))
                buf.clamp_(-zp, spec.qmax - zp)
            else:
                z = zps.unsqueeze(-1)
                buf.add_(z).clamp_(0, spec.qmax).sub_(z)
            err = buf.mul_(s).sub_(chunk).square_().sum(dim=-1)
            if best is None:
                best_err, best = err, torch.full_like(err, ratio)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, ratio, best)
        out.append(best)
    return torch.cat(out)


def _extent(blocks: torch.Tensor, spec: QuantSpec) -> tuple:
    """What the scales are made from, per block: the largest magnitude (symmetric), or [min, max] with 0."""
    if spec.symmetric:
        return (blocks.abs().amax(dim=-1),)
    return blocks.amin(dim=-1).clamp(max=0.0), blocks.amax(dim=-1).clamp(min=0.0)


def _scales(extent: tuple, spec: QuantSpec, ratio):
    """(scales, zero points or None) for the extent clipped to `ratio`. At 1.0: symmetric, the largest
    magnitude maps to +-(zp - 1) steps; asymmetric, [min, max] including 0 spans the codes."""
    if spec.symmetric:
        scales = extent[0] * ratio / ((1 << (spec.bits - 1)) - 1)
        return torch.where(scales > 0, scales, torch.ones_like(scales)), None
    lo, hi = extent[0] * ratio, extent[1] * ratio
    scales = (hi - lo) / spec.qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return scales, torch.clamp(torch.round(-lo / scales), 0, spec.qmax)


def _round(blocks: torch.Tensor, spec: QuantSpec, ratio):
    """(codes, scales, zero points or None) rounding `blocks` [E, N, G, B] to nearest, the range clipped
    to `ratio` (a number, or one per block [E, N, G]) of its extent (`_scales`)."""
    scales, zps = _scales(_extent(blocks, spec), spec, ratio)
    offset = float(1 << (spec.bits - 1)) if zps is None else zps.unsqueeze(-1)
    codes = torch.clamp(torch.round(blocks / scales.unsqueeze(-1)) + offset, 0, spec.qmax)
    return codes, scales, zps


def _squared_error(blocks, codes, scales, zps, spec: QuantSpec) -> torch.Tensor:
    return (_dequantize_blocks(codes, scales, zps, spec.bits) - blocks).square().sum(dim=-1)


def _dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, zps: Optional[torch.Tensor], bits: int):
    """(code - zero point) * scale for codes [..., G, B] with scales and zero points [..., G] (None: 2^(bits-1))."""
    zp = zps.float() if zps is not None else torch.full_like(scales, float(1 << (bits - 1)))
    return (codes.float() - zp.unsqueeze(-1)) * scales.unsqueeze(-1)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    e, n, k = q.shape
    g = q.scales.shape[-1]
    return _dequantize_blocks(q.codes.reshape(e, n, g, k // g), q.scales, q.zero_points, q.spec.bits).reshape(e, n, k)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[..., cols]`` (each < 2^bits) -> ``uint8 [..., ceil(cols * bits / 8)]``, the first column of
    each byte in its lowest bits (4-bit: the even column in the low nibble)."""
    codes = codes.astype(np.uint8)
    per = 8 // bits
    if per == 1:
        return codes
    pad = -codes.shape[-1] % per
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    out = np.zeros(codes.shape[:-1] + (codes.shape[-1] // per,), np.uint8)
    for i in range(per):
        out |= codes[..., i::per] << (i * bits)
    return out


def _unpack(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of `_pack`: int32 codes ``[..., cols]``."""
    per = 8 // bits
    if per == 1:
        return packed.astype(np.int32)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * per,), np.int32)
    for i in range(per):
        out[..., i::per] = (packed >> (i * bits)) & ((1 << bits) - 1)
    return out[..., :cols]


@dataclass
class PackedWeight:
    """Exactly the arrays ONNX Runtime's QMoE takes for one of fc1 / fc2."""

    weight: np.ndarray  # uint8 [E, N, K * bits / 8]
    scales: np.ndarray  # float32 [E, N, G] or [E, N]
    zero_points: Optional[np.ndarray]  # uint8, packed like the weight, or None
    spec: QuantSpec
    cols: int  # K


def pack(q: QuantizedWeight) -> PackedWeight:
    e, n, k = q.shape
    scales = q.scales.numpy().astype(np.float32)
    zps = None if q.zero_points is None else q.zero_points.numpy()
    if q.spec.block_size is None:
        scales = scales[..., 0]
        if zps is not None:
            zps = _pack(zps[..., 0], q.spec.bits)  # [E, ceil(N * bits / 8)]
    elif zps is not None:
        zps = _pack(zps, q.spec.bits)
    return PackedWeight(_pack(q.codes.numpy(), q.spec.bits), scales, zps, q.spec, k)


def unpack(p: PackedWeight, name: str = "weight") -> QuantizedWeight:
    """Inverse of `pack`; checks that the scales and zero points fit the weight (pre-quantized checkpoints)."""
    e, n = p.weight.shape[:2]
    expect = math.ceil(p.cols * p.spec.bits / 8)
    if p.weight.shape[-1] != expect:
        raise QuantError(f"{name}: packed weight has {p.weight.shape[-1]} bytes per row; {p.cols} "
                         f"{p.spec.bits}-bit columns need {expect}.")
    g = 1 if p.spec.block_size is None else _groups(p.cols, p.spec, name)
    scales = p.scales if p.spec.block_size is not None else p.scales[..., None]
    if tuple(scales.shape) != (e, n, g):
        raise QuantError(f"{name}: scales have shape {tuple(p.scales.shape)}; weights [{e}, {n}, {p.cols}] with "
                         f"{p.spec.name} need {(e, n, g) if p.spec.block_size else (e, n)}.")
    codes = torch.from_numpy(_unpack(p.weight, p.spec.bits, p.cols))
    zps = None
    if p.zero_points is not None:
        if p.spec.block_size is None:
            zps = torch.from_numpy(_unpack(p.zero_points, p.spec.bits, n))[..., None]
        else:
            zps = torch.from_numpy(_unpack(p.zero_points, p.spec.bits, g))
        if tuple(zps.shape) != (e, n, g):
            raise QuantError(f"{name}: zero points do not match the scales' shape {(e, n, g)}.")
    return QuantizedWeight(codes, torch.from_numpy(np.ascontiguousarray(scales)).float(), zps, p.spec)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor], bits: int,
                     cols: int) -> torch.Tensor:
    """float32 [E, N, cols] from packed codes ``uint8 [E, N, cols * bits / 8]`` (4-bit: even column in
    the low nibble), scales ``[E, N, G]`` and unpacked zero points ``uint8 [E, N, G]`` (None: 2^(bits-1)).
    The TensorRT plugin's quantized layout (zero points one a byte, unlike QMoE's)."""
    c = codes.to(torch.int32)
    if bits == 4:
        c = torch.stack([c & 0x0F, c >> 4], dim=-1).reshape(*c.shape[:2], -1)
    e, n, g = scales.shape
    zp = zero_points.float() if zero_points is not None else torch.full((e, n, g), float(1 << (bits - 1)),
                                                                       device=scales.device)
    blocks = c[..., :cols].float().reshape(e, n, g, cols // g)
    return ((blocks - zp.unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(e, n, cols)


@dataclass
class NBitsWeight:
    """A Linear weight [N, K] in ONNX Runtime's MatMulNBits layout (block-wise only)."""

    packed: np.ndarray  # uint8 [N, K / block, block * bits / 8]
    scales: np.ndarray  # float32 [N * K / block]
    zero_points: Optional[np.ndarray]  # uint8 [N * ceil(K / block * bits / 8)], or None (symmetric)
    spec: QuantSpec


# Rows of a Linear quantized together: rounding's intermediates are a few times the rows' fp32 bytes, and a
# large-vocabulary head (151936 x 2048: 1.2 GiB) quantized whole peaked at ~4x its size.
CHUNK_ELEMENTS = 1 << 24


def quantize_nbits(weight: torch.Tensor, spec: QuantSpec, name: str, reference: bool = True,
                   out: Optional[torch.Tensor] = None) -> tuple[NBitsWeight, Optional[torch.Tensor]]:
    """(MatMulNBits tensors, the dequantized weight) for a Linear weight [N, K]; same rounding as the experts.
    Blocks run along K, so rows are quantized a chunk at a time (the same codes as all at once). `reference`:
    also the dequantized weight, written into `out` when given (it may be `weight` itself: each chunk is read
    before it is overwritten)."""
    if spec.block_size is None:
        raise QuantError(f"{name}: ONNX Runtime's MatMulNBits quantizes in blocks; give --block-size.")
    n, k = weight.shape
    step = max(1, CHUNK_ELEMENTS // k)
    parts = []
    if reference and out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    with torch.no_grad():
        for r0 in range(0, n, step):
            q = quantize(weight[r0:r0 + step].detach().unsqueeze(0), spec, name)
            parts.append(nbits(q))
            if reference:
                out[r0:r0 + step] = dequantize(q)[0]
    return concat_nbits(parts), (out if reference else None)


def nbits(q: QuantizedWeight) -> NBitsWeight:
    """One Linear's block-wise codes ([1, N, K]) in MatMulNBits' layout."""
    p, spec = pack(q), q.spec
    _, n, k = q.shape
    packed = p.weight.reshape(n, k // spec.block_size, spec.block_size * spec.bits // 8)
    zps = None if p.zero_points is None else p.zero_points.reshape(-1)
    return NBitsWeight(packed, p.scales.reshape(-1).astype(np.float32), zps, spec)


def matmul_nbits_dequantize(packed: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                            bits: int, block_size: int, k: int, n: int) -> torch.Tensor:
    """float32 [N, K] from MatMulNBits tensors (what ONNX Runtime computes with)."""
    g = k // block_size
    spec = QuantSpec(bits, block_size, zero_points is None)
    zps = None if zero_points is None else zero_points.reshape(1, n, -1).numpy()
    p = PackedWeight(packed.reshape(1, n, -1).numpy(), scales.reshape(1, n, g).numpy(), zps, spec, k)
    return dequantize(unpack(p))[0]


def dequantize_nbits_into(q: NBitsWeight, out: torch.Tensor) -> torch.Tensor:
    """MatMulNBits tensors dequantized into `out` [N, K] (matmul_nbits_dequantize), a chunk of rows at a time (a
    large head's codes are never unpacked whole: int32 codes are as large as its fp32 weight). Returns `out`."""
    n, k = out.shape
    packed, scales = torch.from_numpy(q.packed.reshape(n, -1)), torch.from_numpy(q.scales.reshape(n, -1))
    zps = None if q.zero_points is None else torch.from_numpy(q.zero_points.reshape(n, -1))
    step = max(1, CHUNK_ELEMENTS // k)
    with torch.no_grad():
        for r0 in range(0, n, step):
            rows = packed[r0:r0 + step]
            out[r0:r0 + step] = matmul_nbits_dequantize(rows, scales[r0:r0 + step],
                                                        None if zps is None else zps[r0:r0 + step], q.spec.bits,
                                                        q.spec.block_size, k, rows.shape[0])
    return out


def concat_nbits(parts: list[NBitsWeight]) -> NBitsWeight:
    """Blocks of rows of one Linear's MatMulNBits tensors, as one."""
    zps = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
    return NBitsWeight(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]), zps,
                       parts[0].spec)


def qmoe_dequantize(packed: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor], bits: int,
                    block_size: int, cols: int) -> torch.Tensor:
    """Torch-side dequantization of QMoE inputs (what ONNX Runtime computes with)."""
    spec = QuantSpec(bits, block_size or None, zero_points is None)
    if scales.dtype == torch.bfloat16:  # numpy has no bf16: in fp32 (exact for bf16 scales), the result in bf16
        return qmoe_dequantize(packed, scales.float(), zero_points, bits, block_size, cols).to(torch.bfloat16)
    p = PackedWeight(packed.numpy(), scales.numpy(), None if zero_points is None else zero_points.numpy(), spec, cols)
    return dequantize(unpack(p))

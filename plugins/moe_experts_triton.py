"""The experts plugin's kernels, in Triton (the kernel language): grouped GEMMs over expert segments.

Algorithm (the shape TensorRT-LLM's and vLLM's fused MoE kernels take):
  1. `align_by_expert`: sort the (token, slot) pairs by expert and pad each expert's segment to a
     multiple of BLOCK_M, so every row block of the GEMMs belongs to one expert. On the device with
     no host synchronisation: the buffers are sized by an upper bound that depends on the token
     count only, blocks past the real end carry expert -1 and exit at once (so the op can be
     captured in a CUDA graph);
  2. `_gate_up_kernel`: per row block and BLOCK_N tile of the intermediate dim, gather the block's
     token rows, multiply by the expert's gate and up rows (+ biases), apply the activation
     (SiLU/GELU/ReLU gate, or GPT-OSS's clamped SwiGLU) -> h [rows, I];
  3. `_down_kernel`: h times the expert's down projection (+ bias), scaled by the routing weight,
     added atomically into the fp32 output row of its token (the weighted combine).

Weights are float (fp32/fp16/bf16) or packed int4/int8 (`PackedExpertWeight`), dequantized inside
the kernels tile by tile: (code - zero_point) * scale, codes packed two per byte (even column in the
low nibble) like ONNX Runtime's QMoE, one scale per `group_size` input columns.

Dots take the activations' dtype (tensor cores for fp16/bf16; fp32 runs as IEEE fp32, not TF32) and
accumulate in fp32. Under TRITON_INTERPRET=1 bf16 is computed in fp32 (the interpreter's bf16
`tl.dot` is wrong). The atomic combine makes the summation order of a token's k expert outputs vary
between runs on a GPU (fp32 rounding only).

For a handful of tokens, moe_experts_decode.py has a second formulation (matrix-vector kernels, no
sort, no atomics), chosen by passing a `DecodeConfig`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from moec.activations import ACTIVATIONS

ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}  # the kernels' ACT constexpr: see _activate


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 16
    block_n: int = 32
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3  # software pipelining depth on a GPU (ignored by the interpreter)


@dataclass(frozen=True)
class DecodeConfig:
    """The decode path (moe_experts_decode.py): matrix-vector tiles, used while tokens * k <= max_pairs.

    The down kernel loads all k slots at once, so its tile is k x down_block_k x down_block_n; the
    defaults make both kernels' tiles 16 KB of bf16 weights per loop trip (k=8) without spills
    (tools/inspect_kernels.py shows registers and load widths; timing needs a GPU)."""

    block_n: int = 16  # columns of I per gate/up program
    block_k: int = 256
    down_block_n: int = 16  # columns of H per down program
    down_block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4
    max_pairs: int = 64  # above this the sorted kernels run (with default_config's tiles)


def default_config(pairs: int) -> "TileConfig":
    """The sorted kernels' untuned tiles for `pairs` (token, slot) rows: narrow for weight streaming,
    square for FLOPs (the H100's best per size in tools/results/bench_plugin_kernels_h100.log).

    The decode kernels (DecodeConfig) are not a default yet: they have run under the interpreter
    only, not been timed on a GPU (see the README's TensorRT section)."""
    if pairs <= 256:
        return TileConfig(16, 32, 128, 4, 4)
    if pairs <= 8192:
        return TileConfig(64, 128, 64, 8, 3)
    return TileConfig(128, 128, 64, 8, 3)


# What autotuning (plugins/tensorrt_plugin.py, tools/bench_plugin_kernels.py) chooses from on a GPU:
# narrow-N / deep-K tiles for decode (weight streaming), square ones for prefill (tensor-core bound).
TILE_CONFIGS = [
    TileConfig(16, 32, 32),
    TileConfig(16, 16, 256, 4, 4),
    TileConfig(16, 32, 256, 4, 4),
    TileConfig(16, 32, 128, 4, 4),
    TileConfig(16, 64, 128, 4, 4),
    TileConfig(16, 64, 256, 8, 3),
    TileConfig(32, 64, 64, 4, 4),
    TileConfig(64, 64, 64, 4, 3),
    TileConfig(64, 128, 64, 8, 3),
    TileConfig(128, 128, 64, 8, 3),
]

# The decode kernels' candidates, timed by tools/bench_plugin_kernels.py. Not TensorRT tactics until
# they have been checked on a GPU (MOEC_KERNEL_TESTS_ON_GPU=1): a tactic is picked by speed alone.
DECODE_CONFIGS = [
    DecodeConfig(),
    DecodeConfig(8, 512, 8, 128),  # twice the programs of the default
    DecodeConfig(32, 128, 32, 64, 8),  # half the programs, 8 warps
    DecodeConfig(16, 256, 8, 64),  # down tiles of 8 KB
    DecodeConfig(16, 512, 16, 128, 8, 3),  # 32 KB per trip
]


@dataclass(frozen=True)
class PackedExpertWeight:
    """An int4/int8 expert weight as the plugin takes it (logical shape [E, N, K], K = `cols`).

    codes: uint8 [E, N, K * bits / 8], 4-bit codes two per byte, the even column in the low nibble;
    scales: [E, N, G] float, G = K / group_size (G = 1: one scale per row);
    zero_points: uint8 [E, N, G] unpacked, or None for symmetric codes (zero point 2^(bits-1)).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: Optional[torch.Tensor]
    bits: int
    cols: int

    def __post_init__(self):
        e, n, nbytes = self.codes.shape
        if self.bits not in (4, 8):
            raise ValueError(f"packed expert weights are int4 or int8, not {self.bits}-bit")
        if nbytes * 8 != self.cols * self.bits:
            raise ValueError(f"{nbytes} bytes per row do not hold {self.cols} {self.bits}-bit codes")
        if self.scales.dim() != 3 or tuple(self.scales.shape[:2]) != (e, n) or self.cols % self.scales.shape[2]:
            raise ValueError(f"scales of shape {tuple(self.scales.shape)} do not fit a [{e}, {n}, {self.cols}] weight")
        if self.zero_points is not None and self.zero_points.shape != self.scales.shape:
            raise ValueError("zero points must be shaped like the scales")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.codes.shape[0], self.codes.shape[1], self.cols)

    @property
    def group_size(self) -> int:
        return self.cols // self.scales.shape[2]

    def dequantize(self) -> torch.Tensor:
        """float32 [E, N, K] (the reference the kernels are checked against)."""
        from moec.quant import dequantize_codes

        return dequantize_codes(self.codes, self.scales, self.zero_points, self.bits, self.cols)


Weight = Union[torch.Tensor, PackedExpertWeight]


def _capacity(pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the padded, sorted pair list can need: each non-empty expert adds < block_m padding."""
    rows = pairs + min(pairs, num_experts) * (block_m - 1)
    return max(triton.cdiv(rows, block_m), 1) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int, zero: Optional[torch.Tensor] = None):
    """(sorted (token*k+slot) ids padded with -1, expert of each row block, -1 past the end), both int32.

    Pairs keep their order within an expert (a stable sort). Runs on topk_ids' device without a host
    sync: one Triton program for up to `ALIGN_IN_ONE_PROGRAM` pairs (decode; a dozen tiny torch ops
    would cost more than the GEMMs), torch's sort above that. `zero` (a contiguous fp32 tensor) is
    zero-filled on the way, by the same launch's other programs at decode (one launch fewer).
    """
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    capacity = _capacity(n, num_experts, block_m)
    sorted_ids = torch.empty((capacity,), dtype=torch.int32, device=flat.device)
    block_expert = torch.empty((capacity // block_m,), dtype=torch.int32, device=flat.device)
    if n <= ALIGN_IN_ONE_PROGRAM:
        bins = triton.next_power_of_2(num_experts)
        chunk = max(16, min(64, 8192 // bins))
        n_zero = 0 if zero is None else zero.numel()
        grid = (1 + triton.cdiv(n_zero, ZERO_BLOCK),)
        _align_kernel[grid](flat.contiguous(), sorted_ids, block_expert, zero if zero is not None else sorted_ids,
                            n, capacity, num_experts, n_zero, BLOCK_M=block_m, BINS=bins, CHUNK=chunk,
                            ZERO_BLOCK=ZERO_BLOCK, num_warps=8)
        return sorted_ids, block_expert
    if zero is not None:
        zero.zero_()
    flat = flat.to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first = torch.cumsum(counts, 0) - counts  # position in `order` of each expert's first pair
    dest = (ends - padded)[expert_of] + torch.arange(n, device=flat.device) - first[expert_of]
    sorted_ids.fill_(-1).scatter_(0, dest, order.to(torch.int32))
    found = torch.searchsorted(ends, torch.arange(0, capacity, block_m, device=flat.device), right=True)
    block_expert.copy_(torch.where(found < num_experts, found, torch.full_like(found, -1)))
    return sorted_ids, block_expert


ALIGN_IN_ONE_PROGRAM = 4096
ZERO_BLOCK = 2048


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, zero_ptr, n_pairs, capacity, num_experts, n_zero,
                  BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """align_by_expert in program 0: count, exclusive scan, stable scatter, block -> expert.
    Programs 1.. zero-fill `zero_ptr` (the output the down kernel accumulates into)."""
    pid = tl.program_id(0)
    if pid > 0:
        offs = (pid - 1) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + offs, tl.zeros((ZERO_BLOCK,), tl.float32), mask=offs < n_zero)
        return
    bins = tl.arange(0, BINS)
    lane = tl.arange(0, CHUNK)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    for c0 in range(0, n_pairs, CHUNK):
        e = tl.load(ids_ptr + c0 + lane, mask=c0 + lane < n_pairs, other=-1)
        counts += tl.sum((e[:, None] == bins[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    for s0 in range(0, capacity, CHUNK):
        tl.store(sorted_ptr + s0 + lane, tl.full((CHUNK,), -1, tl.int32), mask=s0 + lane < capacity)
    tl.debug_barrier()  # the -1 fill is done before any pair lands
    placed = ends - padded  # next free row of each expert's segment
    for c0 in range(0, n_pairs, CHUNK):
        i = c0 + lane
        ok = i < n_pairs
        e = tl.load(ids_ptr + i, mask=ok, other=-1)
        onehot = (e[:, None] == bins[None, :]).to(tl.int32)
        earlier_same = ((e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32)
        row = tl.sum(onehot * placed[None, :], axis=1) + tl.sum(earlier_same, axis=1)
        tl.store(sorted_ptr + row, i, mask=ok)
        placed += tl.sum(onehot, axis=0)
    num_blocks = capacity // BLOCK_M
    for b0 in range(0, num_blocks, CHUNK):
        b = b0 + lane
        # experts whose (padded) segment ends at or before this block's first row come before it
        e = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(e < num_experts, e, -1), mask=b < num_blocks)


@triton.jit
def _activate(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh(x) = 2 * sigmoid(2x) - 1
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 2:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 3:
        return tl.maximum(g, 0.0)
    elif ACT == 6:
        r = tl.maximum(g, 0.0)
        return r * r
    else:  # 4: identity (5, the clamped SwiGLU, is applied by the caller)
        return g


@triton.jit
def _gate_up_epilogue(acc_g, acc_u, b_ptr, bias_base, I, cols, col_ok, alpha, beta, limit,
                      GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr):
    """Gate/up biases, then the activation: act(gate) * up, GPT-OSS's clamped SwiGLU, Inkling 2's softcapped
    SwiGLU, or act(u)."""
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + bias_base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + bias_base + I + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if ACT == 5:  # GPT-OSS clamped SwiGLU
            g = acc_g
            u = acc_u
            if CLAMP:
                g = tl.minimum(g, limit)
                u = tl.minimum(tl.maximum(u, -limit), limit)
            h = g * tl.sigmoid(alpha * g) * (u + beta)
        elif ACT == 7:  # softcapped SwiGLU (Inkling 2): alpha, limit are the gate and up caps; tanh(x) = 2 sigmoid(2x) - 1
            g_cap = alpha * (2.0 * tl.sigmoid(2.0 * acc_g / alpha) - 1.0)
            u_cap = limit * (2.0 * tl.sigmoid(2.0 * acc_u / limit) - 1.0)
            h = g_cap * tl.sigmoid(acc_g) * u_cap
        else:
            h = _activate(acc_g, ACT) * acc_u
    else:
        h = _activate(acc_g, ACT)
    return h


@triton.jit
def _tile_scale_zero(s_ptr, z_ptr, expert, cols, col_ok, k0, K, stride_we, stride_wn, group,
                     BLOCK_N: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """(scale, zero point) per column, fp32, of the quantization group holding column k0: shaped like
    expert (x) cols broadcast ([BLOCK_N], or [S, BLOCK_N] for S experts); a symmetric zero point is a
    [BLOCK_N] constant that broadcasts.

    Scales / zero points are [E, N, K / group] contiguous (N = stride_we / stride_wn); symmetric
    codes have the zero point 2^(bits-1)."""
    # int64: E * N * K / group can pass 2^31 where expert ids are int32 (TensorRT's)
    sidx = (expert.to(tl.int64) * (stride_we // stride_wn) + cols) * (K // group) + k0 // group
    scale = tl.load(s_ptr + sidx, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_ZP:
        zp = tl.load(z_ptr + sidx, mask=col_ok, other=0).to(tl.float32)
    else:
        zp = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
    return scale, zp


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, expert, cols, col_ok, k0, K, stride_we, stride_wn, group,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """W[expert, cols, k0:k0+BLOCK_K] as a [BLOCK_K, BLOCK_N] tile: float, or dequantized codes.

    Quantized tiles lie inside one quantization group (the wrapper picks BLOCK_K dividing the group
    size), so each tile needs one scale (and zero point) per column.
    """
    base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn  # E*N*K can pass 2^31
    # constexpr branches: only one is compiled (code after an early return would be compiled too)
    if BITS == 0:
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(base + ks[:, None], mask=col_ok[None, :] & (ks < K)[:, None], other=0.0)
    else:
        if BITS == 4:  # two codes a byte, the even column in the low nibble
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(base + kb[:, None], mask=col_ok[None, :] & (kb < K // 2)[:, None], other=0).to(tl.int32)
            code = tl.reshape(tl.permute(tl.join(byte & 0xF, byte >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            code = tl.load(base + ks[:, None], mask=col_ok[None, :] & (ks < K)[:, None], other=0).to(tl.int32)
        scale, zp = _tile_scale_zero(s_ptr, z_ptr, expert, cols, col_ok, k0, K, stride_we, stride_wn, group,
                                     BLOCK_N, BITS, HAS_ZP)
        w = (code.to(tl.float32) - zp[None, :]) * scale[None, :]
    return w


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, h_ptr, sorted_ptr, block_expert_ptr,
                    K, I, ROWS_PER_TOKEN, stride_we, stride_wn, stride_be, group,
                    alpha, beta, limit,
                    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                    BITS: tl.constexpr, HAS_ZP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # a block past the padded end (the grid is sized by an upper bound)
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair >= 0
    token = tl.where(valid, pair // ROWS_PER_TOKEN, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + token[:, None] * K + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        x = x.to(DOT)
        wg = _weight_tile(w_ptr, s_ptr, z_ptr, expert, cols, col_ok, k0, K, stride_we, stride_wn, group,
                          BLOCK_K, BLOCK_N, BITS, HAS_ZP)
        acc_g += tl.dot(x, wg.to(DOT), input_precision=PRECISION)
        if GATED:
            wu = _weight_tile(w_ptr, s_ptr, z_ptr, expert, cols + I, col_ok, k0, K, stride_we, stride_wn, group,
                              BLOCK_K, BLOCK_N, BITS, HAS_ZP)
            acc_u += tl.dot(x, wu.to(DOT), input_precision=PRECISION)
    out = _gate_up_epilogue(acc_g, acc_u, b_ptr, expert * stride_be, I, cols, col_ok, alpha, beta, limit,
                            GATED, ACT, HAS_BIAS, CLAMP)
    tl.store(h_ptr + rows[:, None] * I + cols[None, :], out.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, sorted_ptr, block_expert_ptr, weights_ptr,
                 I, H, TOPK, stride_we, stride_wn, stride_be, group,
                 HAS_BIAS: tl.constexpr, SCALE_OUT: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        h = tl.load(h_ptr + rows[:, None] * I + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, expert, cols, col_ok, k0, I, stride_we, stride_wn, group,
                         BLOCK_K, BLOCK_N, BITS, HAS_ZP)
        acc += tl.dot(h.to(DOT), w.to(DOT), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE_OUT:
        wt = tl.load(weights_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
    token = tl.where(valid, pair // TOPK, 0)
    tl.atomic_add(out_ptr + token[:, None] * H + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(dtype: torch.dtype):
    """(tl dtype of the dots, torch dtype of the intermediate h, tl.dot input precision)."""
    if dtype == torch.float16:
        return tl.float16, torch.float16, "tf32"  # precision only matters for fp32 inputs
    if dtype == torch.bfloat16 and not _interpreting():
        return tl.bfloat16, torch.bfloat16, "tf32"
    return tl.float32, torch.float32, "ieee"


def _block_k(block_k: int, bits: int, group: int) -> int:
    """The tile's K extent: for quantized weights, a power of two dividing the group size (one scale a tile)."""
    if not bits:
        return block_k
    while block_k > 16 and group % block_k:
        block_k //= 2
    if group % block_k:
        raise ValueError(f"quantization group of {group} columns: the kernels need groups of a multiple of 16")
    return block_k


def _weight_args(w: Weight):
    """(pointer, scales, zero points, stride_e, stride_n, group, BITS, HAS_ZP, [E, N, K])."""
    if isinstance(w, PackedExpertWeight):
        codes = w.codes.contiguous()
        scales = w.scales.contiguous().float()
        zps = w.zero_points.contiguous() if w.zero_points is not None else scales
        return (codes, scales, zps, codes.stride(0), codes.stride(1), w.group_size, w.bits,
                w.zero_points is not None, w.shape)
    w = w.contiguous()
    return w, w, w, w.stride(0), w.stride(1), 1, 0, False, tuple(w.shape)


def _bias_args(bias: Optional[torch.Tensor], stand_in: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer, row stride) of an optional [E, N] bias; absent, a stand-in pointer HAS_BIAS=False never reads."""
    if bias is None:
        return stand_in, 0
    bias = bias.contiguous()
    return bias, bias.stride(0)


def routed_rows(hidden: torch.Tensor, topk_weights: torch.Tensor, weight_on_input: bool):
    """(the rows the gate/up kernels read, how many (token, slot) pairs share a row).

    Llama4 weights the expert's input: each pair gets its own row, the token scaled by its weight.
    The interpreter computes bf16 in fp32 (its bf16 dots are wrong), so bf16 rows become fp32 there."""
    tokens, hsize = hidden.shape
    k = topk_weights.shape[1]
    x, rows_per_token = hidden.contiguous(), k
    if weight_on_input:
        x = (x.float().unsqueeze(1) * topk_weights.float().unsqueeze(-1)).reshape(tokens * k, hsize).to(hidden.dtype)
        rows_per_token = 1
    if x.dtype == torch.bfloat16 and _dot_dtype(x.dtype)[0] == tl.float32:
        x = x.float()
    return x, rows_per_token


def moe_experts_triton(hidden, topk_ids, topk_weights, w_gate_up: Weight, w_down: Weight, b_gate_up=None,
                       b_down=None, activation: str = "silu", gated: bool = True, alpha: float = 1.0,
                       beta: float = 0.0, limit: float = math.inf, weight_on_input: bool = False,
                       config: Optional[Union[TileConfig, DecodeConfig]] = None,
                       accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """moec.experts semantics (see moec/ops.py) with Triton kernels; returns [T, H] in hidden's dtype,
    or adds into `accumulate_into` (fp32 [T, H]) and returns it (the TensorRT plugin's aliased output).

    A DecodeConfig runs the decode kernels (moe_experts_decode.py) while T * k <= its max_pairs and
    the sorted kernels with `default_config` tiles above; no config picks by `default_config`."""
    tokens, hsize = hidden.shape
    k = topk_ids.shape[1]
    cfg = config or default_config(tokens * k)
    if isinstance(cfg, DecodeConfig):
        if tokens * k <= cfg.max_pairs:
            from moec.plugins.moe_experts_decode import moe_experts_decode

            return moe_experts_decode(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                                      activation, gated, alpha, beta, limit, weight_on_input, cfg, accumulate_into)
        cfg = default_config(tokens * k)
    w1, s1, z1, se1, sn1, g1, bits1, zp1, (num_experts, _, _) = _weight_args(w_gate_up)
    w2, s2, z2, se2, sn2, g2, bits2, zp2, (_, _, inter) = _weight_args(w_down)
    dot, h_dtype, precision = _dot_dtype(hidden.dtype)
    # a fresh output is zero-filled by the alignment launch; an accumulator is added into as it is
    out = accumulate_into if accumulate_into is not None else torch.empty(
        (tokens, hsize), dtype=torch.float32, device=hidden.device)
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts, cfg.block_m,
                                               zero=out if accumulate_into is None else None)
    capacity = sorted_ids.numel()
    x, rows_per_token = routed_rows(hidden, topk_weights, weight_on_input)
    h = torch.empty((capacity, inter), dtype=h_dtype, device=hidden.device)
    b1, sb1 = _bias_args(b_gate_up, out)
    b2, sb2 = _bias_args(b_down, out)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid1 = (capacity // cfg.block_m, triton.cdiv(inter, cfg.block_n))
    _gate_up_kernel[grid1](
        x, w1, s1, z1, b1, h, sorted_ids, block_expert,
        hsize, inter, rows_per_token, se1, sn1, sb1, g1,
        float(alpha), float(beta), float(limit) if math.isfinite(limit) else 0.0,
        GATED=gated, ACT=ACT_IDS[activation], HAS_BIAS=b_gate_up is not None, CLAMP=math.isfinite(limit),
        BITS=bits1, HAS_ZP=zp1, DOT=dot, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=_block_k(cfg.block_k, bits1, g1), **launch,
    )
    grid2 = (capacity // cfg.block_m, triton.cdiv(hsize, cfg.block_n))
    _down_kernel[grid2](
        h, w2, s2, z2, b2, out, sorted_ids, block_expert, topk_weights.contiguous().float().reshape(-1),
        inter, hsize, k, se2, sn2, sb2, g2,
        HAS_BIAS=b_down is not None, SCALE_OUT=not weight_on_input, BITS=bits2, HAS_ZP=zp2, DOT=dot,
        PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=_block_k(cfg.block_k, bits2, g2),
        **launch,
    )
    return out if accumulate_into is not None else out.to(hidden.dtype)

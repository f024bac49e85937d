"""The experts plugin's decode kernels: two matrix-vector launches, no sort, no atomics.

At decode (a handful of tokens) every (token, slot) pair is its own row, so the sorted path's
alignment launch, its 16-row tensor-core tiles that are one row full, the zero-fill and the final
cast buy nothing. Here:
  1. `_gate_up_rows`: program (pair, BLOCK_N columns of I) reads the pair's expert id from topk_ids
     and streams that expert's gate and up rows against the token -> h [T*k, I] (+ biases,
     activation);
  2. `_down_rows`: program (token, BLOCK_N columns of H) loads the down tiles of all the token's k
     experts in one batch of loads ([k, BLOCK_K, BLOCK_N], 16 KB per loop trip at the defaults where a
     slot-by-slot loop had 8 KB in flight: at T=1 the H / BLOCK_N programs are all there is, so each
     must keep many bytes in flight), weights and sums them in
     registers, and writes the token's output once in its final dtype (or adds into the fp32
     accumulator the TensorRT plugin aliases).
One program owns each output element and sums in a fixed order, so the result is deterministic
(the sorted path's atomic combine is not). Quantized weights are dequantized per tile as the sorted kernels do, but without
unpacking nibbles into the tile's order: the low and high nibbles meet the even and odd inputs,
and the zero point is subtracted once per column, sum((c - z) x) = sum(c x) - z sum(x).

Weight bytes are read once per pair: when tokens share an expert the rows are read again (from L2
in practice), so this path is for small pair counts (`DecodeConfig.max_pairs`); above it
moe_experts_triton falls back to the sorted kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from moec.plugins.moe_experts_triton import (
    ACT_IDS, DecodeConfig, Weight, _bias_args, _block_k, _dot_dtype, _gate_up_epilogue, _tile_scale_zero,
    _weight_args, routed_rows,
)


@triton.jit
def _rows_times_tiles(x_rows, row_ok, w_ptr, s_ptr, z_ptr, experts, cols, col_ok, k0, K, stride_we, stride_wn,
                      group, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
                      HAS_ZP: tl.constexpr):
    """For each of S rows: sum over k in [k0, k0 + BLOCK_K) of W[experts[s], cols, k] * x[s, k] -> [S, BLOCK_N].

    x_rows: [S] pointers to the rows' starts, experts: [S] ids, row_ok: [S] which rows are real. All
    S tiles are loaded at once, so S rows put S times the bytes in flight of one. Quantized tiles lie
    inside one quantization group (the wrapper picks BLOCK_K dividing it)."""
    # int64 offsets: E * N * K passes 2^31 for the largest layers (DeepSeek-V3: 256 x 4096 x 7168)
    base = w_ptr + experts.to(tl.int64)[:, None, None] * stride_we + cols[None, None, :] * stride_wn
    ok = row_ok[:, None, None] & col_ok[None, None, :]
    if BITS == 4:  # byte j holds columns 2j (low nibble) and 2j + 1 (high nibble)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kb_ok = row_ok[:, None] & (kb < K // 2)[None, :]
        byte = tl.load(base + kb[None, :, None], mask=ok & kb_ok[:, :, None], other=0).to(tl.int32)
        x_even = tl.load(x_rows[:, None] + 2 * kb[None, :], mask=kb_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows[:, None] + 2 * kb[None, :] + 1, mask=kb_ok, other=0.0).to(tl.float32)
        cx = tl.sum((byte & 0xF).to(tl.float32) * x_even[:, :, None]
                    + (byte >> 4).to(tl.float32) * x_odd[:, :, None], axis=1)
        x_sum = tl.sum(x_even, axis=1) + tl.sum(x_odd, axis=1)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = row_ok[:, None] & (ks < K)[None, :]
        w = tl.load(base + ks[None, :, None], mask=ok & k_ok[:, :, None], other=0).to(tl.float32)
        x = tl.load(x_rows[:, None] + ks[None, :], mask=k_ok, other=0.0).to(tl.float32)
        cx = tl.sum(w * x[:, :, None], axis=1)
        x_sum = tl.sum(x, axis=1)
    if BITS == 0:
        out = cx
    else:
        scale, zp = _tile_scale_zero(s_ptr, z_ptr, experts[:, None], cols[None, :], col_ok[None, :], k0, K,
                                     stride_we, stride_wn, group, BLOCK_N, BITS, HAS_ZP)
        out = (cx - zp * x_sum[:, None]) * scale
    return out


@triton.jit
def _gate_up_rows(x_ptr, ids_ptr, w_ptr, s_ptr, z_ptr, b_ptr, h_ptr,
                  K, I, ROWS_PER_TOKEN, stride_we, stride_wn, stride_be, group, alpha, beta, limit,
                  GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                  BITS: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    one = tl.arange(0, 1)  # this program's single row, as the [S] the shared helper takes
    expert = tl.load(ids_ptr + pair + one)
    x_row = x_ptr + (pair // ROWS_PER_TOKEN) * K + one
    row_ok = one == 0
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    acc_g = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc_g += _rows_times_tiles(x_row, row_ok, w_ptr, s_ptr, z_ptr, expert, cols, col_ok, k0, K, stride_we,
                                   stride_wn, group, BLOCK_K, BLOCK_N, BITS, HAS_ZP)
        if GATED:
            acc_u += _rows_times_tiles(x_row, row_ok, w_ptr, s_ptr, z_ptr, expert, cols + I, col_ok, k0, K,
                                       stride_we, stride_wn, group, BLOCK_K, BLOCK_N, BITS, HAS_ZP)
    bias_base = tl.sum(expert, axis=0) * stride_be
    h = _gate_up_epilogue(acc_g, acc_u, b_ptr, bias_base, I, cols, col_ok, alpha, beta, limit, GATED, ACT,
                          HAS_BIAS, CLAMP)
    tl.store(h_ptr + pair * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _down_rows(h_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
               I, H, TOPK, stride_we, stride_wn, stride_be, group,
               HAS_BIAS: tl.constexpr, SCALE_OUT: tl.constexpr, ACCUMULATE: tl.constexpr,
               BITS: tl.constexpr, HAS_ZP: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Program (token, BLOCK_N columns of H): all k slots' down tiles at once (SLOTS = k rounded up
    to a power of two, the extra rows masked), then one fixed-order sum over the slots."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    slots = tl.arange(0, SLOTS)
    slot_ok = slots < TOPK
    pairs = token * TOPK + slots
    experts = tl.load(ids_ptr + pairs, mask=slot_ok, other=0)
    acc = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        acc += _rows_times_tiles(h_ptr + pairs * I, slot_ok, w_ptr, s_ptr, z_ptr, experts, cols, col_ok, k0, I,
                                 stride_we, stride_wn, group, BLOCK_K, BLOCK_N, BITS, HAS_ZP)
    if HAS_BIAS:
        acc += tl.load(b_ptr + experts[:, None] * stride_be + cols[None, :],
                       mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if SCALE_OUT:
        acc = acc * tl.load(wts_ptr + pairs, mask=slot_ok, other=0.0).to(tl.float32)[:, None]
    total = tl.sum(acc, axis=0)  # the same reduction order every run: deterministic
    dst = out_ptr + token * H + cols
    if ACCUMULATE:
        total += tl.load(dst, mask=col_ok, other=0.0)
    tl.store(dst, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, planned but not run (plugins/inspect_kernels.py cross-compiles these)."""

    kernel: object  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def moe_experts_decode(hidden, topk_ids, topk_weights, w_gate_up: Weight, w_down: Weight, b_gate_up=None,
                       b_down=None, activation: str = "silu", gated: bool = True, alpha: float = 1.0,
                       beta: float = 0.0, limit: float = math.inf, weight_on_input: bool = False,
                       config: Optional[DecodeConfig] = None, accumulate_into: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """moec.experts semantics (see moec/ops.py) in two launches; [T, H] in hidden's dtype, or added
    into `accumulate_into` (fp32 [T, H]). Any pair count works; it is fast for small ones."""
    out, launches = plan_decode(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down, activation,
                                gated, alpha, beta, limit, weight_on_input, config, accumulate_into)
    for launch in launches:
        launch.run()
    return out


def plan_decode(hidden, topk_ids, topk_weights, w_gate_up: Weight, w_down: Weight, b_gate_up=None, b_down=None,
                activation: str = "silu", gated: bool = True, alpha: float = 1.0, beta: float = 0.0,
                limit: float = math.inf, weight_on_input: bool = False, config: Optional[DecodeConfig] = None,
                accumulate_into: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[Launch]]:
    """(the output tensor, the two launches that fill it), allocating but running nothing: on meta
    tensors it plans a layer of any size without memory."""
    cfg = config or DecodeConfig()
    tokens, hsize = hidden.shape
    k = topk_ids.shape[1]
    w1, s1, z1, se1, sn1, g1, bits1, zp1, _ = _weight_args(w_gate_up)
    w2, s2, z2, se2, sn2, g2, bits2, zp2, (_, _, inter) = _weight_args(w_down)
    _, h_dtype, _ = _dot_dtype(hidden.dtype)
    x, rows_per_token = routed_rows(hidden, topk_weights, weight_on_input)
    ids = topk_ids.contiguous()
    # written as contiguous rows (empty_like would keep a transposed hidden's strides)
    out = accumulate_into if accumulate_into is not None else torch.empty(
        (tokens, hsize), dtype=hidden.dtype, device=hidden.device)
    h = torch.empty((tokens * k, inter), dtype=h_dtype, device=hidden.device)
    b1, sb1 = _bias_args(b_gate_up, h)
    b2, sb2 = _bias_args(b_down, h)
    gate_up = Launch(
        _gate_up_rows, (tokens * k, triton.cdiv(inter, cfg.block_n)),
        (x, ids, w1, s1, z1, b1, h, hsize, inter, rows_per_token, se1, sn1, sb1, g1,
         float(alpha), float(beta), float(limit) if math.isfinite(limit) else 0.0),
        dict(GATED=gated, ACT=ACT_IDS[activation], HAS_BIAS=b_gate_up is not None, CLAMP=math.isfinite(limit),
             BITS=bits1, HAS_ZP=zp1, BLOCK_N=cfg.block_n, BLOCK_K=_block_k(cfg.block_k, bits1, g1)),
        cfg.num_warps, cfg.num_stages)
    down = Launch(
        _down_rows, (tokens, triton.cdiv(hsize, cfg.down_block_n)),
        (h, ids, topk_weights.contiguous(), w2, s2, z2, b2, out, inter, hsize, k, se2, sn2, sb2, g2),
        dict(HAS_BIAS=b_down is not None, SCALE_OUT=not weight_on_input, ACCUMULATE=accumulate_into is not None,
             BITS=bits2, HAS_ZP=zp2, SLOTS=triton.next_power_of_2(k), BLOCK_N=cfg.down_block_n,
             BLOCK_K=_block_k(cfg.down_block_k, bits2, g2)),
        cfg.num_warps, cfg.num_stages)
    return out, [gate_up, down]

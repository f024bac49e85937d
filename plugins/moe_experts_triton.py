"""The experts plugin's kernels, in Triton (the kernel language): grouped GEMMs over expert segments.

Algorithm (the shape TensorRT-LLM's and vLLM's fused MoE kernels take):
  1. sort the (token, slot) pairs by expert and pad each expert's segment to a multiple of BLOCK_M
     (torch side; `align_by_expert`), so every row block of the GEMMs belongs to one expert;
  2. `_gate_up_kernel`: for each row block and BLOCK_N tile of the intermediate dim, gather the
     block's token rows, multiply by that expert's gate and up rows (and biases), apply the
     activation (SiLU/GELU/ReLU gate, or GPT-OSS's clamped SwiGLU) -> h [rows, I];
  3. `_down_kernel`: h times the expert's down projection (+ bias), scaled by the routing weight ->
     y [rows, H]; rows are then summed back into their tokens (index_add).
Dots accumulate in fp32 (the interpreter's bf16 `tl.dot` is wrong; fp16/fp32 inputs are cast).
Runs on a GPU, or on CPU under TRITON_INTERPRET=1 (how the tests run it here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "identity": 4, "swiglu": 5}


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 16
    block_n: int = 32
    block_k: int = 32


# What autotuning (plugins/tensorrt_plugin.py) chooses from on a GPU.
TILE_CONFIGS = [TileConfig(16, 32, 32), TileConfig(32, 64, 32), TileConfig(64, 64, 64), TileConfig(64, 128, 64)]


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted (token*k+slot) ids padded with -1, expert of each row block, number of padded rows)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = ((counts + block_m - 1) // block_m) * block_m
    total = int(padded.sum())
    sorted_ids = torch.full((max(total, block_m),), -1, dtype=torch.int64)
    block_expert = torch.empty(max(total // block_m, 1), dtype=torch.int64)
    pos, src = 0, 0
    for e in range(num_experts):
        c, p = int(counts[e]), int(padded[e])
        sorted_ids[pos:pos + c] = order[src:src + c]
        block_expert[pos // block_m:(pos + p) // block_m] = e
        pos, src = pos + p, src + c
    return sorted_ids, block_expert, total


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
    else:
        return g


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, b_ptr, h_ptr, sorted_ptr, block_expert_ptr,
                    K, I, TOPK, stride_we, stride_wn, stride_be,
                    alpha, beta, limit,
                    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair >= 0
    token = tl.where(valid, pair // TOPK, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + token[:, None] * K + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g += tl.dot(x.to(tl.float32), wg.to(tl.float32))
        if GATED:
            wu = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None],
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_u += tl.dot(x.to(tl.float32), wu.to(tl.float32))
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + expert * stride_be + I + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if ACT == 5:  # GPT-OSS clamped SwiGLU
            g = acc_g
            u = acc_u
            if CLAMP:
                g = tl.minimum(g, limit)
                u = tl.minimum(tl.maximum(u, -limit), limit)
            out = g * tl.sigmoid(alpha * g) * (u + beta)
        else:
            out = _activate(acc_g, ACT) * acc_u
    else:
        out = _activate(acc_g, ACT)
    tl.store(h_ptr + rows[:, None] * I + cols[None, :], out, mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, b_ptr, y_ptr, sorted_ptr, block_expert_ptr, weights_ptr,
                 I, H, stride_we, stride_wn, stride_be,
                 HAS_BIAS: tl.constexpr, SCALE_OUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        h = tl.load(h_ptr + rows[:, None] * I + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(h.to(tl.float32), w.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE_OUT:
        wt = tl.load(weights_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
    tl.store(y_ptr + rows[:, None] * H + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


def moe_experts_triton(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up=None, b_down=None,
                       activation: str = "silu", gated: bool = True, alpha: float = 1.0, beta: float = 0.0,
                       limit: float = math.inf, weight_on_input: bool = False,
                       config: Optional[TileConfig] = None) -> torch.Tensor:
    """moec.experts semantics (see moec/ops.py) with Triton kernels; returns [T, H] in hidden's dtype."""
    cfg = config or TileConfig()
    tokens, hsize = hidden.shape
    k = topk_ids.shape[1]
    num_experts, rows, _ = w_gate_up.shape
    inter = w_down.shape[2]
    sorted_ids, block_expert, total = align_by_expert(topk_ids, num_experts, cfg.block_m)
    x = hidden.contiguous().float()
    if weight_on_input:  # Llama4: each (token, slot) row is the token scaled by its weight
        x = (x.unsqueeze(1) * topk_weights.float().unsqueeze(-1)).reshape(tokens * k, hsize)
        token_stride_k = 1
    else:
        token_stride_k = k
    w1, w2 = w_gate_up.contiguous(), w_down.contiguous()
    h = torch.zeros((max(total, cfg.block_m), inter), dtype=torch.float32)
    y = torch.zeros((max(total, cfg.block_m), hsize), dtype=torch.float32)
    b1 = b_gate_up.contiguous() if b_gate_up is not None else w1  # dummy pointer when absent
    b2 = b_down.contiguous() if b_down is not None else w2
    grid1 = (max(total, cfg.block_m) // cfg.block_m, triton.cdiv(inter, cfg.block_n))
    _gate_up_kernel[grid1](
        x, w1, b1, h, sorted_ids if not weight_on_input else sorted_ids, block_expert,
        hsize, inter, token_stride_k, w1.stride(0), w1.stride(1), b1.stride(0) if b_gate_up is not None else 0,
        float(alpha), float(beta), float(limit) if math.isfinite(limit) else 0.0,
        GATED=gated, ACT=ACT_IDS[activation], HAS_BIAS=b_gate_up is not None, CLAMP=math.isfinite(limit),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
    )
    grid2 = (max(total, cfg.block_m) // cfg.block_m, triton.cdiv(hsize, cfg.block_n))
    _down_kernel[grid2](
        h, w2, b2, y, sorted_ids, block_expert, topk_weights.contiguous().float().reshape(-1),
        inter, hsize, w2.stride(0), w2.stride(1), b2.stride(0) if b_down is not None else 0,
        HAS_BIAS=b_down is not None, SCALE_OUT=not weight_on_input,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
    )
    valid = sorted_ids[:total] >= 0
    pairs = sorted_ids[:total][valid]
    out = torch.zeros((tokens, hsize), dtype=torch.float32)
    out.index_add_(0, pairs // k, y[:total][valid])
    return out.to(hidden.dtype)

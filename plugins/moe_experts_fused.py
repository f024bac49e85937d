"""The experts op as ONE Triton kernel launch: what the plugin's AOT implementation embeds in engines.

TensorRT's AOT plugin path (`tensorrt.plugin.aot_impl`) takes one compiled kernel (PTX) and launches
it with (input pointers..., extra int args..., output pointers...): no Python, no host-side sort, no
second launch, no workspace. The two-kernel path (moe_experts_triton.py) needs all of those, so this
is a different formulation of the same op:

  program (e, c, b) = expert e, intermediate chunk c (BLOCK_I columns), token block b (BLOCK_T tokens)
  1. read the block's top-k ids and weights; a token's weight for e is 0 unless it routed to e;
     if no token of the block routed to e, exit (the common case: at decode, E - k experts exit);
  2. h = act(x_b @ W1[e, chunk]^T) for the routed rows (+ gate/up biases);
  3. for each BLOCK_H slice of the output: out[b, slice] += (w * h) @ W2[e, slice, chunk]^T, atomically.
     The output must hold zeros first: the plugin takes a zero-filled fp32 accumulator input and
     its output aliases it (TensorRT's I/O aliasing), so the kernel never needs a separate memset.

Every weight byte a routed expert owns is read once per token block, so at decode (one block) this
is as bandwidth-efficient as the sorted kernels with one launch instead of several. At prefill it
computes every row of a block for every expert any of its rows chose: exact, but up to E/k times the
FLOPs of the sorted kernels, which stay the JIT (Python) implementation's choice there.
Weights may be float or packed int4/int8 (`PackedExpertWeight`), dequantized inside the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl

from moec.plugins.moe_experts_triton import (
    ACT_IDS, Weight, _block_k, _dot_dtype, _gate_up_epilogue, _weight_args, _weight_tile,
)


@dataclass(frozen=True)
class FusedConfig:
    block_t: int = 16
    block_i: int = 32
    block_h: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


FUSED_CONFIGS = [FusedConfig(), FusedConfig(16, 16, 128, 128), FusedConfig(16, 32, 128, 128),
                 FusedConfig(32, 32, 128, 64), FusedConfig(64, 64, 128, 64, 8)]


@triton.jit
def _fused_experts_kernel(
    x_ptr, ids_ptr, wts_ptr, w1_ptr, w2_ptr, b1_ptr, b2_ptr, s1_ptr, z1_ptr, s2_ptr, z2_ptr, acc_ptr,
    T,
    out_ptr,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr, ROWS: tl.constexpr,
    GROUP1: tl.constexpr, GROUP2: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
    ALPHA: tl.constexpr, BETA: tl.constexpr, LIMIT: tl.constexpr, WOI: tl.constexpr,
    BITS1: tl.constexpr, ZP1: tl.constexpr, BITS2: tl.constexpr, ZP2: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K1: tl.constexpr,
):
    # Argument order is TensorRT's AOT launch order: the plugin's inputs (PLUGIN.inputs, absent ones
    # as 1-element placeholders that the constexpr flags keep unread), the extra int T, the output.
    # `acc_ptr` is the zero-filled accumulator input that `out_ptr` aliases; the kernel adds into out_ptr.
    expert = tl.program_id(0)
    chunk = tl.program_id(1)
    toks = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < T
    slots = tl.arange(0, TOPK_P2)
    pick = tok_ok[:, None] & (slots < TOPK)[None, :]
    ids = tl.load(ids_ptr + toks[:, None] * TOPK + slots[None, :], mask=pick, other=-1)
    wts = tl.load(wts_ptr + toks[:, None] * TOPK + slots[None, :], mask=pick, other=0.0).to(tl.float32)
    hit = ids == expert
    rw = tl.sum(tl.where(hit, wts, 0.0), axis=1)  # this expert's routing weight per token (0: not routed)
    routed = tl.sum(hit.to(tl.int32), axis=1) > 0
    if tl.max(routed.to(tl.int32), axis=0) == 0:
        return
    n1 = (I * ROWS) * (H * BITS1 // 8 if BITS1 else H)  # elements (bytes) per expert of W1 / W2
    n2 = H * (I * BITS2 // 8 if BITS2 else I)
    row1 = H * BITS1 // 8 if BITS1 else H
    row2 = I * BITS2 // 8 if BITS2 else I
    cols = chunk * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < I
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K1):
        ks = k0 + tl.arange(0, BLOCK_K1)
        x = tl.load(x_ptr + toks[:, None] * H + ks[None, :], mask=routed[:, None] & (ks < H)[None, :], other=0.0)
        if WOI:  # Llama4 weights the expert's input
            x = x.to(tl.float32) * rw[:, None]
        x = x.to(DOT)
        wg = _weight_tile(w1_ptr, s1_ptr, z1_ptr, expert, cols, col_ok, k0, H, n1, row1, GROUP1,
                          BLOCK_K1, BLOCK_I, BITS1, ZP1)
        acc_g += tl.dot(x, wg.to(DOT), input_precision=PRECISION)
        if GATED:
            wu = _weight_tile(w1_ptr, s1_ptr, z1_ptr, expert, cols + I, col_ok, k0, H, n1, row1, GROUP1,
                              BLOCK_K1, BLOCK_I, BITS1, ZP1)
            acc_u += tl.dot(x, wu.to(DOT), input_precision=PRECISION)
    h = _gate_up_epilogue(acc_g, acc_u, b1_ptr, expert * (ROWS * I), I, cols, col_ok, ALPHA, BETA, LIMIT,
                          GATED, ACT, HAS_BIAS, CLAMP)
    # the combine weight scales y; y is linear in h, so scale h (Llama4 weighted the input instead)
    if WOI:
        h = tl.where(routed[:, None], h, 0.0).to(DOT)
    else:
        h = tl.where(routed[:, None], h * rw[:, None], 0.0).to(DOT)
    for h0 in range(0, H, BLOCK_H):
        hc = h0 + tl.arange(0, BLOCK_H)
        hc_ok = hc < H
        w2 = _weight_tile(w2_ptr, s2_ptr, z2_ptr, expert, hc, hc_ok, chunk * BLOCK_I, I, n2, row2, GROUP2,
                          BLOCK_I, BLOCK_H, BITS2, ZP2)
        y = tl.dot(h, w2.to(DOT), input_precision=PRECISION)
        if HAS_BIAS:
            if chunk == 0:  # the down bias once per (token, expert): by chunk 0's programs
                b2 = tl.load(b2_ptr + expert * H + hc, mask=hc_ok, other=0.0).to(tl.float32)
                if WOI:
                    y += tl.where(routed, 1.0, 0.0)[:, None] * b2[None, :]
                else:
                    y += rw[:, None] * b2[None, :]
        tl.atomic_add(out_ptr + toks[:, None] * H + hc[None, :], y, mask=routed[:, None] & hc_ok[None, :])


@dataclass
class FusedLaunch:
    """Everything one launch of `_fused_experts_kernel` needs, shared by the torch wrapper and AOT."""

    constexprs: dict
    pointers: dict = field(default_factory=dict)  # kernel argument -> tensor (None: argument absent)
    grid_xy: tuple[int, int] = (1, 1)  # (experts, intermediate chunks); grid z = cdiv(T, block_t)
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpertsLayout:
    """The expert weights' shapes and quantization (from tensors, or from the plugin's fields)."""

    experts: int
    rows: int  # of w_gate_up: 2I gated, I otherwise
    hidden: int
    inter: int
    bits: int = 0  # 0: float weights
    group_gate_up: int = 1
    group_down: int = 1
    zero_points: bool = False

    @staticmethod
    def of(w_gate_up: Weight, w_down: Weight) -> "ExpertsLayout":
        _, _, _, _, _, g1, bits, zp, (e, rows, h) = _weight_args(w_gate_up)
        _, _, _, _, _, g2, _, _, (_, _, inter) = _weight_args(w_down)
        return ExpertsLayout(e, rows, h, inter, bits, g1, g2, zp)


def plan_launch(hidden_dtype: torch.dtype, layout: ExpertsLayout, top_k: int, has_bias: bool, activation: str,
                gated: bool, alpha: float, beta: float, limit: float, weight_on_input: bool,
                config: FusedConfig) -> FusedLaunch:
    bits, g1, g2 = layout.bits, layout.group_gate_up, layout.group_down
    dot, _, precision = _dot_dtype(hidden_dtype)
    block_i = config.block_i if not bits else min(config.block_i, _block_k(config.block_i, bits, g2))
    if bits == 4 and block_i < 32:
        # int4 chunks of 16 columns gave wrong sums on an H100 (Triton 3.6) though the interpreter
        # agreed with the reference; cause not found, so such chunks are not used.
        if g2 % 32:
            raise ValueError(f"int4 down-projection groups of {g2} columns: the one-launch kernel needs multiples of 32")
        block_i = 32
    c = dict(
        H=layout.hidden, I=layout.inter, TOPK=top_k, TOPK_P2=triton.next_power_of_2(top_k),
        ROWS=layout.rows // layout.inter, GROUP1=g1, GROUP2=g2, GATED=bool(gated), ACT=ACT_IDS[activation],
        HAS_BIAS=has_bias, CLAMP=math.isfinite(limit) and limit > 0, ALPHA=float(alpha), BETA=float(beta),
        LIMIT=float(limit) if math.isfinite(limit) else 0.0, WOI=bool(weight_on_input),
        BITS1=bits, ZP1=layout.zero_points, BITS2=bits, ZP2=layout.zero_points, DOT=dot, PRECISION=precision,
        BLOCK_T=config.block_t, BLOCK_I=block_i, BLOCK_H=config.block_h,
        BLOCK_K1=_block_k(config.block_k, bits, g1),
    )
    return FusedLaunch(c, grid_xy=(layout.experts, triton.cdiv(layout.inter, block_i)), num_warps=config.num_warps,
                       num_stages=config.num_stages)


def moe_experts_fused(hidden, topk_ids, topk_weights, w_gate_up: Weight, w_down: Weight, b_gate_up=None,
                      b_down=None, activation: str = "silu", gated: bool = True, alpha: float = 1.0,
                      beta: float = 0.0, limit: float = math.inf, weight_on_input: bool = False,
                      config: Optional[FusedConfig] = None, accumulator: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """moec.experts semantics in one launch; adds into `accumulator` (fp32 [T, H], zeros by default)."""
    cfg = config or FusedConfig()
    tokens, hsize = hidden.shape
    plan = plan_launch(hidden.dtype, ExpertsLayout.of(w_gate_up, w_down), topk_ids.shape[1], b_gate_up is not None,
                       activation, gated, alpha, beta, limit, weight_on_input, cfg)
    out = accumulator if accumulator is not None else torch.zeros((tokens, hsize), dtype=torch.float32,
                                                                  device=hidden.device)
    x = hidden.contiguous()
    if x.dtype == torch.bfloat16 and plan.constexprs["DOT"] == tl.float32:  # interpreter: no bf16 dots
        x = x.float()
    # absent scales / zero points / biases get stand-in pointers their constexpr flags never read
    w1, s1, z1 = _weight_args(w_gate_up)[:3]
    w2, s2, z2 = _weight_args(w_down)[:3]
    b1 = b_gate_up.contiguous() if b_gate_up is not None else out
    b2 = b_down.contiguous() if b_down is not None else out
    grid = (*plan.grid_xy, triton.cdiv(tokens, cfg.block_t))
    _fused_experts_kernel[grid](
        x, topk_ids.to(torch.int32).contiguous(), topk_weights.contiguous(), w1, w2, b1, b2, s1, z1, s2, z2,
        out, tokens, out, num_warps=plan.num_warps, num_stages=plan.num_stages, **plan.constexprs,
    )
    return out


# --- ahead-of-time compilation (what TensorRT's aot_impl hands over) ---

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
        torch.int32: "*i32"}


@dataclass(frozen=True)
class AotKernel:
    """One compiled launch: PTX plus what a launcher needs (grid z is cdiv(T, block_t) at run time)."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    grid_xy: tuple[int, int]
    block_t: int

    def grid(self, tokens: int) -> tuple[int, int, int]:
        return (*self.grid_xy, triton.cdiv(tokens, self.block_t))


def compile_aot(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, plan: FusedLaunch, block_t: int,
                capability: int = 90, bias_dtype: Optional[torch.dtype] = None) -> AotKernel:
    """PTX for `plan` on an SM `capability` GPU (cross-compiles: no GPU needed; not under TRITON_INTERPRET).

    weight_dtype is torch.uint8 for packed codes; biases default to the weights' (or hidden's) dtype."""
    from triton.backends.compiler import GPUTarget

    fdt = _PTR[hidden_dtype]
    bdt = _PTR[bias_dtype or (hidden_dtype if weight_dtype == torch.uint8 else weight_dtype)]
    wdt = _PTR[weight_dtype]
    signature = dict(x_ptr=fdt, ids_ptr="*i32", wts_ptr=fdt, w1_ptr=wdt, w2_ptr=wdt, b1_ptr=bdt, b2_ptr=bdt,
                     s1_ptr="*fp32", z1_ptr="*u8", s2_ptr="*fp32", z2_ptr="*u8", acc_ptr="*fp32", T="i32",
                     out_ptr="*fp32")
    signature.update({name: "constexpr" for name in plan.constexprs})
    src = triton.compiler.ASTSource(fn=_fused_experts_kernel, signature=signature, constexprs=plan.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages))
    if getattr(compiled.metadata, "global_scratch_size", 0):
        raise RuntimeError("the fused experts kernel needs Triton global scratch memory, which TensorRT's AOT "
                           "launch does not provide")
    return AotKernel(compiled.metadata.name, compiled.asm["ptx"], plan.num_warps, compiled.metadata.shared,
                     plan.grid_xy, block_t)

"""GPTQ for expert weights (and, with --quant-dense, the dense Linears): calibrated rounding on moec's grid.

Round-to-nearest treats every weight alone. GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") rounds a weight matrix one input column at a time and
moves each column's rounding error onto the columns not rounded yet, in proportion to the inverse second
moments H = sum x x^T of the inputs the matrix really sees — for an expert, the tokens its router sends it,
each weighted by its routing weight (the expert's output is scaled by it).

The grid is moec.quant's: the same kind of scales, zero points and codes (block scales are fixed when the
solver reaches a block's first column, from the weights as updated so far, the range clipped or not), so the
codes pack, run and verify exactly as round-to-nearest's do; only which code each weight gets, and the scales,
differ. Once the codes are chosen, each row's scales are refitted to them (`refit_scales`: the least-squares
optimum of GPTQ's own objective for those codes; zero points and codes unchanged). `gptq_quantize` runs the
solver from more than one set of scales and keeps, per row, what its objective prefers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from moec.quant import CLIP_RATIOS_2BIT, QuantError, QuantizedWeight, QuantSpec, quantize

DAMP = 0.01  # of the mean diagonal, added to H: keeps the Cholesky factor defined for rank-deficient inputs
COLUMN_BLOCK = 128  # columns updated lazily together (a multiple of every QMoE block size)
MIN_TOKENS = 32  # an expert that saw fewer calibration tokens is rounded to nearest (too few to estimate H) ...


# GPTQ's 4-bit scales are also tried with each block's range clipped to whichever of these ratios of its
# largest magnitude rounds it with the least squared error. On correlated synthetic matrices clipping alone
# lowered the output error 9-15%, but raised it on some rows of the tiny models (a clipped outlier whose input
# matters), hence the choice per row in gptq_quantize.
CLIP_RATIOS_4BIT = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))  # 0.5 .. 1.0


def clip_ranges(spec: QuantSpec) -> list[tuple[float, ...]]:
    """The block ranges GPTQ solves from, each as `quantize`'s clip ratios (() the full range): 2-bit always
    clips (its full range rounds most weights to zero; round-to-nearest's own search), 4-bit tries the full and
    the clipped range, 8-bit keeps the full range (clipping gains little where the steps are that fine)."""
    return {2: [CLIP_RATIOS_2BIT], 4: [(), CLIP_RATIOS_4BIT]}.get(spec.bits, [()])


def min_tokens(hidden: int, intermediate: int) -> int:
    """... and at least an eighth of its widest input: H is K x K, and its estimate needs tokens to match."""
    return max(MIN_TOKENS, max(hidden, intermediate) // 8)


def second_moments(x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H = sum_t (w_t x_t)(w_t x_t)^T in float64, for inputs x [T, K] and per-token weights w [T]."""
    x = x.detach().double()
    if weights is not None:
        x = x * weights.detach().double().unsqueeze(-1)
    return x.T @ x


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str) -> QuantizedWeight:
    """One matrix `weight` [N, K] with input second moments `hessian` [K, K] -> its QuantizedWeight [1, N, K].

    GPTQ rounds it from block scales set when it reaches each block (`_round_columns`), once with each block's
    full range and once with its range clipped (`clip_ranges`; 2-bit: clipped only), each row's scales are then
    refitted to its codes (`refit_scales`), and each row keeps the candidate with the lower objective
    (w - w_q)^T H (w - w_q). Clipping outliers helps most rows and hurts a few a lot (a clipped weight whose input
    matters cannot be compensated), hence the choice per row. Then GPTQ runs once more with the kept rows' scales
    held fixed (codes chosen for scales that fit codes) and, refitted, replaces a row only where it is lower
    again. Every choice is per row from products of fixed shapes, so a matrix solved a block of rows at a time
    gets the codes it gets whole."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise QuantError(f"{name}: second moments of shape {tuple(hessian.shape)} for a weight with {k} inputs.")
    group = spec.block_size or k
    if k % group:
        raise QuantError(f"{name}: block size {group} does not divide its input dimension {k}; "
                         f"choose a block size that divides {k}.")
    if not bool(torch.isfinite(hessian).all()):
        raise QuantError(f"{name}: the calibration inputs' second moments are not finite (NaN/inf activations on "
                         "the calibration data); nothing was written.")
    device = weight.device
    h = hessian.detach().to(device, torch.float64).clone()
    # Inputs the calibration never exercised: no error is spread onto their weights (H's row stays unit), so they
    # round to nearest; zeroing them, as GPTQ's reference code does, would drop weights a few tokens didn't show.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = weight.detach().to(device, torch.float32)

    best = None
    for clip in clip_ranges(spec):
        best = _closer(best, _Candidate.fit(w, h, _round_columns(w, hinv, spec, name, clip=clip), spec))
    best = _closer(best, _Candidate.fit(w, h, _round_columns(w, hinv, spec, name, fixed=(best.scales, best.zps)),
                                        spec))
    return QuantizedWeight(best.codes.T.contiguous().unsqueeze(0), best.scales.T.contiguous().unsqueeze(0),
                           None if best.zps is None else best.zps.T.contiguous().unsqueeze(0), spec)


@dataclass
class _Candidate:
    """A matrix's codes [K, N], scales and zero points [G, N] (transposed, as GPTQ builds them) and each row's
    objective (w - w_q)^T H (w - w_q) less the row's constant w^T H w [N]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zps: Optional[torch.Tensor]
    objective: torch.Tensor

    @staticmethod
    def fit(w: torch.Tensor, h: torch.Tensor, rounded: tuple, spec: QuantSpec) -> "_Candidate":
        codes, scales, zps = rounded
        scales, objective = refit_scales(w, h, codes, scales, zps, spec, with_objective=True)
        return _Candidate(codes, scales, zps, objective)


def _closer(a: Optional[_Candidate], b: _Candidate) -> _Candidate:
    """Per row, whichever of a and b has the lower objective (a where they tie)."""
    if a is None:
        return b
    take = b.objective < a.objective  # [N]
    return _Candidate(torch.where(take, b.codes, a.codes), torch.where(take, b.scales, a.scales),
                      None if a.zps is None else torch.where(take, b.zps, a.zps),
                      torch.where(take, b.objective, a.objective))


def _round_columns(w: torch.Tensor, hinv: torch.Tensor, spec: QuantSpec, name: str, clip: tuple = (),
                   fixed: Optional[tuple] = None) -> tuple:
    """GPTQ's loop over `w` [N, K]'s input columns with `hinv` (the upper Cholesky factor of H's inverse): each
    column rounded, its error spread onto the columns not rounded yet. A block's scale and zero point are set
    when the loop reaches it, from its weights as updated so far, the range clipped to the best of `clip`; or
    taken from `fixed` (scales, zero points [G, N]). Returns codes [K, N] and the scales and zero points."""
    n, k = w.shape
    group = spec.block_size or k
    device = w.device
    # Transposed, [K, N]: the column being rounded is a contiguous row, and the loop below is a thousand small
    # ops per matrix, faster on one thread than split across several (1.7-2.6x at real expert sizes).
    wt = w.T.contiguous()
    codes = torch.zeros(k, n, dtype=torch.int32, device=device)
    scales = torch.zeros(k // group, n, device=device)
    zps = None if spec.symmetric else torch.zeros(k // group, n, dtype=torch.int32, device=device)
    if fixed is not None:
        scales.copy_(fixed[0])
        if zps is not None:
            zps.copy_(fixed[1])
    elif spec.block_size is None:  # one scale per row, from the rows as they are
        grid = quantize(w.unsqueeze(0), spec, name, clip)
        scales[0] = grid.scales[0, :, 0]
        if zps is not None:
            zps[0] = grid.zero_points[0, :, 0]
    with _one_thread():
        for b0 in range(0, k, COLUMN_BLOCK):
            b1 = min(b0 + COLUMN_BLOCK, k)
            block = wt[b0:b1].clone()
            errors = torch.zeros_like(block)
            hb = hinv[b0:b1, b0:b1]
            for j in range(b1 - b0):
                i = b0 + j
                g = i // group
                if i % group == 0:  # a new block (per row: the only one): its scale and zero point
                    if spec.block_size is not None and fixed is None:  # from its weights as updated so far
                        grid = quantize(block[j:j + group].T.unsqueeze(0), spec, name, clip)
                        scales[g] = grid.scales[0, :, 0]
                        if zps is not None:
                            zps[g] = grid.zero_points[0, :, 0]
                    s = scales[g]
                    z = zps[g].float() if zps is not None else torch.full_like(s, float(1 << (spec.bits - 1)))
                col = block[j]
                q = torch.clamp(torch.round(col / s) + z, 0, spec.qmax)
                codes[i] = q.to(torch.int32)
                err = (col - (q - z) * s) / hb[j, j]
                block[j:] -= hb[j, j:].unsqueeze(1) * err.unsqueeze(0)
                errors[j] = err
            wt[b1:] -= hinv[b0:b1, b1:].T @ errors
    return codes, scales, zps


REFIT_ROWS = 64  # rows whose scales are refitted together: bounds the [rows, G, G] systems (G blocks a row)


def refit_scales(weight: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zps: Optional[torch.Tensor], spec: QuantSpec, with_objective: bool = False):
    """Each row's scales [G, N] refitted to its codes [K, N]: with the codes fixed, a row's dequantized weights
    are linear in its G block scales, so the scales minimising GPTQ's own objective, (w - w_q)^T H (w - w_q)
    for the row w [K] and the inputs' second moments H [K, K], solve a G x G least-squares system. GPTQ fixes
    a block's scale before its columns are rounded (from the weights as updated so far); refitted afterwards
    they fit the codes it chose (measured over 2048 held-out tokens on correlated tiny models: the logits' error
    lower in 17 of 18 cases, by up to 25%, most for int2 in blocks of 16). A block whose codes all sit at the
    zero point keeps its scale (it dequantizes to 0 whatever it is); a row whose solution is not positive and
    finite keeps all its scales. With `with_objective`, also each row's objective at the scales returned, less
    its constant w^T H w: s^T A s - 2 s^T b [N] (float64)."""
    k, n = codes.shape
    g = scales.shape[0]
    group = k // g
    zp = zps.to(torch.float64) if zps is not None else torch.full_like(scales, float(1 << (spec.bits - 1)),
                                                                        dtype=torch.float64)
    old = scales.to(torch.float64)
    out = scales.clone()
    objective = torch.zeros(n, dtype=torch.float64, device=codes.device)
    # Every product has the same shapes whatever rows the caller hands in (a chunk of REFIT_ROWS, zero-padded): a
    # head solved a block of rows at a time out of core gets the scales the whole matrix gets in memory, byte for
    # byte. The products in float32 (3x faster than float64; their rounding is far below the codes' error), the
    # small systems solved in float64.
    h32 = h.to(torch.float32)
    h_cols = h32.reshape(k, g, group).permute(1, 0, 2).contiguous()  # [G, K, group]: block j's columns of H
    for r0 in range(0, n, REFIT_ROWS):
        r1 = min(r0 + REFIT_ROWS, n)
        c = torch.zeros(k, REFIT_ROWS, device=codes.device)
        c[:, :r1 - r0] = (codes[:, r0:r1].to(torch.float64)
                          - zp[:, r0:r1].repeat_interleave(group, dim=0)).to(torch.float32)
        w = torch.zeros(REFIT_ROWS, k, device=codes.device)
        w[:r1 - r0] = weight[r0:r1]
        b = (c * (h32 @ w.T)).reshape(g, group, -1).sum(1).T[:r1 - r0].to(torch.float64)  # [R, G]
        # a[r, i, j] = c_i^T H_ij c_j, c_i the row's codes less zero points in block i
        through = torch.bmm(h_cols, c.reshape(g, group, -1))  # [G_j, K, R]: H's block-j columns times c_j
        a = (through * c).reshape(g, g, group, -1).sum(2).permute(2, 1, 0)[:r1 - r0].to(torch.float64)
        del through
        # a block whose codes are all at the zero point dequantizes to 0 whatever its scale: it keeps its own
        empty = torch.diagonal(a, dim1=1, dim2=2) <= 0
        solvable = a + torch.diag_embed(empty.to(a.dtype))
        fitted, info = torch.linalg.solve_ex(solvable, torch.where(empty, old[:, r0:r1].T, b))  # [R, G]
        good = (info == 0) & (torch.isfinite(fitted) & (fitted > 0)).all(dim=1)
        kept = torch.where(good.unsqueeze(1), fitted, old[:, r0:r1].T)  # [R, G]
        out[:, r0:r1] = kept.T.to(out.dtype)
        objective[r0:r1] = (torch.einsum("rg,rgh,rh->r", kept, a, kept) - 2 * (kept * b).sum(1))
    return (out, objective) if with_objective else out


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to one for the block (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def expert_activations(spec, w_gate_up: torch.Tensor, b_gate_up: Optional[torch.Tensor],
                       x: torch.Tensor) -> torch.Tensor:
    """The input of an expert's down projection for its (possibly routing-scaled) inputs x [T, H]:
    act(x W_gate_up^T + b), `spec` the layer's ExpertsSpec."""
    from moec.activations import activate

    u = x @ w_gate_up.T
    if b_gate_up is not None:
        u = u + b_gate_up
    return activate(u, spec.activation, spec.gated, spec.alpha, spec.beta, spec.limit)


@dataclass
class LayerChoice:
    """What calibration chose for one layer's expert matrices."""

    gptq: int = 0  # matrices GPTQ rounded
    nearest: int = 0  # matrices where round-to-nearest was closer on the held-out tokens
    clipped: int = 0  # ... of which rounded with the range clipped (closer there than the full range)
    few_tokens: list[int] = field(default_factory=list)  # experts with < min_tokens tokens (rounded to nearest)
    needed: int = MIN_TOKENS

    def describe(self) -> str:
        text = f"gptq on {self.gptq} of {self.gptq + self.nearest + 2 * len(self.few_tokens)} expert matrices"
        if self.nearest:
            text += f"; round-to-nearest on {self.nearest} where it was closer on held-out calibration tokens"
            if self.clipped:
                text += f" ({self.clipped} of them with the range clipped)"
        if self.few_tokens:
            text += f"; {len(self.few_tokens)} expert(s) saw fewer than {self.needed} tokens: round-to-nearest"
        return text


def _better(weight: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, fit_w, held_w, spec: QuantSpec,
            name: str, choice: LayerChoice, clipped: bool = False) -> QuantizedWeight:
    """GPTQ fitted on `fit` unless round-to-nearest is closer on the held-out tokens: with inputs whose
    features are nearly independent, GPTQ only fits the sampling noise of H (measured: 7% worse; 9-44% with
    2048 inputs and a few hundred to a few thousand tokens). With `clipped` (experts), round-to-nearest there is
    the closest on the held-out tokens of the ranges GPTQ solves from (`clip_ranges`: at 4 bits the full and the
    clipped range): where the inputs are that independent the clipped range is what helps (0.89x the full
    range's error at block 32 on Gaussian weights and inputs)."""
    solved, won = _solve(weight, fit, held, fit_w, held_w, spec, name, None, lambda q: q)
    if won:
        choice.gptq += 1
        return solved[0]
    choice.nearest += 1
    if not clipped or len(clip_ranges(spec)) == 1:
        return quantize(weight.unsqueeze(0), spec, name)
    x = held if held_w is None else held * held_w.unsqueeze(-1)
    rounded = [quantize(weight.unsqueeze(0), spec, name, clip) for clip in clip_ranges(spec)]  # the full range first
    errors = [_output_error(q, weight, x) for q in rounded]
    best = errors.index(min(errors))
    choice.clipped += best > 0
    return rounded[best]


def _output_error(q: QuantizedWeight, weight: torch.Tensor, x: torch.Tensor) -> float:
    """The squared error the rounding of `weight` [N, K] adds to its outputs on inputs x [T, K]."""
    from moec.quant import dequantize

    return float((x @ (dequantize(q)[0] - weight).T).square().sum())


def _solve(weight: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, fit_w, held_w, spec: QuantSpec, name: str,
           rows: Optional[int], keep: Callable[[QuantizedWeight], object]) -> tuple[list, bool]:
    """GPTQ's codes for `weight`, `rows` rows at a time (its rows are independent given H), each block handed to
    `keep` as it is solved; and whether they beat round-to-nearest's on the held-out tokens (summed over blocks)."""
    h = second_moments(fit, fit_w)
    x = held if held_w is None else held * held_w.unsqueeze(-1)
    solved, err = [], [0.0, 0.0]
    step = rows or weight.shape[0]
    for r0 in range(0, weight.shape[0], step):
        w = weight[r0:r0 + step]
        part = gptq_quantize(w, h, spec, name)
        for i, q in enumerate((part, quantize(w.unsqueeze(0), spec, name))):
            err[i] += _output_error(q, w, x)
        solved.append(keep(part))
        del part
    return solved, err[0] <= err[1]


def quantize_layer(fused, x: torch.Tensor, spec: QuantSpec, name: str) -> tuple[QuantizedWeight, QuantizedWeight,
                                                                              LayerChoice]:
    """A FusedMoE's experts calibrated on its inputs x [T, H] (`quantize_expert` for each, on the tokens its
    router sends it)."""
    choice = LayerChoice(needed=min_tokens(fused.spec.experts.hidden, fused.spec.experts.intermediate))
    with torch.no_grad():
        routed = route_tokens(fused, x)
        parts = [quantize_expert(fused.spec.experts, fused.w_gate_up[e],
                                 None if fused.b_gate_up is None else fused.b_gate_up[e], fused.w_down[e],
                                 routed, e, spec, name, choice) for e in range(fused.spec.experts.num_experts)]
    return _stack([p[0] for p in parts]), _stack([p[1] for p in parts]), choice


@dataclass
class Routed:
    """A layer's calibration tokens [T, H] and where its router sends them (ids and weights [T, k])."""

    flat: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor


def route_tokens(fused, x: torch.Tensor) -> Routed:
    flat = x.reshape(-1, fused.spec.experts.hidden).float()
    ids, weights, _ = fused.routing(flat)
    return Routed(flat, ids, weights)


def quantize_expert(experts_spec, w_gu: torch.Tensor, b_gu: Optional[torch.Tensor], w_down: torch.Tensor,
                    routed: Routed, e: int, spec: QuantSpec, name: str,
                    choice: LayerChoice) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Expert e's two matrices calibrated on the tokens routed to it: every 5th is held out to choose, per
    matrix, between GPTQ (fitted on the others) and round-to-nearest (at 4 bits the full or the clipped range,
    whichever is closer there); an expert with fewer than choice.needed tokens is rounded to nearest, full
    range (and listed in `choice`)."""
    rows, slot = (routed.ids == e).nonzero(as_tuple=True)
    if rows.numel() < choice.needed:
        choice.few_tokens.append(e)
        return (quantize(w_gu.unsqueeze(0), spec, f"{name}.w_gate_up[{e}]"),
                quantize(w_down.unsqueeze(0), spec, f"{name}.w_down[{e}]"))
    xe, we = routed.flat[rows], routed.weights[rows, slot].float()
    on_input = experts_spec.weight_on_input
    xin = xe * we.unsqueeze(-1) if on_input else xe
    out_w = None if on_input else we  # the expert's output is scaled by its routing weight
    h = expert_activations(experts_spec, w_gu, b_gu, xin)
    held = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    held[::5] = True

    def split(t):
        return (None, None) if t is None else (t[~held], t[held])

    (fw, hw) = split(out_w)
    return (_better(w_gu, xin[~held], xin[held], fw, hw, spec, f"{name}.w_gate_up[{e}]", choice, clipped=True),
            _better(w_down, h[~held], h[held], fw, hw, spec, f"{name}.w_down[{e}]", choice, clipped=True))


def quantize_matrix(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, name: str) -> tuple[QuantizedWeight, str]:
    """A dense Linear's weight [N, K] calibrated on its inputs x [T, K] as an expert's matrix is: every 5th token
    held out to choose between GPTQ (fitted on the others) and round-to-nearest; with fewer than min_tokens(K)
    tokens, round-to-nearest. Returns its QuantizedWeight [1, N, K] and how it was chosen (for the report)."""
    x = x.reshape(-1, x.shape[-1]).float()
    choice = LayerChoice(needed=min_tokens(x.shape[-1], 0))
    if x.shape[0] < choice.needed:
        return quantize(weight.detach().unsqueeze(0), spec, name), _too_few(x, choice)
    held = _held_out(x)
    q = _better(weight.detach(), x[~held], x[held], None, None, spec, name, choice)
    return q, "gptq" if choice.gptq else NEAREST_WON


NEAREST_WON = "round-to-nearest (closer than GPTQ on held-out calibration tokens)"


def quantize_rows(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, name: str, rows: int,
                  keep: Callable[[QuantizedWeight], object]) -> tuple[Optional[list], str]:
    """quantize_matrix for a matrix whose codes are not to be held unpacked (int32: as large as the fp32 weight;
    an output head): GPTQ solved `rows` rows at a time, each block handed to `keep` (packing it) as it is solved.
    Returns the kept blocks when GPTQ's codes are chosen, None when round-to-nearest's are (the caller rounds),
    and how they were chosen."""
    x = x.reshape(-1, x.shape[-1]).float()
    choice = LayerChoice(needed=min_tokens(x.shape[-1], 0))
    if x.shape[0] < choice.needed:
        return None, _too_few(x, choice)
    held = _held_out(x)
    solved, won = _solve(weight.detach(), x[~held], x[held], None, None, spec, name, rows, keep)
    return (solved, "gptq") if won else (None, NEAREST_WON)


def _held_out(x: torch.Tensor) -> torch.Tensor:
    held = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    held[::5] = True  # every 5th token
    return held


def _too_few(x: torch.Tensor, choice: LayerChoice) -> str:
    return f"round-to-nearest ({x.shape[0]} calibration tokens, fewer than {choice.needed})"


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    zps = None if parts[0].zero_points is None else torch.cat([p.zero_points for p in parts])
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zps, parts[0].spec)


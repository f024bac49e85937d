"""moec.gptq: GPTQ on moec's grid — what it reduces, where it equals round-to-nearest, what it reports."""

import pytest
import torch

from moec.gptq import MIN_TOKENS, gptq_quantize, min_tokens, quantize_layer, second_moments
from moec.quant import QuantizedWeight, QuantSpec, dequantize, pack, quantize

SPECS = [QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(4, None, symmetric=False), QuantSpec(2, None),
         QuantSpec(2, 16), QuantSpec(8, None)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_independent_inputs_leave_each_block_to_itself(spec):
    """With a diagonal H no column's error has anywhere to go and no block's error reaches another: each block's
    scale is the closed-form fit to its own codes (sum d c w / sum d c^2, d the damped diagonal of H, c the codes
    less the zero point), and each row does at least as well on GPTQ's objective as round-to-nearest's codes
    refitted so, with the full range and (4-bit) with the clipped range GPTQ also tries."""
    from moec.gptq import DAMP, clip_ranges

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    d = torch.rand(256, generator=torch.Generator().manual_seed(1)).double() + 0.5
    got = gptq_quantize(w, torch.diag(d), spec, "w")
    assert (got.zero_points is None) == spec.symmetric
    blocks = got.scales.shape[-1]
    dd = (d + DAMP * d.mean()).reshape(blocks, -1)
    x = w.double().reshape(1, 64, blocks, -1)

    def refit(q):
        zp = q.zero_points.double() if q.zero_points is not None else torch.full_like(q.scales.double(),
                                                                                      2.0 ** (spec.bits - 1))
        c = q.codes.double().reshape(x.shape) - zp.unsqueeze(-1)
        fitted = (dd * c * x).sum(-1) / (dd * c * c).sum(-1)
        return fitted, (dd * (c * fitted.unsqueeze(-1) - x) ** 2).sum((-1, -2))[0]  # scales, objective per row

    fitted, objective = refit(got)
    assert torch.allclose(got.scales.double(), fitted, rtol=1e-5, atol=0)
    for clip in clip_ranges(spec):
        nearest = quantize(w.unsqueeze(0), spec, "w", clip)
        assert (objective <= refit(nearest)[1] * (1 + 1e-6)).all()
        plain = (dd * (dequantize(nearest)[0].double().reshape(x.shape[1:]) - x[0]) ** 2).sum((-1, -2))
        assert objective.sum() < 0.999 * plain.sum()  # the fit moved the scales, and that paid
    pack(got)  # the same layout QMoE takes


def test_gptq_keeps_per_row_the_full_or_the_clipped_range_whichever_is_closer():
    """4-bit: GPTQ runs from each block's full range and from its clipped range; neither wins every row on these
    correlated inputs (an outlier column costs where it is clipped), and the result's objective is, row by row,
    at most the better of the two (the last pass, with the kept scales held fixed, only ever lowers it)."""
    from moec.gptq import CLIP_RATIOS_4BIT, DAMP, _Candidate, _round_columns

    g = torch.Generator().manual_seed(11)
    w = torch.randn(96, 128, generator=g)
    w[:, 5] *= 6.0
    x = torch.randn(1000, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.2 * torch.randn(1000, 128, generator=g)
    h = second_moments(x)
    spec = QuantSpec(4, 32)
    damped = h + DAMP * torch.diag(h).mean() * torch.eye(128, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True).float()

    def objective(q):
        e = dequantize(q)[0].double() - w.double()
        return torch.einsum("nk,kl,nl->n", e, damped, e)

    def alone(clip):
        c = _Candidate.fit(w, damped, _round_columns(w, hinv, spec, "w", clip=clip), spec)
        return objective(QuantizedWeight(c.codes.T.unsqueeze(0), c.scales.T.unsqueeze(0), None, spec))

    full, clipped = alone(()), alone(CLIP_RATIOS_4BIT)
    assert (full < clipped).any() and (clipped < full).any()
    got = objective(gptq_quantize(w, h, spec, "w"))
    assert (got <= torch.minimum(full, clipped) * (1 + 1e-4)).all()
    assert got.sum() < 0.99 * torch.minimum(full.sum(), clipped.sum())


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(2, 16), QuantSpec(4, None, symmetric=False)],
                         ids=lambda s: s.name)
def test_refitted_scales_are_the_least_squares_optimum_for_the_codes(spec):
    """refit_scales on fixed codes: GPTQ's objective (w - w_q)^T H (w - w_q) is lower than with the scales the
    codes were rounded with, and no small change of any one scale lowers it further (the optimum)."""
    from moec.gptq import refit_scales

    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 64, generator=g)
    x = torch.randn(400, 6, generator=g) @ torch.randn(6, 64, generator=g) + 0.1 * torch.randn(400, 64, generator=g)
    h = second_moments(x)
    q = quantize(w.unsqueeze(0), spec, "w")
    codes, zps = q.codes[0].T.contiguous(), None if q.zero_points is None else q.zero_points[0].T.contiguous()
    scales = refit_scales(w, h, codes, q.scales[0].T.contiguous(), zps, spec)

    def objective(s):
        got = dequantize(type(q)(q.codes, s.T.unsqueeze(0), q.zero_points, spec))[0].double()
        e = got - w.double()
        return float(torch.einsum("nk,kl,nl->", e, h, e))

    best = objective(scales)
    assert best < 0.9 * objective(q.scales[0].T)
    # a row whose optimum has a scale <= 0 keeps the scales it was rounded with (QMoE's scales are positive)
    refitted = [r for r in range(w.shape[0]) if not torch.equal(scales[:, r], q.scales[0, r])]
    assert len(refitted) >= w.shape[0] - 2
    for r in refitted:
        for i in range(scales.shape[0]):
            for step in (1e-3, -1e-3):
                moved = scales.clone()
                moved[i, r] *= 1 + step
                assert objective(moved) >= best * (1 - 1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_correlated_inputs_halve_the_output_error_on_held_out_tokens(spec):
    """Inputs of low effective rank (as a real model's hidden states are): fitted on 1024 tokens, measured on
    1024 others, GPTQ's output error is under half round-to-nearest's (measured 0.19-0.33x)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(128, 256, generator=g)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.1 * torch.randn(2048, 256, generator=g)
    fit, held = x[:1024], x[1024:]
    ref = held @ w.T

    def err(q):
        return float((held @ dequantize(q)[0].T - ref).norm() / ref.norm())

    solved = gptq_quantize(w, second_moments(fit), spec, "w")
    assert int(solved.codes.min()) >= 0 and int(solved.codes.max()) <= spec.qmax
    assert err(solved) < 0.5 * err(quantize(w.unsqueeze(0), spec, "w"))


def test_a_layer_reports_what_it_chose_and_experts_with_too_few_tokens():
    from moec.moe_layer import ExpertsSpec, FusedMoE, LayerSpec, RouteSpec

    torch.manual_seed(0)
    e, h, i = 4, 64, 32
    router = torch.zeros(e, h)
    router[0, 0] = router[1, 1] = router[2, 2] = 1.0  # token t goes to expert t % 3; expert 3 gets none
    spec = LayerSpec(RouteSpec("softmax", 1, False), ExpertsSpec(e, h, i, "silu", True))
    fused = FusedMoE(spec, router, None, None, torch.randn(e, 2 * i, h), torch.randn(e, h, i), None, None)
    x = torch.randn(400, h)
    x[torch.arange(400), torch.arange(400) % 3] = 20.0
    gu, down, choice = quantize_layer(fused, x, QuantSpec(4, 32), "layer")
    assert choice.few_tokens == [3] and choice.gptq + choice.nearest == 2 * 3
    assert gu.codes.shape == (e, 2 * i, h) and down.codes.shape == (e, h, i) and down.scales.shape == (e, h, 1)
    assert torch.equal(gu.codes[3:], quantize(fused.w_gate_up[3:].detach(), QuantSpec(4, 32), "x").codes)
    assert choice.needed == min_tokens(h, i) == MIN_TOKENS and f"fewer than {MIN_TOKENS}" in choice.describe()


def test_where_gptq_loses_an_int4_expert_takes_the_closer_of_the_full_and_the_clipped_range():
    """Isotropic inputs 256 wide, about 240 fitting tokens an expert: GPTQ fits H's sampling noise and loses on the
    held-out tokens, so each matrix is rounded to nearest, with the range clipped where that is closer on those
    tokens (on Gaussian weights it mostly is); int8 keeps the full range."""
    from moec.gptq import CLIP_RATIOS_4BIT
    from moec.moe_layer import ExpertsSpec, FusedMoE, LayerSpec, RouteSpec

    torch.manual_seed(0)
    e, h, i = 2, 256, 128
    spec = LayerSpec(RouteSpec("softmax", 1, False), ExpertsSpec(e, h, i, "silu", True))
    fused = FusedMoE(spec, torch.randn(e, h), None, None, torch.randn(e, 2 * i, h), torch.randn(e, h, i), None, None)
    x = torch.randn(600, h)
    gu, down, choice = quantize_layer(fused, x, QuantSpec(4, 32), "layer")
    assert choice.gptq == 0 and choice.nearest == 4 and choice.clipped >= 2
    assert f"({choice.clipped} of them with the range clipped)" in choice.describe()
    kinds = []
    for got, full in ((gu, fused.w_gate_up), (down, fused.w_down)):
        for k in range(e):
            w = full[k].detach().unsqueeze(0)
            plain, tight = quantize(w, QuantSpec(4, 32), "w"), quantize(w, QuantSpec(4, 32), "w", CLIP_RATIOS_4BIT)
            assert torch.equal(got.codes[k], plain.codes[0]) or torch.equal(got.codes[k], tight.codes[0])
            kinds.append(torch.equal(got.codes[k], tight.codes[0]) and torch.equal(got.scales[k], tight.scales[0]))
    assert sum(kinds) == choice.clipped
    _, _, eight = quantize_layer(fused, x, QuantSpec(8, None), "layer")
    assert eight.gptq == 0 and eight.clipped == 0


def test_inputs_never_seen_keep_their_weights_rounded_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(4))
    x[:, 10] = 0.0  # an input that never fired in calibration
    got = gptq_quantize(w, second_moments(x), QuantSpec(4, 32), "w")
    # rounded to nearest, not zeroed (its input's error has nowhere to go, nor does any other's reach it): within
    # a step of its block's scale (refitted after rounding, so not always within half a step), about a quarter
    # of a step on average, where zeroing would miss by the weights' own size (about 3 steps)
    miss, step = (dequantize(got)[0, :, 10] - w[:, 10]).abs(), got.scales[0, :, 0]
    assert (miss <= step).all() and miss.mean() < 0.4 * step.mean()
    assert w[:, 10].abs().mean() > 2 * step.mean()


def test_non_finite_calibration_is_named():
    from moec.quant import QuantError

    h = torch.eye(8, dtype=torch.float64)
    h[0, 0] = float("nan")
    with pytest.raises(QuantError, match="layer.w_down"):
        gptq_quantize(torch.randn(4, 8), h, QuantSpec(4, None), "layer.w_down")


def test_a_dense_matrix_takes_gptq_where_it_wins_on_held_out_tokens_and_nearest_with_few_tokens():
    from moec.gptq import quantize_matrix

    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(600, 8, generator=g) @ torch.randn(8, 64, generator=g)  # low rank: GPTQ wins
    q, method = quantize_matrix(w, x, QuantSpec(4, 32), "head.weight")
    assert method == "gptq" and q.codes.shape == (1, 32, 64)
    assert not torch.equal(q.codes, quantize(w.unsqueeze(0), QuantSpec(4, 32), "w").codes)
    q, method = quantize_matrix(w, x[:10], QuantSpec(4, 32), "head.weight")
    assert method == "round-to-nearest (10 calibration tokens, fewer than 32)"
    assert torch.equal(q.codes, quantize(w.unsqueeze(0), QuantSpec(4, 32), "w").codes)


def test_a_head_solved_in_blocks_of_rows_gets_the_codes_solved_whole(monkeypatch):
    """quantize_rows (an output head out of core): GPTQ a block of rows at a time, each block kept in MatMulNBits'
    layout as solved; its rows are independent given H, so the codes are quantize_matrix's (K under one column
    block: no cross-block update whose float order could differ), and they dequantize a chunk at a time to the
    same weight. Too few tokens: nothing kept, the reason said."""
    import numpy as np

    from moec import quant
    from moec.gptq import quantize_matrix, quantize_rows
    from moec.quant import concat_nbits, dequantize_nbits_into, nbits

    g = torch.Generator().manual_seed(6)
    w = torch.randn(40, 64, generator=g)
    x = torch.randn(600, 8, generator=g) @ torch.randn(8, 64, generator=g)  # low rank: GPTQ wins
    spec = QuantSpec(4, 32, symmetric=False)
    whole, method = quantize_matrix(w, x, spec, "lm_head.weight")
    blocks, how = quantize_rows(w, x, spec, "lm_head.weight", 16, nbits)
    assert method == how == "gptq" and len(blocks) == 3  # 16 + 16 + 8 rows
    got, want = concat_nbits(blocks), nbits(whole)
    for field in ("packed", "scales", "zero_points"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 16 * 64)  # dequantized 16 rows at a time
    assert torch.equal(dequantize_nbits_into(got, torch.empty(40, 64)), dequantize(whole)[0])
    assert quantize_rows(w, x[:10], spec, "lm_head.weight", 16, nbits) == (
        None, "round-to-nearest (10 calibration tokens, fewer than 32)")

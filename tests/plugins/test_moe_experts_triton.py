"""The experts plugin's Triton kernels == moec's reference, under TRITON_INTERPRET=1 at small shapes."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernel language is a test dependency (pip install triton)")

from moec.ops import experts_reference  # noqa: E402
from moec.numerics import compare_tensors  # noqa: E402
from moec.plugins.moe_experts_triton import TileConfig, align_by_expert, moe_experts_triton  # noqa: E402


def _case(tokens, hidden, inter, experts, k, gated, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, -1)
    rows = 2 * inter if gated else inter
    w1 = (torch.randn(experts, rows, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    b1 = (torch.randn(experts, rows, generator=g) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(experts, hidden, generator=g) * 0.1).to(dtype) if bias else None
    return x, ids, w, w1, w2, b1, b2


def _ref(x, ids, w, w1, w2, b1, b2, act, gated, alpha=1.0, beta=0.0, limit=math.inf, woi=False):
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return experts_reference(x.float(), ids, w, w1.float(), w2.float(), f(b1), f(b2), act, gated, alpha, beta,
                             limit, woi)


@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [(1, 32, 32, 4, 2), (5, 64, 48, 8, 2), (33, 32, 32, 1, 1),
                                                          (9, 64, 32, 8, 4)])
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu_tanh", True), ("relu", False), ("gelu", False)])
def test_kernels_match_reference_fp32(tokens, hidden, inter, experts, k, act, gated):
    case = _case(tokens, hidden, inter, experts, k, gated, bias=tokens % 2 == 1, dtype=torch.float32)
    got = moe_experts_triton(*case, activation=act, gated=gated)
    assert compare_tensors(_ref(*case, act, gated), got).rel_l2 < 1e-4


def test_gpt_oss_clamped_swiglu_with_biases():
    case = _case(7, 32, 32, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=3)
    x = case[0] * 4  # make the clamp bite
    case = (x,) + case[1:]
    got = moe_experts_triton(*case, activation="swiglu", gated=True, alpha=1.702, beta=1.0, limit=7.0)
    assert compare_tensors(_ref(*case, "swiglu", True, 1.702, 1.0, 7.0), got).rel_l2 < 1e-4


def test_weight_on_input_llama4():
    case = _case(6, 32, 32, 4, 1, gated=True, bias=False, dtype=torch.float32, seed=5)
    got = moe_experts_triton(*case, activation="silu", gated=True, weight_on_input=True)
    assert compare_tensors(_ref(*case, "silu", True, woi=True), got).rel_l2 < 1e-4


def test_fp16_inputs():
    case = _case(12, 64, 32, 4, 2, gated=True, bias=True, dtype=torch.float16, seed=7)
    got = moe_experts_triton(*case, activation="silu", gated=True)
    assert got.dtype == torch.float16
    assert compare_tensors(_ref(*case, "silu", True), got.float()).rel_l2 < 1e-2


@pytest.mark.parametrize("cfg", [TileConfig(16, 16, 16), TileConfig(32, 64, 32)])
def test_tile_configs_agree(cfg):
    case = _case(20, 64, 48, 4, 2, gated=True, bias=False, dtype=torch.float32, seed=9)
    got = moe_experts_triton(*case, activation="silu", gated=True, config=cfg)
    assert compare_tensors(_ref(*case, "silu", True), got).rel_l2 < 1e-4


def test_alignment_pads_each_expert_segment():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    sorted_ids, block_expert, total = align_by_expert(ids, 4, 4)
    assert total == 12 and block_expert.tolist() == [0, 1, 2]
    assert sorted_ids[:4].tolist() == [1, 4, -1, -1] and sorted_ids[8:11].tolist() == [0, 2, 5]

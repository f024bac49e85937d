"""The experts plugin's Triton kernels == moec's reference, under TRITON_INTERPRET=1 at small shapes."""

import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernel language is a test dependency (pip install triton)")

from moec.ops import experts_reference  # noqa: E402
from moec.numerics import compare_tensors  # noqa: E402
from moec.plugins.moe_experts_triton import (  # noqa: E402
    DecodeConfig, TileConfig, align_by_expert, default_config, moe_experts_triton,
)

# conftest.py: MOEC_KERNEL_TESTS_ON_GPU=1 compiles the kernels for a GPU instead of interpreting them
DEVICE = "cuda" if os.environ.get("MOEC_KERNEL_TESTS_ON_GPU") == "1" else "cpu"

# the two implementations behind moe_experts_triton: sorted grouped GEMMs, and the decode kernels
# (small K tiles so the interpreter's small shapes span several)
PATHS = [pytest.param(TileConfig(), id="sorted"), pytest.param(DecodeConfig(16, 32, 16, 32), id="decode")]


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
    return tuple(None if t is None else t.to(DEVICE) for t in (x, ids, w, w1, w2, b1, b2))


def _ref(x, ids, w, w1, w2, b1, b2, act, gated, alpha=1.0, beta=0.0, limit=math.inf, woi=False):
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return experts_reference(x.float(), ids, w, w1.float(), w2.float(), f(b1), f(b2), act, gated, alpha, beta,
                             limit, woi)


@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [(1, 32, 32, 4, 2), (5, 64, 48, 8, 2), (33, 32, 32, 1, 1),
                                                          (9, 64, 32, 8, 4), (2, 32, 32, 8, 3)])
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu_tanh", True), ("relu", False), ("gelu", False)])
@pytest.mark.parametrize("cfg", PATHS)
def test_kernels_match_reference_fp32(tokens, hidden, inter, experts, k, act, gated, cfg):
    case = _case(tokens, hidden, inter, experts, k, gated, bias=tokens % 2 == 1, dtype=torch.float32)
    got = moe_experts_triton(*case, activation=act, gated=gated, config=cfg)
    assert compare_tensors(_ref(*case, act, gated), got).rel_l2 < 1e-4


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("cfg", PATHS)
def test_squared_relu_has_its_own_kernel_branch(gated, cfg):  # Nemotron-H; not the identity fallthrough
    case = _case(5, 64, 48, 8, 2, gated, bias=True, dtype=torch.float32)
    got = moe_experts_triton(*case, activation="relu2", gated=gated, config=cfg)
    assert compare_tensors(_ref(*case, "relu2", gated), got).rel_l2 < 1e-4
    assert compare_tensors(_ref(*case, "identity", gated), got).rel_l2 > 0.1


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_top3_masks_the_padded_slot_with_quantized_weights_and_biases(bits):
    """k=3: the down kernel loads 4 slot rows at once (a power of two); the 4th must add nothing."""
    x, ids, w, w1, w2, b1, b2 = _case(2, 64, 32, 8, 3, gated=True, bias=True, dtype=torch.float32, seed=23)
    p1, p2 = _packed(w1, bits, 32, False), _packed(w2, bits, 32, False)
    got = moe_experts_triton(x, ids, w, p1, p2, b1, b2, activation="silu", gated=True,
                             config=DecodeConfig(16, 32, 16, 32))
    ref = _ref(x, ids, w, p1.dequantize(), p2.dequantize(), b1, b2, "silu", True)
    assert compare_tensors(ref, got).rel_l2 < 1e-5


@pytest.mark.parametrize("cfg", PATHS)
def test_gpt_oss_clamped_swiglu_with_biases(cfg):
    case = _case(7, 32, 32, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=3)
    x = case[0] * 4  # make the clamp bite
    case = (x,) + case[1:]
    got = moe_experts_triton(*case, activation="swiglu", gated=True, alpha=1.702, beta=1.0, limit=7.0, config=cfg)
    assert compare_tensors(_ref(*case, "swiglu", True, 1.702, 1.0, 7.0), got).rel_l2 < 1e-4


@pytest.mark.parametrize("cfg", PATHS)
def test_weight_on_input_llama4(cfg):
    case = _case(6, 32, 32, 4, 1, gated=True, bias=True, dtype=torch.float32, seed=5)
    got = moe_experts_triton(*case, activation="silu", gated=True, weight_on_input=True, config=cfg)
    assert compare_tensors(_ref(*case, "silu", True, woi=True), got).rel_l2 < 1e-4


@pytest.mark.parametrize("cfg", PATHS)
def test_fp16_inputs(cfg):
    case = _case(12, 64, 32, 4, 2, gated=True, bias=True, dtype=torch.float16, seed=7)
    got = moe_experts_triton(*case, activation="silu", gated=True, config=cfg)
    assert got.dtype == torch.float16
    assert compare_tensors(_ref(*case, "silu", True), got.float()).rel_l2 < 1e-2


@pytest.mark.parametrize("cfg", [TileConfig(16, 16, 16), TileConfig(32, 64, 32)])
def test_tile_configs_agree(cfg):
    case = _case(20, 64, 48, 4, 2, gated=True, bias=False, dtype=torch.float32, seed=9)
    got = moe_experts_triton(*case, activation="silu", gated=True, config=cfg)
    assert compare_tensors(_ref(*case, "silu", True), got).rel_l2 < 1e-4


def test_alignment_pads_each_expert_segment():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    sorted_ids, block_expert = align_by_expert(ids.to(DEVICE), 4, 4)
    # 6 pairs + at most 3 padding rows for each of min(6, 4) experts, rounded up to a block: 20 rows
    assert block_expert.tolist() == [0, 1, 2, -1, -1] and sorted_ids.numel() == 20
    assert sorted_ids[:4].tolist() == [1, 4, -1, -1] and sorted_ids[8:11].tolist() == [0, 2, 5]


@pytest.mark.parametrize("tokens,experts,k,block_m", [(1, 128, 8, 16), (37, 60, 4, 16), (64, 8, 2, 64), (300, 5, 3, 32)])
def test_alignment_kernel_equals_sort(tokens, experts, k, block_m, monkeypatch):
    """The one-program Triton alignment (decode) and the torch sort (prefill) give identical layouts."""
    import moec.plugins.moe_experts_triton as mod

    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(DEVICE)
    by_kernel = align_by_expert(ids, experts, block_m)
    monkeypatch.setattr(mod, "ALIGN_IN_ONE_PROGRAM", 0)
    by_sort = align_by_expert(ids, experts, block_m)
    assert torch.equal(by_kernel[0], by_sort[0]) and torch.equal(by_kernel[1], by_sort[1])
    rows = by_sort[0][by_sort[0] >= 0].long()
    assert sorted(rows.tolist()) == list(range(tokens * k))  # every pair exactly once
    expert_of_row = by_sort[1].long().repeat_interleave(block_m)[by_sort[0] >= 0]
    assert torch.equal(expert_of_row, ids.reshape(-1)[rows].long())  # each row sits in its expert's blocks


def _packed(w: torch.Tensor, bits: int, block, symmetric: bool):
    """moec's own quantizer (QMoE layout), re-shaped into the plugin's PackedExpertWeight."""
    from moec.plugins.moe_experts_triton import PackedExpertWeight
    from moec.quant import QuantSpec, pack, quantize

    q = quantize(w.cpu(), QuantSpec(bits, block, symmetric), "w")
    p = pack(q)
    zps = None if q.zero_points is None else q.zero_points.to(torch.uint8)
    zps = None if zps is None else zps.to(w.device)
    return PackedExpertWeight(torch.from_numpy(p.weight).to(w.device), q.scales.to(w.device), zps, bits, w.shape[2])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block,symmetric", [(16, True), (32, False), (None, True), (None, False)])
@pytest.mark.parametrize("cfg", PATHS)
def test_in_kernel_dequantization_matches_dequantized_reference(bits, block, symmetric, cfg):
    # hidden 96: per-row groups of 96 make K tiles of 32 (a tile must lie in one group), three of them
    x, ids, w, w1, w2, b1, b2 = _case(11, 96, 32, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=bits)
    p1, p2 = _packed(w1, bits, block, symmetric), _packed(w2, bits, block, symmetric)
    d1, d2 = p1.dequantize(), p2.dequantize()
    assert compare_tensors(w1, d1).rel_l2 < (0.2 if bits == 4 else 0.02)  # it is quantized, not garbage
    got = moe_experts_triton(x, ids, w, p1, p2, b1, b2, activation="silu", gated=True, config=cfg)
    ref = _ref(x, ids, w, d1, d2, b1, b2, "silu", True)
    assert compare_tensors(ref, got).rel_l2 < 1e-5


def test_packed_weight_dequantize_equals_moec_quant():
    from moec.quant import QuantSpec, dequantize, quantize

    w = torch.randn(3, 8, 64)
    for spec in (QuantSpec(4, 32, False), QuantSpec(8, None, True)):
        p = _packed(w, spec.bits, spec.block_size, spec.symmetric)
        assert torch.equal(p.dequantize(), dequantize(quantize(w, spec, "w")))


def test_packed_weight_rejects_mismatched_scales():
    from moec.plugins.moe_experts_triton import PackedExpertWeight

    with pytest.raises(ValueError, match="scales"):
        PackedExpertWeight(torch.zeros(2, 4, 16, dtype=torch.uint8), torch.ones(2, 3, 1), None, 4, 32)
    with pytest.raises(ValueError, match="bytes per row"):
        PackedExpertWeight(torch.zeros(2, 4, 16, dtype=torch.uint8), torch.ones(2, 4, 1), None, 8, 32)


# --- the one-launch formulation (the AOT plugin's kernel) ---

@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [(1, 64, 32, 4, 2), (21, 64, 48, 8, 3), (40, 32, 32, 2, 1)])
@pytest.mark.parametrize("act,gated,bias", [("silu", True, False), ("gelu", False, True), ("relu", False, False)])
def test_fused_kernel_matches_reference(tokens, hidden, inter, experts, k, act, gated, bias):
    from moec.plugins.moe_experts_fused import moe_experts_fused

    case = _case(tokens, hidden, inter, experts, k, gated, bias=bias, dtype=torch.float32, seed=tokens)
    got = moe_experts_fused(*case, activation=act, gated=gated)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    assert compare_tensors(_ref(*case, act, gated), got).rel_l2 < 1e-4


def test_fused_kernel_gpt_oss_llama4_and_accumulator():
    from moec.plugins.moe_experts_fused import FusedConfig, moe_experts_fused

    case = _case(9, 32, 32, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=11)
    case = (case[0] * 4,) + case[1:]
    got = moe_experts_fused(*case, activation="swiglu", gated=True, alpha=1.702, beta=1.0, limit=7.0)
    assert compare_tensors(_ref(*case, "swiglu", True, 1.702, 1.0, 7.0), got).rel_l2 < 1e-4
    case = _case(6, 32, 32, 4, 1, gated=True, bias=True, dtype=torch.float32, seed=5)
    start = torch.randn(6, 32).to(DEVICE)
    got = moe_experts_fused(*case, activation="silu", gated=True, weight_on_input=True,
                            config=FusedConfig(16, 16, 16, 16), accumulator=start.clone())
    assert compare_tensors(start + _ref(*case, "silu", True, woi=True), got).rel_l2 < 1e-4


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, None, False), (8, 16, False)])
def test_fused_kernel_dequantizes_inside(bits, block, symmetric):
    from moec.plugins.moe_experts_fused import moe_experts_fused

    x, ids, w, w1, w2, b1, b2 = _case(13, 64, 32, 4, 2, gated=True, bias=False, dtype=torch.float32, seed=bits)
    p1, p2 = _packed(w1, bits, block, symmetric), _packed(w2, bits, block, symmetric)
    got = moe_experts_fused(x, ids, w, p1, p2, activation="silu", gated=True)
    ref = _ref(x, ids, w, p1.dequantize(), p2.dequantize(), None, None, "silu", True)
    assert compare_tensors(ref, got).rel_l2 < 1e-5


def _aot_case(dtype, quant_bits=0):
    from moec.plugins.moe_experts_fused import ExpertsLayout, FusedConfig, plan_launch

    x, ids, w, w1, w2, _, _ = _case(5, 64, 32, 4, 2, gated=True, bias=False, dtype=dtype, seed=21)
    if quant_bits:
        w1, w2 = _packed(w1.float(), quant_bits, 32, True), _packed(w2.float(), quant_bits, 32, True)
    cfg = FusedConfig(16, 16, 32, 32)  # int4 raises BLOCK_I to 32 (see plan_launch)
    plan = plan_launch(dtype, ExpertsLayout.of(w1, w2), 2, False, "silu", True, 1.0, 0.0, math.inf, False, cfg)
    return (x, ids, w.to(dtype), w1, w2), plan, cfg


def test_aot_compiles_to_ptx_in_tensorrt_launch_order():
    """What aot_impl returns: PTX whose entry takes the plugin's inputs, the token count, the output."""
    import subprocess
    import sys

    code = (
        "import math, re, torch\n"
        "from moec.plugins.moe_experts_fused import ExpertsLayout, FusedConfig, compile_aot, plan_launch\n"
        "layout = ExpertsLayout(experts=4, rows=128, hidden=64, inter=64)\n"
        "plan = plan_launch(torch.float16, layout, 2, True, 'silu', True, 1.0, 0.0, math.inf, False, FusedConfig())\n"
        "k = compile_aot(torch.float16, torch.float16, plan, 16)\n"
        "print(k.name, k.grid_xy, k.num_warps)\n"
        "entry = re.search(r'\\.entry (\\w+)\\((.*?)\\)', k.ptx, re.S)\n"
        "params = re.findall(r'\\.param \\.(\\w+)', entry.group(2))\n"
        "print(entry.group(1), ' '.join(params))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first.split()[0] == "_fused_experts_kernel" and "(4, 2)" in first  # E x I/BLOCK_I chunks
    name, *params = second.split()
    assert name == "_fused_experts_kernel"
    # 12 input pointers, T (u32), the output pointer; Triton may append its own scratch pointers
    assert params[:14] == ["u64"] * 12 + ["u32", "u64"], params
    assert all(p == "u64" for p in params[14:]) and len(params) <= 16


@pytest.mark.skipif(DEVICE != "cuda", reason="launching the AOT PTX needs a CUDA GPU (MOEC_KERNEL_TESTS_ON_GPU=1)")
@pytest.mark.parametrize("dtype,bits", [(torch.float16, 0), (torch.bfloat16, 0), (torch.float16, 4)])
def test_aot_ptx_launched_like_tensorrt_matches_reference(dtype, bits):
    """Load the PTX with the CUDA driver and launch it with exactly TensorRT's argument list."""
    cp = pytest.importorskip("cupy", reason="cupy loads the PTX module")
    import tempfile

    from moec.plugins.moe_experts_fused import compile_aot

    (x, ids, w, w1, w2), plan, cfg = _aot_case(dtype, bits)
    cap = torch.cuda.get_device_capability()
    kernel = compile_aot(dtype, torch.uint8 if bits else dtype, plan, cfg.block_t, cap[0] * 10 + cap[1])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.ptx)
    fn = cp.RawModule(path=f.name).get_function(kernel.name)
    placeholder = torch.zeros(1, dtype=torch.float32, device="cuda")
    acc = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
    if bits:
        weights = [w1.codes, w2.codes, placeholder, placeholder, w1.scales.float(), placeholder.to(torch.uint8),
                   w2.scales.float(), placeholder.to(torch.uint8)]
    else:
        weights = [w1, w2, placeholder, placeholder, placeholder, placeholder, placeholder, placeholder]
    inputs = [x, ids.to(torch.int32), w] + [t.contiguous() for t in weights] + [acc]
    args = [cp.uint64(t.data_ptr()) for t in inputs] + [cp.int32(x.shape[0]), cp.uint64(acc.data_ptr()),
                                                        cp.uint64(0), cp.uint64(0)]
    fn(kernel.grid(x.shape[0]), (kernel.num_warps * 32, 1, 1), tuple(args), shared_mem=kernel.shared_mem)
    torch.cuda.synchronize()
    dq = (w1, w2) if not bits else (w1.dequantize(), w2.dequantize())
    ref = _ref(x, ids, w.float(), dq[0], dq[1], None, None, "silu", True)
    assert compare_tensors(ref, acc).rel_l2 < 1e-2


def test_fused_kernel_refuses_int4_groups_of_16():
    from moec.plugins.moe_experts_fused import moe_experts_fused

    x, ids, w, w1, w2, _, _ = _case(3, 64, 32, 4, 2, gated=True, bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiples of 32"):
        moe_experts_fused(x, ids, w, _packed(w1, 4, 16, True), _packed(w2, 4, 16, True))


@pytest.mark.parametrize("cfg", PATHS)
def test_kernels_add_into_an_accumulator(cfg):
    case = _case(7, 32, 32, 4, 2, gated=True, bias=False, dtype=torch.float32, seed=2)
    start = torch.randn(7, 32).to(DEVICE)
    got = moe_experts_triton(*case, activation="silu", gated=True, accumulate_into=start.clone(), config=cfg)
    assert compare_tensors(start + _ref(*case, "silu", True), got).rel_l2 < 1e-4


def test_decode_config_runs_the_decode_kernels_up_to_max_pairs_only(monkeypatch):
    import moec.plugins.moe_experts_decode as decode

    calls = []
    real = decode.moe_experts_decode
    monkeypatch.setattr(decode, "moe_experts_decode", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    cfg = DecodeConfig(16, 32, 16, 32, max_pairs=8)
    for tokens in (4, 5):  # 8 pairs: decode; 10 pairs: the sorted kernels
        case = _case(tokens, 32, 32, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=tokens)
        got = moe_experts_triton(*case, activation="silu", gated=True, config=cfg)
        assert compare_tensors(_ref(*case, "silu", True), got).rel_l2 < 1e-4
    assert calls == [(4, 32)]


@pytest.mark.parametrize("cfg", PATHS)
def test_partial_column_and_k_tiles(cfg):
    """H=40, I=24: the last column tile of both kernels and the last K tile are partly masked."""
    case = _case(3, 40, 24, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=17)
    got = moe_experts_triton(*case, activation="silu", gated=True, config=cfg)
    assert compare_tensors(_ref(*case, "silu", True), got).rel_l2 < 1e-5


@pytest.mark.parametrize("cfg", [TileConfig(), DecodeConfig(32, 32, 32, 32)], ids=["sorted", "decode"])
def test_partial_column_tiles_quantized(cfg):
    """int4 groups must be multiples of 16 columns, so H=I=48 with 32-wide column tiles: the last is half empty."""
    x, ids, w, w1, w2, b1, b2 = _case(3, 48, 48, 4, 2, gated=True, bias=True, dtype=torch.float32, seed=17)
    p1, p2 = _packed(w1, 4, None, False), _packed(w2, 4, 16, True)
    got = moe_experts_triton(x, ids, w, p1, p2, b1, b2, activation="silu", gated=True, config=cfg)
    ref = _ref(x, ids, w, p1.dequantize(), p2.dequantize(), b1, b2, "silu", True)
    assert compare_tensors(ref, got).rel_l2 < 1e-5


def test_decode_output_is_contiguous_for_a_transposed_input():
    x, ids, w, w1, w2, b1, b2 = _case(5, 32, 32, 4, 2, gated=True, bias=False, dtype=torch.float32, seed=19)
    xt = x.t().contiguous().t()  # same values, column-major strides
    got = moe_experts_triton(xt, ids, w, w1, w2, activation="silu", gated=True, config=DecodeConfig(16, 32, 16, 32))
    assert got.is_contiguous()
    assert compare_tensors(_ref(x, ids, w, w1, w2, None, None, "silu", True), got).rel_l2 < 1e-4


def test_decode_kernels_are_deterministic():
    """One program owns each output element and sums the slots in order (no atomics)."""
    case = _case(3, 64, 32, 8, 4, gated=True, bias=True, dtype=torch.float32, seed=13)
    runs = [moe_experts_triton(*case, activation="silu", gated=True, config=DecodeConfig(16, 32, 16, 32))
            for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_default_config_by_pair_count():
    assert default_config(8).block_m == 16 and default_config(512 * 8).block_m == 64
    assert default_config(4096 * 8).block_m == 128


@pytest.mark.parametrize("one_program", [True, False])
def test_alignment_zero_fills_the_output_buffer(one_program, monkeypatch):
    import moec.plugins.moe_experts_triton as mod

    if not one_program:
        monkeypatch.setattr(mod, "ALIGN_IN_ONE_PROGRAM", 0)
    ids = torch.tensor([[1, 0], [2, 1], [0, 3]]).to(DEVICE)
    buf = torch.full((3, mod.ZERO_BLOCK + 5), 7.0).to(DEVICE)  # spans two zeroing programs
    align_by_expert(ids, 4, 16, zero=buf)
    assert not buf.any()


@pytest.mark.parametrize("cfg", PATHS)
def test_softcapped_swiglu_has_its_own_kernel_branch(cfg):  # Inkling 2: caps on the gate and up factors
    case = _case(5, 64, 48, 8, 2, True, bias=True, dtype=torch.float32)
    got = moe_experts_triton(*case, activation="swiglu_softcap", gated=True, alpha=0.5, limit=0.3, config=cfg)
    want = _ref(*case, "swiglu_softcap", True, alpha=0.5, limit=0.3)
    assert compare_tensors(want, got).rel_l2 < 1e-4
    assert compare_tensors(_ref(*case, "silu", True), got).rel_l2 > 0.1  # the caps bite at these sizes

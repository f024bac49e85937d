"""rewrite_selective_scan: Mamba's selective scan (transformers' Jamba, Mamba ...) captures with a dynamic seq as
one scan op, computing what the Python loop computes bit for bit; calls it does not know go to the original."""

import pytest
import torch
import transformers
from transformers.models.mamba import modeling_mamba

from moec.demo import randomize_
from moec.export_onnx import capture
from moec.pipeline import CompileOptions, compile
from moec.rewrite_selective_scan import FUNCTION, scan_selective, selective_scan_as_scan_op
from moec.sources import causal_lm_source


def _jamba():
    cfg = transformers.JambaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4,
        max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(cfg).eval()
    randomize_(model, 0)
    return model


@pytest.mark.slow
def test_jamba_compiles_exactly_with_a_dynamic_seq(tmp_path):
    src = causal_lm_source(_jamba(), "test:jamba")
    report = compile(src.module, src.example_args, src.dynamic_shapes,
                     options=CompileOptions(out=str(tmp_path / "a"))).report
    rows = report["numerics"]["inputs"]
    assert len({r["input"] for r in rows}) >= 2 and max(float(r["rel_l2"]) for r in rows) <= 1e-4
    assert any(n.startswith("rewrite_selective_scan:") for n in report["capture"]["notes"])
    assert report["moe_layers"]["layers"] and all(layer["fused"] for layer in report["moe_layers"]["layers"])


def test_the_program_runs_at_other_shapes_as_eager_does():
    src = causal_lm_source(_jamba(), "test:jamba")
    program = capture(src.module, src.example_args, src.dynamic_shapes).program
    assert sum(n.target is torch.ops.higher_order.scan for n in program.graph.nodes) == 2  # one per Mamba layer
    for shape in [(2, 8), (1, 13), (3, 2)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(program.module()(ids), src.module(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_optional", [True, False])
def test_scan_is_the_loop_bit_for_bit(dtype, with_optional):
    g = torch.Generator().manual_seed(0)
    batch, channels, state, seq = 2, 6, 4, 9
    u, dt, z = (torch.randn(batch, channels, seq, generator=g).to(dtype) for _ in range(3))
    A = -torch.rand(channels, state, generator=g) * 4
    B, C = (torch.randn(batch, state, seq, generator=g).to(dtype) for _ in range(2))
    D, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    extra = dict(D=D, z=z, delta_bias=bias, delta_softplus=True) if with_optional else dict(delta_softplus=False)
    if not with_optional:
        dt = dt.abs()  # a decay below 1, as softplus makes it
    loop = modeling_mamba.mamba_selective_scan(u, dt, A, B, C, return_last_state=True, **extra)
    scan = scan_selective(u, dt, A, B, C, return_last_state=True, **extra)
    for a, b in zip(loop, scan):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_unknown_arguments_go_to_the_original_and_it_is_put_back():
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4, max_position_embeddings=64))
    original = getattr(modeling_mamba, FUNCTION)
    calls = []
    setattr(modeling_mamba, FUNCTION, lambda *args, **kwargs: calls.append(sorted(kwargs)))
    try:
        with selective_scan_as_scan_op(model) as replaced:
            assert replaced == ["transformers.models.mamba.modeling_mamba"]
            x = torch.zeros(1, 2, 3)
            getattr(modeling_mamba, FUNCTION)(x, x, torch.zeros(2, 1), x[:, :1], x[:, :1], cu_seqlens=x)
        assert calls == [["D", "cu_seqlens", "delta_bias", "delta_softplus", "return_last_state", "z"]]
    finally:
        setattr(modeling_mamba, FUNCTION, original)
    with pytest.raises(RuntimeError):
        with selective_scan_as_scan_op(model):
            raise RuntimeError("capture failed")
    assert getattr(modeling_mamba, FUNCTION) is original

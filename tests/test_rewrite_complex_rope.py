"""rewrite_complex_rope: rotary embeddings written with complex numbers (transformers' DeepSeek-V2 and Llama 4)
convert to ONNX as real (real, imaginary) pairs, within rounding of eager; what it cannot rewrite it leaves."""

import pytest
import torch
import transformers
from torch import nn

from moec.demo import randomize_
from moec.errors import UnsupportedOpError
from moec.export_onnx import capture, to_onnx
from moec.pipeline import CompileOptions, compile
from moec.rewrite_complex_rope import rewrite_complex_rope
from moec.sources import causal_lm_source


def _deepseek_v2():
    cfg = transformers.DeepseekV2Config(
        vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(cfg).eval()
    randomize_(model, 0)
    return model


def _complex_nodes(program):
    return [n for n in program.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype.is_complex]


def test_deepseek_v2_compiles_exactly(tmp_path):
    src = causal_lm_source(_deepseek_v2(), "test:deepseek_v2")
    report = compile(src.module, src.example_args, src.dynamic_shapes,
                     options=CompileOptions(out=str(tmp_path / "a"))).report
    rows = report["numerics"]["inputs"]
    assert len(rows) >= 2 and max(float(r["rel_l2"]) for r in rows) <= 1e-4
    assert any(n.startswith("rewrite_complex_rope:") for n in report["capture"]["notes"])
    assert report["moe_layers"]["layers"] and all(layer["fused"] for layer in report["moe_layers"]["layers"])


class ComplexRope(nn.Module):
    """The idiom: a rotation built with polar and scaled, moved to [1, seq, 1, d/2], applied to pairs of x."""

    def __init__(self, dim=8):
        super().__init__()
        self.inv_freq = nn.Buffer(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, x):  # [batch, seq, heads, dim]
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
        rot = torch.polar(torch.ones_like(angles), angles) * 0.5
        rot = rot.unsqueeze(0).unsqueeze(-2).transpose(-4, 1).transpose(0, 1)  # dims from the end move too
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rot * torch.ones(1)).flatten(3)


def test_program_has_no_complex_values_and_computes_the_same():
    x = torch.randn(2, 5, 3, 8)
    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=64)},)
    program = capture(ComplexRope().eval(), (x,), dyn).program
    expected = len(_complex_nodes(program))
    assert expected and rewrite_complex_rope(program) == expected
    assert not _complex_nodes(program)
    for shape in [(2, 5, 3, 8), (1, 9, 3, 8)]:
        y = torch.randn(shape)
        torch.testing.assert_close(program.module()(y), ComplexRope()(y), rtol=1e-6, atol=1e-6)


class ComplexOut(nn.Module):
    def forward(self, x):
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)).unsqueeze(0)


def test_complex_output_is_left_and_the_error_says_why():
    captured = capture(ComplexOut(), (torch.randn(2, 4),), None)
    before = [n.format_node() for n in captured.program.graph.nodes]
    assert rewrite_complex_rope(captured.program) == 0
    assert [n.format_node() for n in captured.program.graph.nodes] == before
    with pytest.raises(UnsupportedOpError, match="rewrite_complex_rope left the complex values"):
        to_onnx(captured, ["x"], ["y"])

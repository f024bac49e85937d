"""moec plan: a model's structure from config.json alone — what it recognises is what compile fuses, the
weights are counted exactly, nothing real-sized is allocated, and bad input is named."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moec.demo import randomize_
from moec.miniature import read_config
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import FuseMoE
from moec.plan_model import plan_model
from moec.sources import causal_lm_source
from moec.zoo import build_hf_model

ENV = dict(os.environ, OMP_WAIT_POLICY="passive", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def _config_dir(tmp_path, family: str, **overrides) -> str:
    model = build_hf_model(family, **overrides)
    model.config.architectures = [type(model).__name__]
    d = tmp_path / family
    model.config.save_pretrained(str(d))
    return str(d)


def _fused_specs(config_dir: str) -> dict:
    """What compile's fuse_moe finds on the real model (random weights) of the same config."""
    hf = read_config(config_dir)
    torch.manual_seed(0)
    model = hf.model_class(hf.config).eval()
    randomize_(model, 0)
    src = causal_lm_source(model, "test")
    _, records = PassManager([FuseMoE()], validate=True).run(
        src.module, PassContext(probes=[src.example_args, src.make_inputs(7, seq_len=5, batch=1)]))
    return {o.path.removeprefix("model."): o.spec for o in records[0].layers}, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family, overrides, lowered", [
    # more experts than the miniature keeps, grouped routing with a selection bias, a dense first layer
    ("deepseek_v3", dict(n_routed_experts=48, num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=5),
     "com.microsoft.MoE"),
    ("qwen3_moe", dict(num_experts=40, num_hidden_layers=3), "com.microsoft.MoE"),
    ("gpt_oss", dict(num_local_experts=24), "com.microsoft.MoE"),  # biased experts, clamped SwiGLU
    # routing weights on the expert input: ORT's MoE can't, so the exact dense form, built on meta too
    ("llama4", dict(num_local_experts=12), "dense ONNX ops"),
])
def test_plan_recognises_what_compile_fuses(tmp_path, family, overrides, lowered):
    d = _config_dir(tmp_path, family, **overrides)
    plan = plan_model(d, task="logits")
    specs, params = _fused_specs(d)
    assert plan.parameters == params
    assert {l.path: l.spec for l in plan.layers} == specs  # same layers, same semantics, real sizes
    assert plan.layers and all(l.fused and l.lowered_to.startswith(lowered) for l in plan.layers)
    # the routed experts' bytes: every fused layer's gate/up and down at fp32
    fp32 = next(w for w in plan.weights if w.precision == "fp32")
    x = [l.spec.experts for l in plan.layers]
    assert fp32.experts == sum(e.num_experts * e.hidden * e.intermediate * (3 if e.gated else 2) * 4 for e in x)
    assert fp32.total == params * 4


def test_plan_of_a_decoder_has_its_cache_dims_and_attention(tmp_path):
    d = _config_dir(tmp_path, "qwen3_moe")
    plan = plan_model(d, max_shape={"batch": 2, "seq": 64, "past": 64})
    assert plan.task == "text-generation"
    top = plan.memory.profiles["max"]
    assert top.dims == {"batch": 2, "past": 64, "seq": 64}
    cfg = read_config(d).config
    # the largest activation is an attention-score tensor [batch, heads, seq, past + seq], fp32
    assert max(top.sizes.values()) == 2 * cfg.num_attention_heads * 64 * 128 * 4
    assert top.lower_bound_bytes <= top.arena_bytes <= 1.1 * top.lower_bound_bytes


def test_cli_plans_a_model_too_big_to_hold_in_bounded_memory(tmp_path):
    """DeepSeek-V3's real widths (256 experts of 7168x2048, 128 heads) at 4 layers: 60 GB of fp32 weights,
    planned by a child process whose resident memory stays far below that."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(num_hidden_layers=4)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.save_pretrained(str(tmp_path / "ds"))
    peak = tmp_path / "peak"
    child = ("import resource, sys; from moec.cli import main; rc = main(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", child, str(peak), "plan", str(tmp_path / "ds"), "--json", "--quiet",
                          "--max-shape", "batch=1,seq=1024,past=1024", "--device-memory", "80GiB"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    fp32 = next(w for w in plan["weights"] if w["precision"] == "fp32")
    assert fp32["total_bytes"] > 50e9
    assert plan["moe_layers"]["found"] == plan["moe_layers"]["fused"] == 1  # first_k_dense_replace = 3
    assert int(peak.read_text()) * 1024 < 3e9  # KiB
    placed = {p["precision"]: p for p in plan["placement"]}
    assert placed["int4"]["devices"] == 1 and placed["fp32"]["devices"] >= 1
    covered = [e for s in placed["fp32"]["shares"] for e in range(s["experts"][0], s["experts"][1] + 1)]
    assert covered == list(range(256))


def test_cli_names_a_missing_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moec.cli", "plan", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, env=ENV)
    assert out.returncode == 3 and "nowhere" in out.stderr and "config.json" in out.stderr


def test_a_config_moec_cannot_shrink_is_refused_not_materialised(tmp_path, monkeypatch):
    import moec.plan_model as plan_mod
    from moec.errors import SourceError

    d = _config_dir(tmp_path, "qwen3_moe")
    monkeypatch.setattr(plan_mod, "MINIATURE_MAX_PARAMETERS", 1000)  # as if its widths hid under unknown keys
    with pytest.raises(SourceError, match="cannot shrink this Qwen3MoeForCausalLM config"):
        plan_model(d)


def test_max_shape_naming_a_dim_the_model_lacks_is_refused(tmp_path):
    from moec.errors import MoecError

    d = _config_dir(tmp_path, "qwen3_moe")
    with pytest.raises(MoecError, match=r"bogus") as err:
        plan_model(d, task="logits", max_shape={"bogus": 3})
    assert err.value.exit_code == 2 and "seq" in str(err.value)

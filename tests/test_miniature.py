"""moec.miniature: config.json as users have it, and miniatures that keep what recognition reads."""

import json

import pytest

from moec.errors import SourceError
from moec.miniature import keep_each_kind, miniature, read_config


def _write(path, cfg: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


DEEPSEEK = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=256,
                intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=7, num_attention_heads=8,
                num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=3,
                first_k_dense_replace=2, routed_scaling_factor=2.5, n_shared_experts=1, vocab_size=1000,
                kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)


def test_unknown_model_type_is_read_through_its_architectures(tmp_path):
    d = _write(tmp_path / "kimi", {**DEEPSEEK, "model_type": "kimi_k2",
                                   "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
                                   "quantization_config": {"quant_method": "fp8"}})
    hf = read_config(d)
    assert hf.model_class.__name__ == "DeepseekV3ForCausalLM"
    assert hf.config.n_routed_experts == 64 and hf.config.num_hidden_layers == 7
    assert any("kimi_k2" in n for n in hf.notes) and any("fp8" in n for n in hf.notes)
    assert read_config(d + "/config.json").config.hidden_size == 256  # the file itself works too


def test_miniature_keeps_routing_and_each_kind_of_layer(tmp_path):
    cfg = read_config(_write(tmp_path / "ds", DEEPSEEK)).config
    mini = miniature(cfg)
    # routing as the full config has it; experts: within each of the 8 groups, twice the top-k share of 3 groups
    assert (mini.num_experts_per_tok, mini.n_group, mini.topk_group, mini.routed_scaling_factor) == (6, 8, 3, 2.5)
    assert mini.n_routed_experts % 8 == 0 and mini.n_routed_experts // 8 * 3 >= 2 * 6
    assert mini.n_routed_experts <= cfg.n_routed_experts
    # dense then sparse layers both survive, widths are tiny
    assert mini.num_hidden_layers == 4 and mini.first_k_dense_replace == 1
    assert mini.hidden_size == 64 and mini.vocab_size == 256


@pytest.mark.parametrize("cfg, needle", [
    (None, "no config.json"),
    ("{not json", "not valid JSON"),
    ({"model_type": "nonesuch", "architectures": ["NoSuchForCausalLM"]}, "remote code"),
    ({**DEEPSEEK, "hidden_size": "wide"}, "does not make a DeepseekV3Config"),
])
def test_bad_configs_are_named(tmp_path, cfg, needle):
    d = tmp_path / "m"
    d.mkdir()
    if cfg is not None:
        (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    with pytest.raises(SourceError, match=needle) as err:
        read_config(str(d))
    assert str(d) in str(err.value)


def test_shrunk_layer_lists_keep_each_kind_of_layer():
    assert keep_each_kind(["dense"] * 3 + ["sparse"] * 58, 2) == ["dense", "sparse"]  # DeepSeek-V3.2 was all dense
    assert keep_each_kind(["sparse", "dense", "sparse"], 2) == ["sparse", "dense"]
    assert keep_each_kind(["a", "b", "c"], 2) == ["a", "b"]  # more kinds than layers: the head
    assert keep_each_kind(["dense"] * 4, 2) == ["dense", "dense"]


def test_saved_configs_derived_keys_are_recomputed_not_kept(tmp_path):
    """save_pretrained writes derived keys (LongCat-Flash's qk_head_dim = nope + rope); a miniature that kept
    192 beside its tiny 8 + 8 would not run."""
    from transformers import LongcatFlashConfig

    cfg = LongcatFlashConfig()
    cfg.architectures = ["LongcatFlashForCausalLM"]
    cfg.save_pretrained(str(tmp_path / "lc"))
    hf = read_config(str(tmp_path / "lc"))
    mini = miniature(hf.config)
    assert mini.qk_head_dim == mini.qk_nope_head_dim + mini.qk_rope_head_dim == 16
    hf.model_class(mini)  # builds


def test_per_layer_lists_group_keys_and_special_floats(tmp_path):
    from transformers import GptOssConfig

    gpt = read_config(_write(tmp_path / "g", {**GptOssConfig(num_hidden_layers=24).to_dict(),
                                              "architectures": ["GptOssForCausalLM"]})).config
    assert len(gpt.layer_types) == 24
    mini = miniature(gpt)
    assert mini.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    # a family's own name for expert groups (Bailing's num_expert_group) keeps groups of >= 2 experts
    bailing = read_config(_write(tmp_path / "b", {**DEEPSEEK, "n_group": 1, "num_expert_group": 8})).config
    assert miniature(bailing).n_routed_experts == 32  # 8 groups x max(2, 2 * 6 / 3); without the key: 12
    # transformers writes infinities as {"__float__": "Infinity"}
    d = _write(tmp_path / "f", {**DEEPSEEK, "custom_limit": [0.0, {"__float__": "Infinity"}]})
    assert read_config(d).config.custom_limit == [0.0, float("inf")]


def test_aliased_and_nested_keys_are_shrunk_too():
    """DBRX keeps its width under d_model (attribute_map) and its experts in a nested ffn_config."""
    from transformers import DbrxConfig

    cfg = DbrxConfig(d_model=6144, n_layers=40, n_heads=48, attn_config={"kv_n_heads": 8},
                     ffn_config={"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4, "hidden_size": 6144})
    mini = miniature(cfg)
    assert (mini.d_model, mini.n_layers, mini.n_heads, mini.attn_config.kv_n_heads) == (64, 4, 4, 2)
    f = mini.ffn_config
    assert (f.hidden_size, f.ffn_hidden_size, f.moe_num_experts, f.moe_top_k) == (64, 96, 8, 4)

"""Experts read one at a time: which checkpoint tensors are an expert's, which layers can be streamed so."""

import torch

from moec import zoo
from moec.passes.fuse_moe import analyze
from moec.passes.layers import LayerCall
from moec.stream_experts import LazyStack, expert_index, runs_expert_by_expert


def test_only_an_integer_after_an_experts_component_is_an_expert_index():
    assert expert_index("model.layers.3.mlp.experts.5.up_proj.weight") == 5
    assert expert_index("model.layers.12.block_sparse_moe.experts.7.w1.weight") == 7
    assert expert_index("model.layers.3.mlp.shared_experts.gate_proj.weight") is None
    assert expert_index("model.layers.3.mlps.1.up_proj.weight") is None  # LongCat-Flash's two MLPs
    assert expert_index("model.layers.3.self_attn.0.q_proj.weight") is None
    assert expert_index("model.layers.3.mlp.experts.gate_up_proj") is None  # stored stacked
    assert expert_index("model.embed_tokens.weight") is None


def _moe_layer(family):
    model = zoo.build_hf_model(family).eval()
    for name, mod in model.named_modules():
        anatomy = analyze(mod)
        if anatomy is not None and not isinstance(anatomy, str):
            return mod, anatomy
    raise AssertionError(f"no MoE layer in {family}")


def test_transformers_eager_experts_run_one_expert_at_a_time_and_llama4s_bmm_does_not():
    for family in ("qwen3_moe", "gpt_oss", "granitemoe"):
        layer, anatomy = _moe_layer(family)
        before = {n: p.clone() for n, p in layer.named_parameters()}
        assert runs_expert_by_expert(layer, anatomy.source.stacked, LayerCall(), anatomy.hidden), family
        after = dict(layer.named_parameters())  # the stand-ins are gone again, the weights untouched
        assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    layer, anatomy = _moe_layer("llama4")
    assert not runs_expert_by_expert(layer, anatomy.source.stacked, LayerCall(), anatomy.hidden)


def test_a_layer_the_one_expert_model_cannot_serve_is_read_whole(tmp_path):
    """Where the model built with one expert lacks a layer's stacked experts (Jamba turns such a block into a dense
    MLP), the layer is not streamed, and the log says so."""
    from moec.lazy_checkpoint import LazyCheckpoint
    from moec.stream_experts import ExpertReader, StreamedLayer

    path = str(tmp_path / "ckpt")
    zoo.build_hf_model("qwen3_moe").save_pretrained(path)
    ck = LazyCheckpoint(path)
    good = StreamedLayer("model.layers.0.mlp", "layers.0", 8, 64, "stacked gate|up",
                         {"gate_up_proj": "experts.gate_up_proj", "down_proj": "experts.down_proj"})
    bad = StreamedLayer("model.layers.1.mlp", "layers.1", 8, 64, "stacked gate|up", {"w": "experts.no_such_tensor"})
    said = []
    reader = ExpertReader(ck, ck.config(), [good, bad], said.append)
    assert list(reader.layers) == ["model.layers.0.mlp"]
    assert any("model.layers.1.mlp: experts read whole" in s for s in said), said
    assert reader.is_expert_tensor("model.layers.0.mlp.experts.3.up_proj.weight")
    assert not reader.is_expert_tensor("model.layers.1.mlp.experts.3.up_proj.weight")  # read with its layer
    assert not reader.is_expert_tensor("model.layers.0.self_attn.q_proj.weight")
    one = reader.hf({}, "model.layers.0.mlp", 3)
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].mlp.experts
    assert torch.equal(one["gate_up_proj"], whole.gate_up_proj[3:4])  # expert 3, as transformers loads it whole
    assert torch.equal(one["down_proj"], whole.down_proj[3:4])


def test_the_stand_in_check_leaves_the_layer_exactly_as_it_was():
    """Same parameters in the same order, the same objects: the miniature is used again after the check."""
    layer, anatomy = _moe_layer("gpt_oss")
    before = [(n, id(p)) for n, p in layer.named_parameters()]
    assert runs_expert_by_expert(layer, anatomy.source.stacked, LayerCall(), anatomy.hidden)
    assert [(n, id(p)) for n, p in layer.named_parameters()] == before
    assert not any(isinstance(v, LazyStack) for m in layer.modules() for v in vars(m).values())


def test_kept_experts_are_read_once_while_they_fit_and_the_rest_every_time():
    """KeptExperts (a streamed layer run many times over in calibration): the experts that fit its budget are
    fetched once, the others on every run, without the tensors they were read from; the log line says which."""
    from moec.passes.fusion_rules import ExpertWeights
    from moec.stream_experts import KeptExperts, StreamedExperts

    fetched = []

    def fetch(e):
        fetched.append(e)
        w = torch.full((1, 4, 4), float(e))
        return ExpertWeights(w, torch.ones(1, 4, 2), None, None, True, "gate_up", gate_up_sources=[[w]])

    stream = StreamedExperts.__new__(StreamedExperts)
    stream.fetch = fetch
    kept = KeptExperts(budget=2 * 96)  # w_gate_up + w_down: 96 bytes an expert; two fit
    assert kept.describe() == ""
    kept.wrap(stream)
    for _ in range(3):
        got = [stream.fetch(e) for e in range(3)]
    assert fetched == [0, 1, 2, 2, 2] and [float(w.w_gate_up[0, 0, 0]) for w in got] == [0.0, 1.0, 2.0]
    assert got[0].gate_up_sources is None and got[2].gate_up_sources is not None
    assert kept.held == 2 * 96
    assert kept.describe() == "2 of 3 experts kept (0 MiB), the rest read on every run"
    roomy = KeptExperts(budget=1 << 20)
    roomy.wrap(stream)
    stream.fetch(0)
    assert roomy.describe() == "each expert read once"

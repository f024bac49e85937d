"""SOURCE forms: Python API, .pt2 files, Hugging Face directories (offline)."""

import os

import onnx
import pytest
import torch

import moec
from moec import zoo
from moec.errors import SourceError
from moec.sources import load_source


def _moe_nodes(path):
    return sum(n.op_type == "MoE" for n in onnx.load(os.path.join(path, "model.onnx")).graph.node)


def test_python_api_compiles_a_module(out_dir):
    src = zoo.handwritten("loop")
    result = moec.compile(src.module, src.example_args, src.dynamic_shapes, out=out_dir)
    assert _moe_nodes(result.out_dir) == 1 and result.report["numerics"]["passed"]


def test_python_api_requires_out():
    with pytest.raises(moec.MoecError, match="out=DIR"):
        moec.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),))


@pytest.mark.slow
def test_pt2_file_is_unflattened_and_fused(tmp_path):
    src = zoo.handwritten("gshard")
    ep = torch.export.export(src.module, src.example_args, dynamic_shapes=src.dynamic_shapes, strict=False)
    path = str(tmp_path / "gshard.pt2")
    torch.export.save(ep, path)
    loaded = load_source(path)
    assert loaded._is_dynamic(0, 0) and loaded._is_dynamic(0, 1)
    result = moec.compile(source=path, out=str(tmp_path / "out"))
    assert result.report["moe_layers"]["fused"] == 1, result.report["moe_layers"]
    assert _moe_nodes(result.out_dir) == 1
    assert any("unflatten" in n for n in result.report["capture"]["notes"])


@pytest.mark.slow
def test_hugging_face_directory_loads_offline(tmp_path):
    model = zoo.build_hf_model("qwen3_moe")
    model.save_pretrained(tmp_path / "qwen3")  # config.json + model.safetensors
    assert (tmp_path / "qwen3" / "model.safetensors").exists()
    result = moec.compile(source=str(tmp_path / "qwen3"), out=str(tmp_path / "out"))
    assert result.report["moe_layers"]["fused"] == 2 and _moe_nodes(result.out_dir) == 2
    assert result.report["numerics"]["passed"]


def test_static_compiles_a_hugging_face_directory_at_its_example_shapes(tmp_path):
    """--static on a directory: the logits graph with no dynamic dims (it used to be ignored there, while
    capture errors suggest it); with --task text-generation it is refused, the cache's dims being dynamic."""
    zoo.build_hf_model("qwen3_moe").save_pretrained(tmp_path / "qwen3")
    src = load_source(str(tmp_path / "qwen3"), static=True)
    assert src.dynamic_shapes is None and src.output_names == ["logits"]
    assert any("--static" in n for n in src.notes)
    with pytest.raises(SourceError, match="--static with --task text-generation"):
        load_source(str(tmp_path / "qwen3"), static=True, task="text-generation")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        load_source(str(tmp_path))


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        load_source(str(tmp_path))


# ----------------------------------------------------------------------------- models as users have them

FACTORIES = '''
import torch
from torch import nn
from moec import zoo


def raw_causal_lm():
    """A transformers model as it comes: its forward returns a DynamicCache too."""
    return zoo.build_hf_model("qwen3_moe"), (torch.randint(0, 128, (2, 7)),)


def no_dynamic_shapes():
    torch.manual_seed(0)
    return zoo.Residual(zoo.LoopMoE(hidden=16, inter=24, num_experts=4, top_k=2), 16).eval(), (torch.randn(2, 6, 16),)


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1).sum(-1)  # runs at batch 2 only


def fixed_batch():
    return FixedBatch(), (torch.randn(2, 5),)
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "user_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_factories"


@pytest.mark.slow
def test_factory_returning_a_transformers_model_as_it_comes(factories, out_dir):
    src = load_source(f"{factories}:raw_causal_lm")  # a text-generation decoder by default
    assert src.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert any("compiled as a KV-cache decoder" in n for n in src.notes)
    src = load_source(f"{factories}:raw_causal_lm", task="logits")
    assert src.input_names == ["input_ids"] and src.input_kinds == ["tokens:128"]
    assert any("wrapped as input_ids -> logits" in n for n in src.notes)
    r = moec.compile(source=f"{factories}:raw_causal_lm", out=out_dir, extra={"task": "logits"}).report
    assert r["moe_layers"]["fused"] == 2 and r["numerics"]["passed"]
    dims = [d.dim_param for d in onnx.load(os.path.join(out_dir, "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


@pytest.mark.slow
def test_factory_without_dynamic_shapes_gets_batch_and_seq_inferred(factories, tmp_path):
    r = moec.compile(source=f"{factories}:no_dynamic_shapes", out=str(tmp_path / "a")).report
    assert any("dynamic dims inferred" in n and "dim 0 = batch, dim 1 = seq" in n for n in r["capture"]["notes"])
    assert len({row["input"] for row in r["numerics"]["inputs"]}) == 2  # verified at a second shape
    dims = [d.dim_param or d.dim_value
            for d in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 16]
    static = moec.compile(source=f"{factories}:no_dynamic_shapes", out=str(tmp_path / "s"), extra={"static": True}).report
    assert not any("inferred" in n for n in static["capture"]["notes"])
    dims = [d.dim_param or d.dim_value
            for d in onnx.load(str(tmp_path / "s" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 6, 16]


def test_a_model_that_only_runs_at_its_example_shape_stays_static(factories):
    src = load_source(f"{factories}:fixed_batch")
    assert src.dynamic_shapes is None and any("no dynamic dims inferred" in n for n in src.notes)


@pytest.mark.slow
def test_a_block_moec_does_not_recognise_still_has_its_experts_fused(out_dir):
    """A router moec can't read (here: a pre-scaled Linear) leaves the block as written; its experts module,
    called with the routing the block decided, is fused on its own, and the artifact is exact. (Experts
    nothing fuses still export through batched_mm: test_unfused_reference_export_has_no_moe_node.)"""
    from torch import nn
    import torch.nn.functional as F

    class PreScaled(nn.Linear):
        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.weight = linear.weight
            self.pre = nn.Parameter(torch.linspace(0.5, 1.5, linear.in_features))

        def forward(self, x):
            return F.linear(x * self.pre, self.weight)

    src = zoo.hf_family("hunyuan_v1_moe")
    for layer in src.module.model.model.layers:
        layer.mlp.gate.wg = PreScaled(layer.mlp.gate.wg)
    from moec.passes.fuse_moe import find_candidates

    found = find_candidates(src.module)
    assert found and all(path.endswith(".experts") and anatomy.experts_only for path, anatomy in found)
    r = moec.compile(src.module, src.example_args, src.dynamic_shapes, out=out_dir).report
    layers = r["moe_layers"]
    assert r["numerics"]["passed"] and layers["fused"] == len(found) and layers["unfused"] == 0
    assert all(l["path"].endswith(".experts") and l["spec"]["route"] is None for l in layers["layers"])

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


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        load_source(str(tmp_path))


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        load_source(str(tmp_path))

"""Triton model repository entries: configs that parse as ModelConfig and match the ONNX signature."""

import os

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moec.errors import MoecError, OutputExistsError
from moec.triton_repo import onnx_signature, render_config, validate_config, write_model_repository


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    class M(torch.nn.Module):
        def forward(self, ids, x):
            return x * ids.unsqueeze(-1).float(), x.sum(-1)

    path = str(tmp_path_factory.mktemp("m") / "model.onnx")
    b, s = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=128)
    prog = torch.onnx.export(M(), (torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 3, 4)), dynamo=True,
                             dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), input_names=["ids", "x"],
                             output_names=["scaled", "total"])
    prog.save(path)
    return path


def test_config_matches_onnx_signature_and_parses(onnx_model, tmp_path):
    model_dir = write_model_repository(str(tmp_path / "repo"), "m", onnx_model, [onnx_model], instances=2)
    cfg = text_format.Parse(open(os.path.join(model_dir, "config.pbtxt")).read(), model_config_pb2.ModelConfig())
    assert cfg.name == "m" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    inputs, outputs, _ = onnx_signature(onnx_model)
    assert [i.name for i in cfg.input] == [t.name for t in inputs] == ["ids", "x"]
    assert [o.name for o in cfg.output] == [t.name for t in outputs] == ["scaled", "total"]
    dtype = model_config_pb2.DataType.Name
    assert [dtype(i.data_type) for i in cfg.input] == ["TYPE_INT64", "TYPE_FP32"]
    assert list(cfg.input[1].dims) == [-1, 4]  # batch dim dropped: max_batch_size > 0
    assert list(cfg.output[1].dims) == [-1]
    assert cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].count == 2
    assert os.path.exists(os.path.join(model_dir, "1", "model.onnx"))


def test_existing_version_is_never_overwritten(onnx_model, tmp_path):
    repo = str(tmp_path / "repo")
    write_model_repository(repo, "m", onnx_model, [onnx_model])
    marker = os.path.join(repo, "m", "1", "marker")
    open(marker, "w").close()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_model_repository(repo, "m", onnx_model, [onnx_model])
    assert os.path.exists(marker)
    write_model_repository(repo, "m", onnx_model, [onnx_model], version=2)
    assert sorted(os.listdir(os.path.join(repo, "m"))) == ["1", "2", "config.pbtxt"]
    write_model_repository(repo, "m", onnx_model, [onnx_model], force=True)
    assert not os.path.exists(marker)


def test_misspelled_fields_and_enums_are_rejected():
    good = render_config("m", [], [], 0, 1)
    validate_config(good)
    with pytest.raises(MoecError, match="ModelConfig"):
        validate_config(good.replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(MoecError, match="ModelConfig"):
        validate_config(good.replace("KIND_CPU", "KIND_CPUU"))


def test_static_model_gets_max_batch_size_zero(tmp_path):
    path = str(tmp_path / "static.onnx")
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(3, 4),), path, dynamo=True)
    model_dir = write_model_repository(str(tmp_path / "repo"), "s", path, [path])
    cfg = validate_config(open(os.path.join(model_dir, "config.pbtxt")).read())
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [3, 4]
    with pytest.raises(MoecError, match="can't batch"):
        write_model_repository(str(tmp_path / "repo2"), "s", path, [path], max_batch_size=4)


def test_tensorrt_accelerator_config_parses(onnx_model, tmp_path):
    from moec.triton_repo import tensorrt_accelerator_config

    model_dir = write_model_repository(str(tmp_path / "repo"), "t", onnx_model, [onnx_model], kind="KIND_GPU",
                                       extra=tensorrt_accelerator_config(2 << 30))
    cfg = validate_config(open(os.path.join(model_dir, "config.pbtxt")).read())
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["max_workspace_size_bytes"] == str(2 << 30)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"


def test_a_repository_whose_parent_cannot_stage_gets_whole_models_too(tmp_path, monkeypatch):
    """A repository on a mount point ('/models') can't stage beside itself: the model is staged inside
    its own directory, and a failure leaves no empty model directory behind."""
    import moec.triton_repo as tr

    model = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.randn(3, 4),), str(model), dynamo=True)
    monkeypatch.setattr(tr, "staging_parent", lambda repo: None)
    repo = tmp_path / "repo"
    tr.write_model_repository(str(repo), "lin", str(model), [str(model)])
    assert sorted(os.listdir(repo / "lin")) == ["1", "config.pbtxt"] and os.listdir(repo / "lin" / "1") == ["m.onnx"]
    with pytest.raises(FileNotFoundError):
        tr.write_model_repository(str(repo), "gone", str(model), [str(model), str(tmp_path / "missing.data")])
    assert sorted(os.listdir(repo)) == ["lin"]

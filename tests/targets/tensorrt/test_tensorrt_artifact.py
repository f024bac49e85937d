"""--target tensorrt --triton-repo: the Triton model loads without moec's Python plugin and is exact."""

import os

import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moec import golden
from moec.errors import MoecError
from moec.pipeline import CompileOptions, compile
from moec.targets.tensorrt.plugin_spec import PLUGIN
from moec.targets.tensorrt.artifact import capability, profile_max_batch


@pytest.mark.slow
@pytest.mark.skipif(capability()[0], reason="TensorRT and a GPU are here, so the compile builds an engine; "
                    "this checks the no-engine path")
def test_triton_model_without_an_engine_is_onnxruntime_with_plugins_expanded(tmp_path):
    """No engine here: Triton gets ONNX Runtime + the TensorRT accelerator, on an ONNX with no plugin
    node (Triton can't load the Python plugin), and that model reproduces the artifact's goldens."""
    out, repo = str(tmp_path / "a"), str(tmp_path / "repo")
    res = compile(source="moec.zoo:qwen3_moe", options=CompileOptions(
        out=out, target="tensorrt", triton_repo=repo, model_name="q"))
    assert res.report["triton"]["platform"] == "onnxruntime_onnx"
    assert "no TensorRT engine was built here" in res.report["triton"]["serving"]
    cfg = text_format.Parse(open(os.path.join(repo, "q", "config.pbtxt")).read(), model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"

    served = os.path.join(repo, "q", "1", "model.onnx")
    model = onnx.load(served)
    assert not [n for n in model.graph.node if n.op_type == PLUGIN.name or n.domain == PLUGIN.domain]
    assert [n for n in onnx.load(os.path.join(out, "model.onnx")).graph.node if n.op_type == PLUGIN.name]
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # the serving copy stays out of the artifact

    gold = golden.load(os.path.join(out, "golden"))
    session = ort.InferenceSession(served, providers=["CPUExecutionProvider"])
    for probe in gold.probes:
        actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, probe.inputs)))
        checks = golden.compare(gold, probe, actual, gold.tolerance)
        assert checks and all(c.passed for c in checks), [c.reason for c in checks if not c.passed]


def test_tensorrt_plan_max_batch_is_held_to_the_engine_profile(tmp_path):
    """Triton refuses a tensorrt_plan whose max_batch_size exceeds the profile's max batch: the
    default is lowered to it, an explicit larger one is an error."""
    import torch

    from moec.triton_repo import write_model_repository

    class M(torch.nn.Module):
        def forward(self, ids):
            return ids.float() * 2

    path = str(tmp_path / "model.onnx")
    torch.onnx.export(M(), (torch.ones(2, 3, dtype=torch.int64),), dynamo=True, input_names=["input_ids"],
                      dynamic_shapes=({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq")},),
                      ).save(path)
    report = {"memory": {"profiles": {"max": {"dims": {"batch": 4, "seq": 512}}}}}
    cap = profile_max_batch(path, report)
    assert cap == 4 and profile_max_batch(path, {}) is None

    def config(version, **kw):
        model_dir = write_model_repository(str(tmp_path / "repo"), "m", path, [path], version=version,
                                           max_batch_cap=cap, **kw)
        return text_format.Parse(open(os.path.join(model_dir, "config.pbtxt")).read(),
                                 model_config_pb2.ModelConfig())

    assert config(1).max_batch_size == 4 and config(2, max_batch_size=2).max_batch_size == 2
    with pytest.raises(MoecError, match="exceeds the TensorRT engine's optimization profile"):
        config(3, max_batch_size=8)
    assert not os.path.exists(tmp_path / "repo" / "m" / "3")

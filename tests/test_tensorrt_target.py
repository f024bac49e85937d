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
from moec.plugin_spec import PLUGIN
from moec.tensorrt_target import TritonServing


@pytest.mark.slow
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


def test_tensorrt_plan_max_batch_is_held_to_the_engine_profile():
    """Triton refuses a tensorrt_plan whose max_batch_size exceeds the profile's max batch."""
    plan = TritonServing("model.plan", ["model.plan"], "tensorrt_plan", "", "", profile_max_batch=4)
    assert plan.fit_max_batch(None) == 4 and plan.fit_max_batch(2) == 2 and plan.fit_max_batch(4) == 4
    with pytest.raises(MoecError, match="exceeds the TensorRT engine's optimization profile"):
        plan.fit_max_batch(8)
    onnx_model = TritonServing("model.onnx", ["model.onnx"], "onnxruntime_onnx", "", "")
    assert onnx_model.fit_max_batch(None) is None and onnx_model.fit_max_batch(16) == 16

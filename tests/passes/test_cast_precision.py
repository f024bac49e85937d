"""cast_precision (--dtype fp16|bf16): fp16 / bf16 weights and arithmetic behind fp32 inputs and outputs, verified in
ONNX Runtime (bf16 widened to fp32 on its bf16 weights: the CPU provider has no bf16 kernels)."""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moec import zoo
from moec.cli import main

pytestmark = pytest.mark.slow


def _compile(source, out, *extra):
    return main(["compile", source, "--out", str(out), "--quiet", *extra])


def _initializer_types(path):
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in onnx.load(path).graph.initializer}


@pytest.fixture(scope="module")
def fp32_logits(zoo_artifact):
    """family -> its fp32 logits artifact (`moec.zoo:FAMILY` with default options), the run's shared one."""
    return lambda family: Path(zoo_artifact(family).out_dir)


@pytest.fixture(scope="module")
def fp32_quantized(tmp_path_factory):
    """bits -> Qwen3-MoE's fp32 artifact with experts quantized to `bits`, compiled once for the fp16 and bf16
    tests."""
    made = {}

    def get(bits):
        if bits not in made:
            made[bits] = tmp_path_factory.mktemp("fp32") / bits
            assert _compile("moec.zoo:qwen3_moe", made[bits], "--quant", bits) == 0
        return made[bits]

    return get


def _same_model_in(fp32, narrow, dtype: str):
    """The narrow artifact holds every float weight in `dtype`, keeps the fp32 one's interface (feeds and outputs
    keep their dtypes) and its MoE nodes; returns its model."""
    m32, m16 = onnx.load(str(fp32 / "model.onnx")), onnx.load(str(narrow / "model.onnx"))
    assert _initializer_types(str(narrow / "model.onnx")) & {"FLOAT", "FLOAT16", "DOUBLE", "BFLOAT16"} == {dtype}
    assert [(i.name, i.type.tensor_type.elem_type) for i in m16.graph.input] == [
        (i.name, i.type.tensor_type.elem_type) for i in m32.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in m16.graph.output] == [
        (o.name, o.type.tensor_type.elem_type) for o in m32.graph.output]
    assert sum(n.op_type == "MoE" for n in m16.graph.node) == sum(n.op_type == "MoE" for n in m32.graph.node) == 2
    return m16


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_fp16_artifact_holds_fp16_weights_and_matches_fp32_eager(family, fp32_logits, tmp_path):
    fp32, fp16 = fp32_logits(family), tmp_path / "fp16"
    assert _compile(f"moec.zoo:{family}", fp16, "--task", "logits", "--dtype", "fp16") == 0
    _same_model_in(fp32, fp16, "FLOAT16")
    r32, r16 = (json.load(open(d / "report.json")) for d in (fp32, fp16))
    assert 0.45 < r16["weights_bytes"] / r32["weights_bytes"] < 0.55
    assert r16["dtype"] == "fp16" and r16["numerics"]["passed"]
    # inputs drawn clear of routing ties by fp16's rounding, not fp32's
    assert r16["numerics"]["route_margins"]["min_margin"] == 1e-3 == r16["numerics"]["route_margins"][
        "exact_reference"]["min_margin"]
    assert r32["numerics"]["route_margins"]["min_margin"] == 1e-5
    vs_fp32 = max(r["rel_l2"] for r in r16["numerics"]["vs_fp32"]["inputs"])
    assert 1e-5 < vs_fp32 < 1e-2  # fp16's rounding: there, and within the fp16 tolerance

    # independently of the report: ORT on fresh inputs against the fp32 transformers model
    model = zoo.build_hf_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = ort.InferenceSession(str(fp16 / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    assert got.dtype == np.float32 and np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2

    assert json.load(open(fp16 / "golden" / "manifest.json"))["precision"] == "fp16"
    assert main(["verify", str(fp16)]) == 0


def test_a_float_input_model_keeps_fp32_inputs(tmp_path):
    out = tmp_path / "out"
    assert _compile("moec.zoo:gshard_moe", out, "--dtype", "fp16") == 0
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert json.load(open(out / "report.json"))["numerics"]["passed"]


@pytest.mark.parametrize("extra,message", [
    (["--dtype", "bf16", "--quant", "auto", "--accuracy-budget", "0.1"], "--dtype bf16 with --quant auto: not built"),
    (["--dtype", "fp16", "--quant", "auto", "--accuracy-budget", "0.1"], "--dtype fp16 with --quant auto: not built"),
    (["--dtype", "fp16", "--prune-experts", "0.25", "--calibration", "random:4"], "--dtype fp16 with --prune-experts"),
    (["--dtype", "fp16", "--target", "tensorrt"], "--dtype fp16 with --target tensorrt"),
    (["--dtype", "fp16", "--no-pass", "cast_precision"], "--no-pass cast_precision"),
])
def test_what_fp16_is_not_built_for_is_refused_before_any_work(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compile("moec.zoo:qwen3_moe", out, *extra) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_kv_cache_decoder_in_fp16_is_refused_naming_task_logits(tmp_path, capsys):
    path, out = tmp_path / "hf", tmp_path / "out"
    zoo.build_hf_model("qwen3_moe").save_pretrained(str(path))
    assert _compile(str(path), out, "--dtype", "fp16") == 2
    assert "--task logits" in capsys.readouterr().err and not out.exists()
    assert _compile(str(path), out, "--dtype", "fp16", "--out-of-core", "on") == 2
    assert "--task logits" in capsys.readouterr().err and not out.exists()
    # what it names works, out of core as in memory
    assert _compile(str(path), out, "--dtype", "fp16", "--out-of-core", "on", "--task", "logits") == 0


def test_a_model_fp16_cannot_hold_fails_against_fp32(tmp_path):
    """Weights around 1e-6 are fp16 subnormals (a few bits each): ORT and torch agree in fp16, but the artifact is
    far from the fp32 model, and the compile says so instead of shipping it."""
    import moec
    from moec.errors import VerificationError

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16, bias=False)
            with torch.no_grad():
                self.proj.weight.mul_(1e-5)

        def forward(self, x):
            return self.proj(x) * 1e4

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match="differs from eager fp32 PyTorch: relative L2"):
        moec.compile(Tiny(), (x,), out=str(tmp_path / "out"), extra={"dtype": "fp16"})
    assert not (tmp_path / "out").exists()


def test_dynamic_shapes_given_by_argument_name_export_in_fp16(tmp_path):
    import inspect

    import moec

    src = zoo.gshard_moe()
    name = next(iter(inspect.signature(src.module.forward).parameters))
    dyn = {name: {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=64)}}
    result = moec.compile(src.module, src.example_args, dyn, out=str(tmp_path / "out"), extra={"dtype": "fp16"})
    assert result.report["numerics"]["passed"] and result.report["dtype"] == "fp16"


def test_a_pre_quantized_checkpoint_is_refused_in_fp16(tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from test_mxfp4_checkpoint import write_checkpoint

    path, out = str(tmp_path / "ckpt"), tmp_path / "out"
    write_checkpoint(path)
    assert _compile(path, out, "--task", "logits", "--dtype", "fp16") == 2
    assert "experts already quantized in the model (int8)" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("quant", [["int8"], ["int4"], ["int2"]])
def test_quantized_experts_in_an_fp16_artifact_keep_their_codes(quant, fp32_quantized, tmp_path):
    """--quant with --dtype fp16: the same QMoE codes as at fp32, fp16 scales and arithmetic, exact against the
    dequantized fp16 model within fp16's tolerance; the error against fp32 is reported (the budget's to gate)."""
    fp32, fp16 = fp32_quantized(quant[0]), tmp_path / "fp16"
    assert _compile("moec.zoo:qwen3_moe", fp16, "--quant", *quant, "--dtype", "fp16") == 0
    from onnx.numpy_helper import to_array

    a32, a16 = ({t.name: t for t in onnx.load(str(d / "model.onnx")).graph.initializer} for d in (fp32, fp16))
    codes = [n for n in a32 if n.endswith((".fc1", ".fc2"))]
    assert codes and all(np.array_equal(to_array(a32[n]), to_array(a16["model." + n])) for n in codes)
    assert {onnx.TensorProto.DataType.Name(a16["model." + n + "_scales"].data_type) for n in codes} == {"FLOAT16"}
    report = json.load(open(fp16 / "report.json"))
    assert report["numerics"]["passed"] and report["numerics"]["against"] == "the dequantized fp16 reference"
    assert report["quantization"]["tolerance_vs_dequantized"] == 1e-2
    assert max(r["rel_l2"] for r in report["numerics"]["inputs"]) < 1e-2


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_bf16_artifact_holds_bf16_weights_and_is_checked_in_fp32_arithmetic(family, fp32_logits, tmp_path):
    fp32, bf16 = fp32_logits(family), tmp_path / "bf16"
    assert _compile(f"moec.zoo:{family}", bf16, "--task", "logits", "--dtype", "bf16") == 0
    m16 = _same_model_in(fp32, bf16, "BFLOAT16")
    r32, r16 = (json.load(open(d / "report.json")) for d in (fp32, bf16))
    assert 0.45 < r16["weights_bytes"] / r32["weights_bytes"] < 0.55
    n = r16["numerics"]
    assert r16["dtype"] == "bf16" and n["passed"] and n["against"] == "the bf16-weights reference"
    assert "widened to fp32" in n["evaluated_as"] and n["tolerance_rel_l2"] == 1e-2
    assert max(r["rel_l2"] for r in n["inputs"]) < 1e-2
    # bf16's own cost is there, reported: the weights' rounding (what ran) and eager bf16 arithmetic (what didn't)
    assert 1e-4 < max(r["rel_l2"] for r in n["vs_fp32"]["inputs"]) < 0.1
    assert 1e-3 < n["bf16_arithmetic"]["worst_rel_l2"] < 0.2
    # the memory plan sizes bf16 activations at 2 bytes (planned on the widened graph, which holds them in fp32)
    arena = [r["memory"]["profiles"]["max"]["arena_bytes"] for r in (r32, r16)]
    assert 0.4 < arena[1] / arena[0] < 0.6

    # independently of the report: the widened artifact on fresh inputs is the transformers model computing in
    # fp32 on bf16-rounded weights, and visibly not the fp32 model
    from moec.widen_bf16 import widen_bf16

    session = ort.InferenceSession(widen_bf16(m16).model.SerializeToString(), providers=["CPUExecutionProvider"])
    model = zoo.build_hf_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want32 = model(ids).logits.numpy()
        want = model.to(torch.bfloat16).float()(ids).logits.numpy()
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(got, want) < 1e-2 < 10 * rel(want32, want)

    manifest = json.load(open(bf16 / "golden" / "manifest.json"))
    assert manifest["precision"] == "bf16" and manifest["tolerance"]["rel_l2"] == 5e-2  # also for bf16 kernels
    assert main(["verify", str(bf16)]) == 0


def test_a_wrong_bf16_weight_fails_verification(tmp_path):
    """The widened check sees a weight off by bf16's whole ulp scale: one expert's weights doubled fails `moec
    verify`, though bf16 arithmetic itself moves the logits by ~1e-2."""
    out = tmp_path / "bf16"
    assert _compile("moec.zoo:qwen3_moe", out, "--task", "logits", "--dtype", "bf16") == 0
    model = onnx.load(str(out / "model.onnx"))
    fc2 = next(t for t in model.graph.initializer if t.name.endswith("layers.0.mlp.fc2"))
    values = torch.from_numpy(onnx.numpy_helper.to_array(fc2).astype(np.float32)).to(torch.bfloat16)
    values[0] *= 2
    fc2.raw_data = values.view(torch.int16).numpy().tobytes()
    onnx.save(model, str(out / "model.onnx"))
    assert main(["verify", str(out)]) == 10


def test_quantized_experts_in_a_bf16_artifact_keep_their_codes(fp32_quantized, tmp_path):
    fp32, bf16 = fp32_quantized("int4"), tmp_path / "bf16"
    assert _compile("moec.zoo:qwen3_moe", bf16, "--quant", "int4", "--dtype", "bf16") == 0
    from onnx.numpy_helper import to_array

    a32, a16 = ({t.name: t for t in onnx.load(str(d / "model.onnx")).graph.initializer} for d in (fp32, bf16))
    codes = [n for n in a32 if n.endswith((".fc1", ".fc2"))]
    assert codes and all(np.array_equal(to_array(a32[n]), to_array(a16["model." + n])) for n in codes)
    assert {onnx.TensorProto.DataType.Name(a16["model." + n + "_scales"].data_type) for n in codes} == {"BFLOAT16"}
    report = json.load(open(bf16 / "report.json"))
    assert report["numerics"]["passed"]
    assert report["numerics"]["against"] == "the dequantized bf16-weights reference"
    assert report["quantization"]["tolerance_vs_dequantized"] == 1e-2
    assert max(r["rel_l2"] for r in report["numerics"]["inputs"]) < 1e-2
    assert report["numerics"]["bf16_arithmetic"]["worst_rel_l2"] > 1e-3


def test_what_bf16_is_not_built_for_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert _compile("moec.zoo:qwen3_moe", out, "--dtype", "bf16", "--triton-repo", str(tmp_path / "repo")) == 2
    assert "--dtype bf16 with --triton-repo: not built yet" in capsys.readouterr().err
    path = tmp_path / "hf"
    zoo.build_hf_model("qwen3_moe").save_pretrained(str(path))
    assert _compile(str(path), out, "--dtype", "bf16") == 2
    assert "--task logits" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "repo").exists()

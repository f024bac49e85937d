"""Packed int4/int8 checkpoints fold into QMoE without changing a single quantized value."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from moec import zoo
from moec.checkpoint import MANIFEST, save_packed
from moec.ops import interleave_gate_up
from moec.pipeline import CompileOptions, compile
from moec.quant import QuantError, QuantSpec

pytestmark = pytest.mark.slow


def _packed_mixtral(path, spec):
    model = zoo.build_hf_model("mixtral", intermediate_size=48)
    names = [n for n, p in model.named_parameters() if p.dim() == 3]
    save_packed(model, str(path), spec, names)
    return names


@pytest.mark.parametrize("spec", [QuantSpec(4, 16, True), QuantSpec(8, None, False)])
def test_packed_checkpoint_folds_exactly(spec, tmp_path):
    _packed_mixtral(tmp_path / "ckpt", spec)
    res = compile(source=str(tmp_path / "ckpt"), options=CompileOptions(out=str(tmp_path / "a")))
    assert res.report["quantization"]["spec"] == spec.name
    assert res.report["numerics"]["vs_dequantized_reference"]["passed"]
    raw = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    model = onnx.load(os.path.join(res.out_dir, "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2
    for layer, node in enumerate(qmoe):
        down = raw[f"model.layers.{layer}.mlp.experts.down_proj.qweight"].numpy()
        assert np.array_equal(inits[node.input[5]], down)  # fc2 codes: byte for byte
        gate_up = raw[f"model.layers.{layer}.mlp.experts.gate_up_proj.qweight"]
        assert np.array_equal(inits[node.input[2]], interleave_gate_up(gate_up).numpy())  # rows interleaved only
    assert any("without re-quantizing" in n for n in res.report["capture"]["notes"])


def test_conflicting_quant_flags_and_bad_scales(tmp_path):
    _packed_mixtral(tmp_path / "ckpt", QuantSpec(4, 16, True))
    from moec.errors import MoecError

    with pytest.raises(MoecError, match="already quantized"):
        compile(source=str(tmp_path / "ckpt"), options=CompileOptions(out=str(tmp_path / "a"),
                                                                       extra={"quant": "int8"}))
    path = tmp_path / "ckpt" / "model.safetensors"
    raw = load_file(str(path))
    key = "model.layers.1.mlp.experts.down_proj.scales"
    raw[key] = raw[key][..., :1].contiguous()
    save_file(raw, str(path))
    with pytest.raises(QuantError, match="model.layers.1.mlp.experts.down_proj: scales have shape"):
        compile(source=str(tmp_path / "ckpt"), options=CompileOptions(out=str(tmp_path / "b")))
    assert json.load(open(tmp_path / "ckpt" / MANIFEST))["format"] == "moec-packed/1"

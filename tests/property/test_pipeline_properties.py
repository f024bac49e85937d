"""Whole-pipeline properties on random small MoE models (hypothesis, a few examples each):
compiled == eager, verify passes on the fresh artifact and fails on a perturbed one, and the Triton
config always matches the ONNX signature."""

import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from moec.pipeline import CompileOptions, compile
from moec.triton_repo import onnx_signature, validate_config
from moec.verify import verify

from reference_moe import MoEConfig, ReferenceMoE

pytestmark = pytest.mark.slow


class Model(torch.nn.Module):
    def __init__(self, cfg, seed):
        super().__init__()
        self.inp = torch.nn.Linear(cfg.hidden, cfg.hidden)
        self.moe = ReferenceMoE(cfg, seed)

    def forward(self, x):
        return self.moe(self.inp(x)) + x


configs = st.builds(
    MoEConfig, experts=st.sampled_from([2, 4, 8]), top_k=st.sampled_from([1, 2]), hidden=st.just(16),
    inter=st.sampled_from([8, 12]), scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(),
    shared=st.booleans(), gated=st.booleans(), activation=st.sampled_from(["silu", "relu"]),
)


@settings(max_examples=5, deadline=None)
@given(cfg=configs, seed=st.integers(0, 1000), target=st.sampled_from(["onnxruntime", "tensorrt"]))
def test_compile_verify_and_serve_config(cfg, seed, target, tmp_path_factory):
    root = tmp_path_factory.mktemp("p")
    torch.manual_seed(seed)
    model = Model(cfg, seed).eval()
    x = torch.randn(2, 5, cfg.hidden)
    dyn = ({0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=64)},)
    result = compile(model, (x,), dyn, options=CompileOptions(
        out=str(root / "a"), target=target, triton_repo=str(root / "repo"), model_name="m"))
    assert result.report["numerics"]["passed"] and result.report["moe_layers"]["fused"] == 1

    assert verify(result.out_dir).passed
    bad = str(root / "bad")
    shutil.copytree(result.out_dir, bad)
    m = onnx.load(os.path.join(bad, "model.onnx"))
    biggest = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(biggest).copy()
    arr *= 1.5  # a perturbed weight tensor
    biggest.CopyFrom(numpy_helper.from_array(arr, biggest.name))
    onnx.save(m, os.path.join(bad, "model.onnx"))
    assert not verify(bad).passed

    cfg_pb = validate_config(open(os.path.join(result.triton_model_dir, "config.pbtxt")).read())
    inputs, outputs, _ = onnx_signature(os.path.join(result.out_dir, "model.onnx"))
    batch = 1 if cfg_pb.max_batch_size > 0 else 0
    assert [(i.name, list(i.dims)) for i in cfg_pb.input] == [(t.name, list(t.dims[batch:])) for t in inputs]
    assert [(o.name, list(o.dims)) for o in cfg_pb.output] == [(t.name, list(t.dims[batch:])) for t in outputs]

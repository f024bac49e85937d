"""Property tests: over random MoE configurations and inputs, fused == an independent reference.

At the torch level (moec.route + moec.experts) the property holds for every input, ties included
(both sides break ties with torch.topk on identical scores). Through ONNX Runtime it is checked
without ties: ORT's TopK may break exact ties differently, which moec documents rather than hides.
"""

import onnxruntime as ort
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from moec import targets
from moec.export_onnx import capture, to_onnx
from moec.moe_layer import FusedMoE
from moec.numerics import compare_tensors
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import FuseMoE
from moec.targets.onnxruntime.lower_moe_onnxruntime import LowerMoEForOnnxRuntime

from reference_moe import MoEConfig, ReferenceMoE


@st.composite
def moe_configs(draw):
    experts = draw(st.integers(1, 64))
    top_k = draw(st.integers(1, min(8, experts)))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    groups = [g for g in (2, 4, 8) if experts % g == 0 and experts // g >= 2 and experts // g * (g - 1) >= top_k]
    n_group = draw(st.sampled_from([1] + groups)) if groups and draw(st.booleans()) else 1
    topk_group = 1
    if n_group > 1:
        per = experts // n_group
        topk_group = draw(st.integers(max(1, -(-top_k // per)), n_group - 1))
    shared = draw(st.booleans())
    return MoEConfig(
        experts=experts, top_k=top_k, hidden=draw(st.sampled_from([8, 16, 24])),
        inter=draw(st.sampled_from([4, 8, 12])), scoring=scoring, renormalize=draw(st.booleans()),
        router_bias=draw(st.booleans()), selection_bias=draw(st.booleans()) if scoring == "sigmoid" else False,
        n_group=n_group, topk_group=topk_group, scale=draw(st.sampled_from([1.0, 2.5])),
        shared=shared, shared_gate=shared and draw(st.booleans()),
        activation=draw(st.sampled_from(["silu", "relu", "gelu_tanh"])), gated=draw(st.booleans()),
        expert_bias=draw(st.booleans()),
    )


class Wrap(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)


def _fuse(cfg, seed, zero_router=False, lower=False):
    ref = ReferenceMoE(cfg, seed)
    if zero_router:
        ref.zero_router_()
    model = Wrap(ReferenceMoE(cfg, seed))
    if zero_router:
        model.moe.zero_router_()
    example = (torch.randn(2, 6, cfg.hidden, generator=torch.Generator().manual_seed(seed)),)
    passes = [FuseMoE()] + ([LowerMoEForOnnxRuntime()] if lower else [])
    model, records = PassManager(passes).run(model, PassContext(probes=[example]))
    return ref, model, records[0].details["layers"][0], example


inputs = st.sampled_from([(1, 1), (1, 7), (3, 16), (2, 64)])


@given(cfg=moe_configs(), seed=st.integers(0, 2**16), shape=inputs, magnitude=st.sampled_from([1.0, 30.0]))
def test_fused_equals_reference(cfg, seed, shape, magnitude):
    ref, model, layer, _ = _fuse(cfg, seed)
    assert layer["fused"], layer
    assert isinstance(model.moe, FusedMoE)
    x = torch.randn(*shape, cfg.hidden, generator=torch.Generator().manual_seed(seed + 1)) * magnitude
    with torch.no_grad():
        assert compare_tensors(ref(x), model(x)).rel_l2 < 1e-5


@given(cfg=moe_configs(), seed=st.integers(0, 2**16))
def test_router_ties_fuse_and_agree(cfg, seed):
    """A zero router makes every score tie; the fused layer must still equal the reference."""
    ref, model, layer, _ = _fuse(cfg, seed, zero_router=True)
    assert layer["fused"], layer
    x = torch.randn(3, 5, cfg.hidden, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert compare_tensors(ref(x), model(x)).rel_l2 < 1e-5


@settings(max_examples=12)
@given(cfg=moe_configs(), seed=st.integers(0, 2**16), tokens=st.sampled_from([1, 9, 40]))
def test_onnxruntime_artifact_equals_reference(cfg, seed, tokens, tmp_path_factory):
    ref, model, layer, example = _fuse(cfg, seed, lower=True)
    dyn = ({0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=1, max=256)},)
    path = str(tmp_path_factory.mktemp("onnx") / "m.onnx")
    to_onnx(capture(model, example, dyn), ["x"], ["y"], dyn, targets.get("onnxruntime").translations()).save(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(1, tokens, cfg.hidden, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        expected = ref(x)
        # no exact ties in the routing decision (ORT's TopK may break them differently)
        scores = ref.router(x.reshape(-1, cfg.hidden))
        top = scores.topk(min(cfg.experts, cfg.top_k + 1), -1).values
        assume(cfg.top_k == cfg.experts or bool((top[:, :-1] - top[:, 1:]).abs().min() > 1e-6))
    got = sess.run(None, {"x": x.numpy()})[0]
    assert compare_tensors(expected, got).rel_l2 < 1e-4, layer

"""lower_moe_onnxruntime: exact ORT MoE mappings, and the refusals that keep it exact."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from moec.moe_layer import ExpertsSpec, LayerSpec, RouteSpec
from moec.targets.onnxruntime.ops import ort_moe_reference
from moec.targets.onnxruntime.lower_moe_onnxruntime import OrtPlan, plan_layer


def spec(route=RouteSpec("softmax", 2, True), **experts):
    x = dict(num_experts=8, hidden=16, intermediate=8, activation="silu", gated=True)
    x.update(experts)
    return LayerSpec(route, ExpertsSpec(**x))


def test_softmax_renormalized_routing_feeds_logits_directly():
    plan = plan_layer(spec(), 2)
    assert isinstance(plan, OrtPlan) and plan.native_routing and plan.normalize and plan.slack == 0
    assert plan.activation_type == "swiglu" and plan.alpha == 1.0 and plan.beta == 0.0


def test_unnormalized_softmax_uses_slack_expert():
    plan = plan_layer(spec(RouteSpec("softmax", 2, False)), 2)
    assert not plan.native_routing and plan.slack == 1.0 and plan.fold == 1.0


def test_sigmoid_grouped_biased_routing_uses_pseudo_logits_and_folds_scale():
    plan = plan_layer(spec(RouteSpec("sigmoid", 2, True, 4, 2, 2.5, True)), 2)
    assert not plan.native_routing and plan.slack == 0 and plan.fold == 2.5


def test_unnormalized_sigmoid_slack_bound_covers_k_scores():
    plan = plan_layer(spec(RouteSpec("sigmoid", 3, False, scale=2.0)), 3)
    assert plan.slack == 6.0 and plan.fold == 6.0


@pytest.mark.parametrize("kw,reason", [
    (dict(activation="gelu", gated=False), "tanh approximation"),
    (dict(activation="gelu_tanh", gated=True), "gated activation"),
    (dict(weight_on_input=True), "expert input"),
])
def test_inexpressible_layers_are_refused_with_reason(kw, reason):
    plan = plan_layer(spec(**kw), 2)
    assert isinstance(plan, str) and reason in plan


def test_gpt_oss_clamped_swiglu_maps_to_attributes():
    plan = plan_layer(spec(activation="swiglu", alpha=1.702, beta=1.0, limit=7.0), 2)
    assert (plan.activation_type, plan.alpha, plan.beta, plan.limit) == ("swiglu", 1.702, 1.0, 7.0)


def _moe_node_model(k, norm, act, fc1, fc2, intermediate_input, attrs=None):
    e, x_rows, h = fc1.shape
    nodes = []
    x_name = "x"
    if intermediate_input:
        nodes.append(helper.make_node("Mul", ["x", "one"], ["x_mid"]))
        x_name = "x_mid"
    kw = dict(k=k, normalize_routing_weights=norm, activation_type=act, **(attrs or {}))
    # Intermediate input *and* output, as inside a real model: ORT may then run MoE in place.
    y_name = "y_mid" if intermediate_input else "y"
    nodes.append(helper.make_node("MoE", [x_name, "r", "fc1", "", "fc2"], [y_name], domain="com.microsoft", **kw))
    if intermediate_input:
        nodes.append(helper.make_node("Mul", ["y_mid", "one"], ["y"]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", h]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["T", e])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", h])],
        [numpy_helper.from_array(fc1.numpy(), "fc1"), numpy_helper.from_array(fc2.numpy(), "fc2"),
         numpy_helper.from_array(np.ones(1, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("act,attrs", [("swiglu", {"swiglu_fusion": 1}), ("relu", {}), ("gelu", {}), ("silu", {}),
                                       ("swiglu", {"swiglu_fusion": 1, "activation_alpha": 1.702,
                                                   "activation_beta": 1.0, "swiglu_limit": 7.0})])
def test_ort_moe_reference_matches_onnxruntime(act, attrs):
    """The torch reference of moec.ort_moe is what ORT computes (normalize=1, intermediate input)."""
    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 6, 16, 8, 11, 2
    rows = 2 * i if act == "swiglu" else i
    fc1, fc2 = torch.randn(e, rows, h, generator=g), torch.randn(e, h, i, generator=g)
    x, r = torch.randn(t, h, generator=g), torch.randn(t, e, generator=g)
    sess = _moe_node_model(k, 1, act, fc1, fc2, intermediate_input=True, attrs=attrs)
    got = sess.run(None, {"x": x.numpy(), "r": r.numpy()})[0]
    ref = ort_moe_reference(x, r, fc1, None, fc2, None, k, True, act, attrs.get("activation_alpha", 1.0),
                            attrs.get("activation_beta", 0.0), attrs.get("swiglu_limit", math.inf)).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_onnxruntime_normalize0_bug_is_where_we_measured_it():
    """Why moec never emits normalize_routing_weights=0: ONNX Runtime 1.31's CPU kernel is wrong with it
    when the MoE input and output are intermediate tensors (as in every real model). 1.32 fixed it; moec
    keeps avoiding it because an artifact must be right on whatever runtime the deployment has."""
    g = torch.Generator().manual_seed(0)
    fc1, fc2 = torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    x, r = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    ref = ort_moe_reference(x, r, fc1, None, fc2, None, 2, False, "relu", 1.0, 0.0, math.inf).numpy()
    as_graph_input = _moe_node_model(2, 0, "relu", fc1, fc2, False).run(None, {"x": x.numpy(), "r": r.numpy()})[0]
    as_intermediate = _moe_node_model(2, 0, "relu", fc1, fc2, True).run(None, {"x": x.numpy(), "r": r.numpy()})[0]
    assert np.abs(as_graph_input - ref).max() < 1e-4
    version = tuple(int(v) for v in ort.__version__.split(".")[:2])
    if version < (1, 32):
        assert np.abs(as_intermediate - ref).max() > 1e-2, "ORT < 1.32 should show the bug"
    else:
        assert np.abs(as_intermediate - ref).max() < 1e-4, f"ORT {ort.__version__} regressed"

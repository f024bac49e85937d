"""IMoELayer swap: which plugin nodes qualify, and the weight re-layout against the documented math."""

import math

import numpy as np
import pytest
import torch

from moec.ops import experts_reference
from moec.targets.tensorrt.engine import Capability, capability
from moec.targets.tensorrt.imoe import View, imoe_reference, imoe_refusal, imoe_views

SILU = dict(activation="silu", gated=1, weight_on_input=0, quant_bits=0)


@pytest.mark.parametrize("bias", [False, True])
def test_views_give_imoe_the_plugins_experts(bias):
    """Plugin-layout weights through IMOE views, computed the way TensorRT documents IMoELayer,
    equal moec's experts op on the plugin layout."""
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, k = 5, 12, 8, 4, 2
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    w, ids = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(k, -1)
    plugin = {"w_gate_up": torch.randn(experts, 2 * inter, hidden, generator=g, dtype=torch.float64),
              "w_down": torch.randn(experts, hidden, inter, generator=g, dtype=torch.float64)}
    if bias:
        plugin["b_gate_up"] = torch.randn(experts, 2 * inter, generator=g, dtype=torch.float64)
        plugin["b_down"] = torch.randn(experts, hidden, generator=g, dtype=torch.float64)
    want = experts_reference(x, ids, w.double(), plugin["w_gate_up"], plugin["w_down"], plugin.get("b_gate_up"),
                             plugin.get("b_down"), "silu", True, 1.0, 0.0, math.inf, False)
    imoe = {name: view.apply(plugin[src].numpy()) for name, (src, view) in imoe_views(inter).items() if src in plugin}
    assert imoe["fc_gate_weights"].shape == (experts, hidden, inter)  # [numExperts, hiddenSize, moeInterSize]
    assert imoe["fc_down_weights"].shape == (experts, inter, hidden)
    got = imoe_reference(x.numpy(), ids.numpy(), w.double().numpy(), imoe)
    # experts_reference computes in fp32; a wrong layout is off by O(1) (see the next test)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_swapped_gate_and_up_would_be_caught():
    """The check above can fail: gate and up exchanged give another function."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64).numpy()
    w13 = torch.randn(2, 8, 6, generator=g, dtype=torch.float64).numpy()
    w2 = torch.randn(2, 6, 4, generator=g, dtype=torch.float64).numpy()
    ids, scores = np.array([[0, 1]] * 3), np.full((3, 2), 0.5)
    v = imoe_views(4)
    right = {n: view.apply(w13 if src == "w_gate_up" else w2) for n, (src, view) in v.items() if src != "b_gate_up"
             and src != "b_down"}
    wrong = dict(right, fc_gate_weights=right["fc_up_weights"], fc_up_weights=right["fc_gate_weights"])
    assert not np.allclose(imoe_reference(x, ids, scores, right), imoe_reference(x, ids, scores, wrong))


def test_view_slices_then_permutes():
    a = np.arange(2 * 6 * 3).reshape(2, 6, 3)
    assert View(2, 3, (0, 2, 1)).apply(a).shape == (2, 3, 3)
    assert np.array_equal(View(2, 3, (0, 2, 1)).apply(a)[1, :, 0], a[1, 2, :])
    assert np.array_equal(View().apply(a), a)


@pytest.mark.parametrize("change,reason", [
    (dict(), None),
    (dict(activation="identity"), "activation 'identity'"),
    (dict(activation="gelu"), "activation 'gelu'"),
    (dict(activation="swiglu"), "activation 'swiglu'"),
    (dict(gated=0), "ungated"),
    (dict(weight_on_input=1), "Llama4"),
    (dict(quant_bits=4), "int4 expert codes"),
])
def test_which_plugin_nodes_qualify(change, reason):
    got = imoe_refusal({**SILU, **change})
    assert got is None if reason is None else reason in got


@pytest.mark.parametrize("sm,has_add_moe,why", [
    ((9, 0), True, "SM90"), ((12, 0), True, "SM120"), ((10, 0), False, "10.16"),
    ((10, 0), True, None), ((10, 3), True, None), ((11, 0), True, None),
])
def test_imoe_needs_sm100_to_sm11x_and_tensorrt_10_16(sm, has_add_moe, why):
    cap = Capability(True, True, sm, "", "10.15" if not has_add_moe else "10.16", has_add_moe)
    assert cap.imoe_layer == (why is None)
    assert cap.imoe_why_not is None if why is None else why in cap.imoe_why_not


def test_imoe_unavailable_without_tensorrt_or_gpu():
    assert Capability(False, False, None, "TensorRT is not installed").imoe_why_not == "TensorRT is not installed"
    assert not Capability(True, False, None, "no CUDA GPU is visible", "10.16", True).imoe_layer
    cap = capability()
    if not (cap.tensorrt and cap.gpu):
        assert cap.imoe_why_not == cap.reason

"""fuse_skip_norm: each residual add and the RMSNorm after it become one SkipSimplifiedLayerNormalization,
whose sum output carries the residual on; exact to rounding; adds that broadcast are left alone."""

import os
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moec.targets.onnxruntime.fuse_skip_norm import fuse_skip_norm


def _ort_ops(result, tmp_path):
    """The op types of the graph ONNX Runtime runs, after its own fusions."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / (os.path.basename(result.out_dir) + ".opt.onnx"))
    ort.InferenceSession(os.path.join(result.out_dir, "model.onnx"), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_every_residual_add_and_norm_run_as_one_kernel(graph_pass_pairs, tmp_path, family):
    on, off = graph_pass_pairs[family]
    layers = on.report["moe_layers"]["fused"]
    # after attention and after the MoE block (with the next layer's input norm); not the final norm, which
    # alone reads the last layer's output (that output must exist for layer-by-layer verification)
    assert on.report["graph"]["fuse_skip_norm"] == 2 * layers - 1
    assert "fuse_skip_norm" not in off.report["graph"]
    ran, before = _ort_ops(on, tmp_path), _ort_ops(off, tmp_path)
    assert ran["SkipSimplifiedLayerNormalization"] == 2 * layers - 1
    assert before["SkipSimplifiedLayerNormalization"] == 0
    # the norms without an add before them (the first input norm; Qwen3's q/k norms) ONNX Runtime fuses itself
    norms = ran["SimplifiedLayerNormalization"] + ran["SkipSimplifiedLayerNormalization"]
    assert norms == before["SimplifiedLayerNormalization"], (ran, before)
    assert ran["Add"] <= before["Add"] - (2 * layers - 1)


H = 8


def _graph(skip_shape):
    """s = a + b; y = w * (s / sqrt(mean(s**2) + eps)); outputs y and s + 1 (the residual's other use)."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("a", f, ["b", "s", H]), helper.make_tensor_value_info("k", f, skip_shape)]
    inits = [helper.make_tensor("w", f, [H], np.linspace(0.5, 1.5, H).tolist()),
             helper.make_tensor("two", f, [], [2.0]), helper.make_tensor("eps", f, [], [1e-6]),
             helper.make_tensor("one", f, [], [1.0]), helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Add", ["a", "k"], ["s"]), helper.make_node("Pow", ["s", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["m"]), helper.make_node("Add", ["m", "eps"], ["e"]),
             helper.make_node("Sqrt", ["e"], ["r"]), helper.make_node("Div", ["s", "r"], ["d"]),
             helper.make_node("Mul", ["w", "d"], ["y"]), helper.make_node("Add", ["s", "one"], ["next"])]
    outputs = [helper.make_tensor_value_info("y", f, ["b", "s", H]), helper.make_tensor_value_info("next", f, None)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def _run(model, feeds):
    proto = ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_the_fused_norm_and_sum_equal_the_ops():
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((2, 3, H), dtype=np.float32), "k": rng.standard_normal((2, 3, H), dtype=np.float32)}
    model = _graph(["b", "s", H])
    before = _run(model, feeds)
    assert fuse_skip_norm(model) == 1
    ops = Counter(n.op_type for n in model.graph)
    assert ops == {"SkipSimplifiedLayerNormalization": 1, "Add": 1}, ops  # the sum's other use stays
    after = _run(model, feeds)
    s = feeds["a"] + feeds["k"]
    reference = np.linspace(0.5, 1.5, H, dtype=np.float32) * s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(before[0], reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after[0], reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after[1], before[1])  # the sum, carried on exactly


def test_a_sum_only_the_norm_reads_is_left_alone():
    """The last layer's output before the final norm: fused, no tensor would hold it."""
    model = _graph(["b", "s", H])
    model.graph.outputs.pop()  # the sum's other use, gone
    model.graph.remove(next(n for n in model.graph if n.outputs[0].name == "next"), safe=True)
    assert fuse_skip_norm(model) == 0


def test_an_add_that_broadcasts_is_left_alone():
    """The op needs input and skip of one shape; a bias-like [H] operand broadcasts."""
    model = _graph([H])
    assert fuse_skip_norm(model) == 0
    assert not any(n.op_type == "SkipSimplifiedLayerNormalization" for n in model.graph)

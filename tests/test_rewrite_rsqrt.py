"""rewrite_rsqrt: every RMSNorm's x * rsqrt(v) becomes x / sqrt(v), which ONNX Runtime then runs as one
SimplifiedLayerNormalization kernel; outputs move by rounding only; other reciprocals are left alone."""

import os
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moec.rewrite_rsqrt import rewrite_rsqrt


@pytest.fixture(scope="module")
def pair(hf_decoder):
    """Qwen3-MoE's decoder with and without the rewrite (the first shared with the graph passes' tests)."""
    return hf_decoder("qwen3_moe"), hf_decoder("qwen3_moe", disabled_passes=["rewrite_rsqrt"])


def _path(result):
    return os.path.join(result.out_dir, "model.onnx")


def _ops(path):
    """Op types, counting the nodes inside If branches (where lowered attention sits) too."""
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(ir.load(path).graph))


def _ort_ops(path, tmp_path):
    """The op types of the graph ONNX Runtime runs, after its own fusions."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / (os.path.basename(os.path.dirname(path)) + ".opt.onnx"))
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return _ops(so.optimized_model_filepath)


def test_every_norm_becomes_one_onnx_runtime_kernel(pair, tmp_path):
    on, off = pair
    norms = _ops(_path(off))["Reciprocal"]
    # Qwen3-MoE: four norms per decoder layer (input, post-attention, q_norm, k_norm) and the final norm
    assert norms == 4 * on.report["moe_layers"]["fused"] + 1, norms
    assert on.report["graph"]["rsqrt_as_division"] == norms
    assert "rsqrt_as_division" not in off.report["graph"]
    assert _ops(_path(on))["Reciprocal"] == 0
    ran = _ort_ops(_path(on), tmp_path)
    # each norm one kernel: alone, or with the residual add before it (the onnxruntime target's fuse_skip_norm)
    assert ran["SimplifiedLayerNormalization"] + ran["SkipSimplifiedLayerNormalization"] == norms, ran
    assert ran["Sqrt"] == 0 and ran["Pow"] == 0 and ran["ReduceMean"] == 0
    assert sum(ran.values()) < sum(_ort_ops(_path(off), tmp_path).values()) - 4 * norms
    assert on.report["graph"]["nodes_after"] == sum(_ops(_path(on)).values()) - _ops(_path(on))["Constant"]


def test_outputs_move_by_rounding_only(pair, decoder_feeds):
    on, off = pair
    assert on.report["numerics"]["passed"] and on.report["numerics"]["route_margins"]["well_conditioned"]
    a, b = (ort.InferenceSession(_path(r), providers=["CPUExecutionProvider"]) for r in pair)
    rng = np.random.default_rng(0)
    for batch, past, seq in [(1, 0, 6), (2, 9, 1)]:  # prefill, decode
        feeds = decoder_feeds(a, batch, past, seq, rng)
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
            assert err < 1e-6, err


def _graph(nodes, outputs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [4])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4]) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, v], outs), opset_imports=[helper.make_opsetid("", 18)])
    return ir.from_proto(model)


def test_only_a_reciprocal_of_a_sqrt_feeding_one_mul_is_rewritten():
    model = _graph([helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"]),
                    helper.make_node("Mul", ["x", "r"], ["y"])], ["y"])
    assert rewrite_rsqrt(model) == 1
    assert [n.op_type for n in model.graph] == ["Sqrt", "Div"]
    assert model.graph.outputs[0].name == "y"  # the graph output keeps its name
    x, v = np.array([1.0, -2.0, 3.0, 0.5], np.float32), np.array([4.0, 2.0, 0.25, 9.0], np.float32)
    got = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x, "v": v})[0]
    np.testing.assert_allclose(got, x / np.sqrt(v), rtol=1e-7)

    shared = _graph([helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"]),
                     helper.make_node("Mul", ["x", "r"], ["y"]), helper.make_node("Add", ["r", "x"], ["z"])],
                    ["y", "z"])
    plain = _graph([helper.make_node("Reciprocal", ["v"], ["r"]), helper.make_node("Mul", ["x", "r"], ["y"])], ["y"])
    assert rewrite_rsqrt(shared) == 0 and rewrite_rsqrt(plain) == 0
    assert [n.op_type for n in plain.graph] == ["Reciprocal", "Mul"]

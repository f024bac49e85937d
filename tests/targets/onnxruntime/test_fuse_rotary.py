"""fuse_rotary: a decoder's rotary embeddings become com.microsoft.RotaryEmbedding nodes (both ways
transformers writes them), outputs move by rounding only, and a cos/sin whose halves are not provably
equal is left alone."""

import os
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moec.targets.onnxruntime.fuse_rotary import fuse_rotary


def _ops(result):
    model = onnx.load(os.path.join(result.out_dir, "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_every_rotary_embedding_becomes_one_node(graph_pass_pairs, family):
    on, off = graph_pass_pairs[family]
    layers = on.report["moe_layers"]["fused"]
    assert on.report["graph"]["fuse_rotary"] == 2 * layers  # queries and keys
    assert "fuse_rotary" not in off.report["graph"]
    got, before = _ops(on), _ops(off)
    assert got["RotaryEmbedding"] == 2 * layers and before["RotaryEmbedding"] == 0
    assert got["Neg"] == 0 and got["Split"] == 0 and got["Sin"] == 1 and got["Cos"] == 1
    # rotated before the transpose to [batch, heads, seq, head_dim]: no transposes for attention at all
    assert got["Transpose"] <= before["Transpose"] - 4 * layers, (got["Transpose"], before["Transpose"])
    assert on.report["numerics"]["passed"] and on.report["numerics"]["generation"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_outputs_move_by_rounding_only(graph_pass_pairs, decoder_feeds, family):
    """Both graph passes on against both off: prefill, decode, and a left-padded batch."""
    a, b = (ort.InferenceSession(os.path.join(r.out_dir, "model.onnx"), providers=["CPUExecutionProvider"])
            for r in graph_pass_pairs[family])
    rng = np.random.default_rng(0)
    for batch, past, seq, pad in [(1, 0, 6, 0), (2, 9, 1, 0), (3, 0, 5, 2)]:
        feeds = decoder_feeds(a, batch, past, seq, rng)
        feeds["attention_mask"][0, :pad] = 0
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
            assert err < 1e-5, err


HEADS, DIM = 2, 8


def _rotate_half_graph(same_halves: bool, token_major: bool):
    """x * cos + rotate_half(x) * sin as torch.onnx writes it, cos/sin from Cos/Sin(concat(f, f or g)) of
    batch 1 (broadcast over x's batch). token_major: x arrives as [b, s, heads*dim], reshaped and transposed,
    and the output goes back the same way (what attention reads)."""
    nodes, inits = [], []

    def const(name, values):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    if token_major:
        x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HEADS * DIM])
        nodes += [helper.make_node("Reshape", ["x", const("split_shape", [0, 0, HEADS, DIM])], ["x4"]),
                  helper.make_node("Transpose", ["x4"], ["xt"], perm=[0, 2, 1, 3])]
        x = "xt"
    else:
        x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", HEADS, "s", DIM])
        x = "x"
    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, "s", DIM // 2])
    g = helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, "s", DIM // 2])
    nodes += [
        helper.make_node("Concat", ["f", "f" if same_halves else "g"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos"]), helper.make_node("Sin", ["emb"], ["sin"]),
        helper.make_node("Unsqueeze", ["cos", const("one", [1])], ["cos4"]),
        helper.make_node("Unsqueeze", ["sin", const("one_", [1])], ["sin4"]),
        helper.make_node("Slice", [x, const("s0", [0]), const("e0", [DIM // 2]), const("ax", [3]), const("st", [1])],
                         ["x1"]),
        helper.make_node("Slice", [x, const("s1", [DIM // 2]), const("e1", [2**63 - 1]), const("ax_", [3]),
                                   const("st_", [1])], ["x2"]),
        helper.make_node("Neg", ["x2"], ["neg"]), helper.make_node("Concat", ["neg", "x1"], ["rot"], axis=-1),
        helper.make_node("Mul", [x, "cos4"], ["a"]), helper.make_node("Mul", ["rot", "sin4"], ["c"]),
        helper.make_node("Add", ["a", "c"], ["y"]),
    ]
    if token_major:
        nodes += [helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["yt", const("flat_shape", [0, 0, HEADS * DIM])], ["out"])]
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", HEADS * DIM])
    else:
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", HEADS, "s", DIM])
    graph = helper.make_graph(nodes, "g", [x_in, f, g], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def _run(model: ir.Model, feeds):
    proto = ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("token_major", [False, True])
def test_a_rotate_half_rotary_is_exact_and_shares_its_tables(token_major):
    rng = np.random.default_rng(1)
    b, s = 3, 5
    x4 = rng.standard_normal((b, HEADS, s, DIM), dtype=np.float32)
    f = rng.standard_normal((1, s, DIM // 2), dtype=np.float32)
    feeds = {"x": x4.transpose(0, 2, 1, 3).reshape(b, s, HEADS * DIM) if token_major else x4, "f": f, "g": f + 1}
    model = _rotate_half_graph(same_halves=True, token_major=token_major)
    before = _run(model, feeds)
    assert fuse_rotary(model) == 1
    ops = Counter(n.op_type for n in model.graph)
    assert ops["RotaryEmbedding"] == 1 and ops["Neg"] == 0 and ops["Slice"] == 2  # the cos/sin halves
    if token_major:  # the 3-D input and output: no transpose left
        assert ops["Transpose"] == 0
    after = _run(model, feeds)
    emb = np.concatenate([f, f], -1)[:, None]
    reference = x4 * np.cos(emb) + np.concatenate([-x4[..., DIM // 2:], x4[..., :DIM // 2]], -1) * np.sin(emb)
    if token_major:
        reference = reference.transpose(0, 2, 1, 3).reshape(b, s, HEADS * DIM)
    np.testing.assert_allclose(before, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after, reference, rtol=1e-5, atol=1e-6)


def test_cos_and_sin_with_different_halves_are_left_alone():
    """The op reads half a row of cos/sin and uses it for both halves: only exact when they are equal."""
    model = _rotate_half_graph(same_halves=False, token_major=False)
    assert fuse_rotary(model) == 0
    assert not any(n.op_type == "RotaryEmbedding" for n in model.graph)

"""widen_bf16: a bf16 graph as the same graph in fp32 on the same weights, run by ONNX Runtime's CPU provider."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from moec.widen_bf16 import WidenError, has_bf16, widen_bf16


def _bf16(name, values: torch.Tensor):
    raw = values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, T.BFLOAT16, list(values.shape), raw, raw=True)


def _model(nodes, initializers, inputs=None, outputs=None):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", T.FLOAT, ["n", 4])],
                              outputs or [helper.make_tensor_value_info("y", T.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def _linear_model():
    """x (fp32) -> bf16 -> MatMul(w) + b -> Relu -> a custom-domain op -> fp32: what cast_precision's graphs look like."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16),
             helper.make_node("MatMul", ["xb", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("FastGelu", ["r"], ["f"], domain="com.microsoft"),
             helper.make_node("Cast", ["f"], ["y"], to=T.FLOAT)]
    return _model(nodes, [_bf16("w", w), _bf16("b", b)]), w, b


def test_the_widened_graph_is_the_fp32_graph_on_the_bf16_weights():
    model, w, b = _linear_model()
    assert has_bf16(model)
    with pytest.raises(Exception):  # what widening is for: the CPU provider has no bf16 MatMul
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    widened = widen_bf16(model)
    inits = {t.name: t for t in widened.model.graph.initializer}
    assert {t.data_type for t in inits.values()} == {T.FLOAT} and widened.weights == 2
    # exactly the bf16 values, widened
    assert np.array_equal(numpy_helper.to_array(inits["w"]), w.to(torch.bfloat16).float().numpy())
    # the values the artifact holds in bf16, by their names (the memory planner sizes them at 2 bytes)
    assert widened.bf16_values == {"xb", "m", "a", "r", "f"}
    assert not has_bf16(widened.model) and has_bf16(model)  # the caller's model is unchanged
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    got = ort.InferenceSession(widened.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    a = torch.relu(torch.from_numpy(x) @ w.to(torch.bfloat16).float() + b.to(torch.bfloat16).float())
    want = (0.5 * a * (1 + torch.tanh(0.7978845608 * (a + 0.044715 * a ** 3)))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # fp32 arithmetic: no bf16 rounding left


def test_bf16_inputs_outputs_and_constants_widen():
    """A segment's bf16 hidden state in and out, a bf16 Constant and a ConstantOfShape with a bf16 value."""
    one = helper.make_node("Constant", [], ["c"], value=_bf16("c", torch.tensor([0.1, 0.2, 0.3, 0.4])))
    shape = helper.make_node("Shape", ["x"], ["s"])
    fill = helper.make_node("ConstantOfShape", ["s"], ["z"], value=_bf16("v", torch.tensor([0.5])))
    add = helper.make_node("Add", ["x", "c"], ["a"])
    out = helper.make_node("Add", ["a", "z"], ["y"])
    model = _model([one, shape, fill, add, out], [], [helper.make_tensor_value_info("x", T.BFLOAT16, [2, 4])],
                   [helper.make_tensor_value_info("y", T.BFLOAT16, None)])
    widened = widen_bf16(model)
    assert widened.model.graph.input[0].type.tensor_type.elem_type == T.FLOAT
    assert widened.model.graph.output[0].type.tensor_type.elem_type == T.FLOAT
    assert widened.weights == 2 and {"x", "a", "y", "z"} <= widened.bf16_values
    x = np.ones((2, 4), np.float32)
    got = ort.InferenceSession(widened.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    want = 1 + torch.tensor([0.1, 0.2, 0.3, 0.4]).to(torch.bfloat16).float().numpy() + 0.5
    np.testing.assert_array_equal(got, np.broadcast_to(want, (2, 4)))


def test_an_fp32_model_has_no_bf16():
    model, _, _ = _linear_model()
    widened = widen_bf16(model).model
    assert not has_bf16(widened)


def test_what_it_cannot_widen_is_refused_by_name():
    model, _, _ = _linear_model()
    model.graph.initializer[0].ClearField("raw_data")
    model.graph.initializer[0].data_location = T.EXTERNAL
    with pytest.raises(WidenError, match="initializer 'w' is bf16 in external data that was not loaded"):
        widen_bf16(model)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", T.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="the_if")
    model = _model([cond], [_bf16("w", torch.ones(1))], [helper.make_tensor_value_info("c", T.BOOL, [])])
    with pytest.raises(WidenError, match="'the_if' \\(If\\) has subgraphs"):
        widen_bf16(model)


def test_a_session_reads_external_bf16_weights_widened_without_a_protobuf_copy(tmp_path):
    """widened_session hands ONNX Runtime each external weight (bf16 widened as read, other dtypes as they are):
    the graph it parses holds none of them, and the result is the inline widening's."""
    from moec.widen_bf16 import widened_session

    model, w, b = _linear_model()
    path = tmp_path / "m.onnx"
    stored = onnx.ModelProto()
    stored.CopyFrom(model)  # saving with external data moves the copy's weights out
    onnx.save_model(stored, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    head = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == T.EXTERNAL for t in head.graph.initializer)
    got = widened_session(head, str(tmp_path), ort.SessionOptions)
    assert got.widened.model.ByteSize() < 2000 and got.widened.weights == 2  # no weight bytes in the graph
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    inline = ort.InferenceSession(widen_bf16(model).model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got.session.run(None, {"x": x})[0], inline.run(None, {"x": x})[0])

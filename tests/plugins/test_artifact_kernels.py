"""The plugin node moec writes == what the kernels compute from that node's own inputs and fields.

The TensorRT artifact is verified in ONNX Runtime through a reference subgraph (plugin_reference);
this closes the loop on the other side: the kernels TensorRT would launch (JIT sorted kernels and
the AOT one-launch kernel), fed the artifact's initializers and attributes exactly as the plugin's
impl/aot_impl read them, agree with that reference on the same node.
"""

import os
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("triton", reason="the Triton kernel language is a test dependency (pip install triton)")

from moec.numerics import compare_tensors  # noqa: E402
from moec.pipeline import CompileOptions, compile  # noqa: E402
from moec.targets.tensorrt.plugin_reference import substitute_plugins  # noqa: E402
from moec.targets.tensorrt.plugin_spec import PLUGIN  # noqa: E402
from moec.plugins.moe_experts_fused import moe_experts_fused  # noqa: E402
from moec.plugins.moe_experts_triton import DecodeConfig, PackedExpertWeight, moe_experts_triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "property"))
from reference_moe import MoEConfig, ReferenceMoE  # noqa: E402

pytestmark = pytest.mark.slow
H, E, K = 64, 8, 2
# conftest.py: MOEC_KERNEL_TESTS_ON_GPU=1 compiles the kernels for a GPU instead of interpreting them
DEVICE = "cuda" if os.environ.get("MOEC_KERNEL_TESTS_ON_GPU") == "1" else "cpu"


class Model(torch.nn.Module):
    def __init__(self, activation, gated):
        super().__init__()
        cfg = MoEConfig(experts=E, top_k=K, hidden=H, inter=64, scoring="softmax", renormalize=True,
                        activation=activation, gated=gated, expert_bias=True, shared=False)
        self.moe = ReferenceMoE(cfg, 3)

    def forward(self, x):
        return self.moe(x) + x


def _single_node(artifact: str):
    """The first plugin node as a model of its own: graph inputs for the activations, the artifact's
    initializers for the weights."""
    model = onnx.load(os.path.join(artifact, "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == PLUGIN.name)
    inits = {i.name: i for i in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    graph_inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", H]),
                    helper.make_tensor_value_info("topk_ids", TensorProto.INT32, ["T", K]),
                    helper.make_tensor_value_info("topk_weights", TensorProto.FLOAT, ["T", K]),
                    helper.make_tensor_value_info("accumulator", TensorProto.FLOAT, ["T", H])]
    names = ["hidden", "topk_ids", "topk_weights"] + list(node.input[3:11]) + ["accumulator"]
    single = helper.make_node(node.op_type, names, ["out"], domain=node.domain)
    single.attribute.extend(node.attribute)
    weights = [inits[n] for n in node.input[3:11]]
    graph = helper.make_graph([single], "plugin", graph_inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", H])], weights)
    m = helper.make_model(graph, ir_version=10,  # what moec writes; older runtimes reject newer IRs
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(PLUGIN.domain, 1)])
    return m, attrs, {n: torch.from_numpy(numpy_helper.to_array(inits[n]).copy()).to(DEVICE)
                      for n in node.input[3:11]}, node


@pytest.mark.parametrize("quant,activation,gated", [
    ({}, "silu", True),
    ({"quant": "int4", "block_size": 32, "asymmetric": True}, "silu", True),
    ({"quant": "int8"}, "gelu_tanh", False),
])
def test_kernels_fed_the_artifact_agree_with_its_reference(quant, activation, gated, tmp_path):
    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=32)},)
    res = compile(Model(activation, gated).eval(), (torch.randn(2, 5, H),), dyn,
                  options=CompileOptions(out=str(tmp_path / "a"), target="tensorrt", extra=dict(quant)))
    model, a, w, node = _single_node(res.out_dir)
    sub, count = substitute_plugins(model)
    assert count == 1

    g = torch.Generator().manual_seed(0)
    tokens = 9
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, K, generator=g), -1)
    acc = torch.randn(tokens, H, generator=g)  # the plugin adds into whatever the accumulator holds
    feeds = {"hidden": hidden.numpy(), "topk_ids": ids.numpy(), "topk_weights": weights.numpy(),
             "accumulator": acc.numpy()}
    expected = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    # what tensorrt_plugin's impl / aot_impl build from the node's inputs and fields
    name = list(node.input)
    w1, w2, b1, b2 = w[name[3]], w[name[4]], w[name[5]], w[name[6]]
    if a["quant_bits"]:
        zps = (w[name[8]], w[name[10]]) if a["has_zero_points"] else (None, None)
        w1 = PackedExpertWeight(w1, w[name[7]], zps[0], a["quant_bits"], a["hidden_size"])
        w2 = PackedExpertWeight(w2, w[name[9]], zps[1], a["quant_bits"], a["intermediate_size"])
    act = a["activation"].decode()
    hidden, ids, weights, acc = (t.to(DEVICE) for t in (hidden, ids, weights, acc))
    args = (hidden, ids, weights, w1, w2, b1 if a["has_bias"] else None, b2 if a["has_bias"] else None, act,
            bool(a["gated"]), a["alpha"], a["beta"], a["limit"] if a["limit"] > 0 else float("inf"),
            bool(a["weight_on_input"]))
    jit = moe_experts_triton(*args, accumulate_into=acc.clone())
    decode = moe_experts_triton(*args, accumulate_into=acc.clone(), config=DecodeConfig(16, 32, 16, 32))
    aot = moe_experts_fused(*args, accumulator=acc.clone())
    assert compare_tensors(expected, jit).rel_l2 < 1e-5
    assert compare_tensors(expected, decode).rel_l2 < 1e-5
    assert compare_tensors(expected, aot).rel_l2 < 1e-5
    assert compare_tensors(expected, acc).rel_l2 > 1e-2  # the experts contributed something

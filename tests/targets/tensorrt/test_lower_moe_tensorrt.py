"""lower_moe_tensorrt: one plugin node per MoE layer, right fields and weight layouts, verified in ORT."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from moec import zoo
from moec.pipeline import CompileOptions, compile
from moec.targets.tensorrt.plugin_reference import substitute_plugins
from moec.targets.tensorrt.lower_moe_tensorrt import PLUGIN
from moec.targets.tensorrt.imoe import imoe_refusal, plugin_fields

pytestmark = pytest.mark.slow

# why a family's plugin nodes stay plugins on SM100+ instead of becoming IMoELayers (None: they can)
IMOE_REFUSAL = {"gpt_oss": "activation 'swiglu'", "llama4": "Llama4"}
LAYERS = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "deepseek_v3": 2, "olmoe": 2, "gpt_oss": 2,
          "granitemoe": 2, "phimoe": 2, "llama4": 2}


def _plugins(path):
    model = onnx.load(os.path.join(path, "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN.name]
    inits = {i.name: i for i in model.graph.initializer}
    return model, nodes, inits


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("family", list(LAYERS))
def test_family_becomes_one_plugin_node_per_layer(family, zoo_artifact):
    result = zoo_artifact(family, "tensorrt")  # the run's shared compile
    model, nodes, _ = _plugins(result.out_dir)
    assert len(nodes) == LAYERS[family]
    assert not [n for n in model.graph.node if n.domain == "com.microsoft"]  # TensorRT can't parse those
    for n in nodes:
        a = _attrs(n)
        assert n.domain == PLUGIN.domain and a["plugin_namespace"] == b"moec" and a["plugin_version"] == b"1"
        # aot=0 asks the parser for the JIT implementation; without it TensorRT's plugin creator refuses
        # a plugin that defines both
        assert len(n.input) == 12 and a["quant_bits"] == 0 and a["aot"] == 0
        refusal = imoe_refusal(plugin_fields(n))
        assert refusal is None if family not in IMOE_REFUSAL else IMOE_REFUSAL[family] in refusal
    numerics = result.report["numerics"]
    assert numerics["passed"] and "reference subgraph" in numerics["evaluated_as"]
    assert max(r["rel_l2"] for r in numerics["inputs"]) < 1e-4
    engine = result.report["tensorrt"]["engine"]
    assert engine["built"] is False and "TensorRT" in engine["reason"] and "build-engine" in engine["how_to_build"]
    plugins = json.load(open(os.path.join(result.out_dir, "plugins.json")))
    assert plugins["plugins"][0]["plugin_name"] == PLUGIN.name


def test_plugin_fields_and_weight_layouts_match_the_model(zoo_artifact):
    # Mixtral stores gate_up [E, 2I, H] (gate rows then up rows): the plugin takes it unchanged.
    src = zoo.hf_family("mixtral")
    expected = src.module.model.model.layers[0].mlp.experts.gate_up_proj.detach().numpy().copy()
    res = zoo_artifact("mixtral", "tensorrt")
    _, nodes, inits = _plugins(res.out_dir)
    a = _attrs(nodes[0])
    assert (a["num_experts"], a["top_k"], a["hidden_size"], a["intermediate_size"]) == (6, 2, 48, 40)
    assert a["activation"] == b"silu" and a["gated"] == 1 and a["weight_on_input"] == 0
    np.testing.assert_array_equal(numpy_helper.to_array(inits[nodes[0].input[3]]), expected)

    # GPT-OSS stores gate_up [E, H, 2I] with gate/up interleaved: the plugin gets canonical rows.
    src = zoo.hf_family("gpt_oss")
    raw = src.module.model.model.layers[0].mlp.experts.gate_up_proj.detach()
    canonical = torch.cat([raw[..., 0::2], raw[..., 1::2]], dim=-1).transpose(1, 2).numpy()
    res = zoo_artifact("gpt_oss", "tensorrt")
    _, nodes, inits = _plugins(res.out_dir)
    a = _attrs(nodes[0])
    assert a["activation"] == b"swiglu" and abs(a["alpha"] - 1.702) < 1e-6 and a["limit"] == 7.0 and a["beta"] == 1.0
    np.testing.assert_allclose(numpy_helper.to_array(inits[nodes[0].input[3]]), canonical)


def test_substitution_checks_the_attributes(zoo_artifact):
    """The ORT check evaluates the node's own attributes: a wrong one must show up as an error."""
    res = zoo_artifact("qwen3_moe", "tensorrt")
    model = onnx.load(os.path.join(res.out_dir, "model.onnx"))
    golden = os.path.join(res.out_dir, "golden")
    feed = {"input_ids": np.load(os.path.join(golden, "probe0.input.input_ids.npy"))}
    ref = np.load(os.path.join(golden, "probe0.output.logits.npy"))

    def run(m):
        sub, count = substitute_plugins(m)
        assert count == 2
        out = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        return np.linalg.norm(out - ref) / np.linalg.norm(ref)

    assert run(model) < 1e-5
    for n in model.graph.node:
        if n.op_type == PLUGIN.name:
            for a in n.attribute:
                if a.name == "activation":
                    a.s = b"relu"
    assert run(model) > 1e-2


# --- quantized experts for TensorRT: the plugin's packed variant ---

def _quant_model(gated=True):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "property"))
    from reference_moe import MoEConfig, ReferenceMoE

    cfg = MoEConfig(experts=8, top_k=2, hidden=64, inter=64, scoring="softmax", renormalize=True,
                    activation="silu" if gated else "relu", gated=gated, expert_bias=True, shared=False)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = ReferenceMoE(cfg, 0)

        def forward(self, x):
            return self.moe(x) + x

    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=32)},)
    return Model().eval(), (torch.randn(2, 5, 64),), dyn


@pytest.mark.parametrize("bits,block,asym,aot", [("int4", 32, False, True), ("int4", None, True, False),
                                                 ("int8", 16, True, True), ("int8", None, False, False)])
def test_quantized_plugin_equals_dequantized_reference(bits, block, asym, aot, tmp_path):
    from moec.quant import QuantSpec, quantize

    model, args, dyn = _quant_model()
    w_gate_up = model.moe.w_in.detach().transpose(1, 2).contiguous()  # canonical [E, 2I, H] (gate | up)
    extra = dict(quant=bits, block_size=block, asymmetric=asym, tensorrt_aot=aot)
    res = compile(model, args, dyn, options=CompileOptions(out=str(tmp_path / "q"), target="tensorrt", extra=extra))
    exact = res.report["numerics"]["vs_dequantized_reference"]
    assert exact["passed"] and max(i["rel_l2"] for i in exact["inputs"]) < 1e-5
    assert res.report["quantization"]["onnxruntime_quantizes_activations"] is False
    _, nodes, inits = _plugins(res.out_dir)
    (node,) = nodes
    a = _attrs(node)
    nbits = int(bits[3:])
    assert a["quant_bits"] == nbits and a["has_zero_points"] == int(asym) and a["aot"] == int(aot)
    assert (a["group_size_gate_up"], a["group_size_down"]) == (block or 64, block or 64)
    codes = numpy_helper.to_array(inits[node.input[3]])
    scales = numpy_helper.to_array(inits[node.input[7]])
    assert codes.dtype == np.uint8 and codes.shape == (8, 128, 64 * nbits // 8)
    assert scales.shape == (8, 128, 64 // (block or 64))
    zps = numpy_helper.to_array(inits[node.input[8]])
    assert zps.shape == (scales.shape if asym else (1,))
    # the codes are moec's quantizer's codes for the model's own weights, byte for byte
    from moec.quant import pack

    expected = pack(quantize(w_gate_up, QuantSpec(nbits, block, not asym), "w")).weight
    np.testing.assert_array_equal(codes, expected)


def test_aot_refuses_int4_groups_the_kernel_cannot_run(tmp_path):
    from moec.errors import MoecError

    model, args, dyn = _quant_model()
    extra = dict(quant="int4", block_size=16, tensorrt_aot=True)
    with pytest.raises(MoecError, match="multiples of 32"):
        compile(model, args, dyn, options=CompileOptions(out=str(tmp_path / "q"), target="tensorrt", extra=extra))
    assert not os.path.exists(tmp_path / "q")


def test_int2_is_refused_before_any_work(tmp_path):
    from moec.errors import MoecError

    model, args, dyn = _quant_model()
    with pytest.raises(MoecError, match="int2.*4- and 8-bit.*--target onnxruntime"):
        compile(model, args, dyn, options=CompileOptions(out=str(tmp_path / "q"), target="tensorrt",
                                                         extra=dict(quant="int2")))
    assert not os.path.exists(tmp_path / "q")

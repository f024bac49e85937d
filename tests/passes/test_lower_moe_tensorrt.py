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
from moec.plugin_reference import substitute_plugins
from moec.passes.lower_moe_tensorrt import PLUGIN

pytestmark = pytest.mark.slow

LAYERS = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "deepseek_v3": 2, "olmoe": 2, "gpt_oss": 2,
          "granitemoe": 2, "phimoe": 2, "llama4": 1}


def _plugins(path):
    model = onnx.load(os.path.join(path, "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN.name]
    inits = {i.name: i for i in model.graph.initializer}
    return model, nodes, inits


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("family", list(LAYERS))
def test_family_becomes_one_plugin_node_per_layer(family, out_dir):
    result = compile(source=f"moec.zoo:{family}", options=CompileOptions(out=out_dir, target="tensorrt"))
    model, nodes, _ = _plugins(result.out_dir)
    assert len(nodes) == LAYERS[family]
    assert not [n for n in model.graph.node if n.domain == "com.microsoft"]  # TensorRT can't parse those
    for n in nodes:
        a = _attrs(n)
        assert n.domain == PLUGIN.domain and a["plugin_namespace"] == b"moec" and a["plugin_version"] == b"1"
        assert len(n.input) == (7 if a["has_bias"] else 5)
    numerics = result.report["numerics"]
    assert numerics["passed"] and "reference subgraph" in numerics["evaluated_as"]
    assert max(r["rel_l2"] for r in numerics["inputs"]) < 1e-4
    engine = result.report["tensorrt"]["engine"]
    assert engine["built"] is False and "TensorRT" in engine["reason"] and "build-engine" in engine["how_to_build"]
    plugins = json.load(open(os.path.join(result.out_dir, "plugins.json")))
    assert plugins["plugins"][0]["plugin_name"] == PLUGIN.name


def test_plugin_fields_and_weight_layouts_match_the_model(tmp_path):
    # Mixtral stores gate_up [E, 2I, H] (gate rows then up rows): the plugin takes it unchanged.
    src = zoo.hf_family("mixtral")
    expected = src.module.model.model.layers[0].mlp.experts.gate_up_proj.detach().numpy().copy()
    res = compile(source="moec.zoo:mixtral", options=CompileOptions(out=str(tmp_path / "m"), target="tensorrt"))
    _, nodes, inits = _plugins(res.out_dir)
    a = _attrs(nodes[0])
    assert (a["num_experts"], a["top_k"], a["hidden_size"], a["intermediate_size"]) == (6, 2, 48, 40)
    assert a["activation"] == b"silu" and a["gated"] == 1 and a["weight_on_input"] == 0
    np.testing.assert_array_equal(numpy_helper.to_array(inits[nodes[0].input[3]]), expected)

    # GPT-OSS stores gate_up [E, H, 2I] with gate/up interleaved: the plugin gets canonical rows.
    src = zoo.hf_family("gpt_oss")
    raw = src.module.model.model.layers[0].mlp.experts.gate_up_proj.detach()
    canonical = torch.cat([raw[..., 0::2], raw[..., 1::2]], dim=-1).transpose(1, 2).numpy()
    res = compile(source="moec.zoo:gpt_oss", options=CompileOptions(out=str(tmp_path / "g"), target="tensorrt"))
    _, nodes, inits = _plugins(res.out_dir)
    a = _attrs(nodes[0])
    assert a["activation"] == b"swiglu" and abs(a["alpha"] - 1.702) < 1e-6 and a["limit"] == 7.0 and a["beta"] == 1.0
    np.testing.assert_allclose(numpy_helper.to_array(inits[nodes[0].input[3]]), canonical)


def test_substitution_checks_the_attributes(tmp_path):
    """The ORT check evaluates the node's own attributes: a wrong one must show up as an error."""
    res = compile(source="moec.zoo:qwen3_moe", options=CompileOptions(out=str(tmp_path / "q"), target="tensorrt"))
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

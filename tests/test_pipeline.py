"""End to end through the Python API: real transformers models -> fused ONNX -> ONNX Runtime."""

import json
import os

import onnx
import pytest

from moec import zoo
from moec.pipeline import CompileOptions, compile

pytestmark = pytest.mark.slow

# family -> how many MoE layers must become one com.microsoft.MoE node each
MOE_NODES = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "deepseek_v3": 2, "olmoe": 2, "gpt_oss": 2,
             "granitemoe": 2, "phimoe": 2, "llama4": 0, "hunyuan_v1_moe": 2, "ernie4_5_moe": 2}


def _compile(source, out_dir, **kw):
    return compile(source=source, options=CompileOptions(out=out_dir, **kw))


def _check_artifact(result, expected_moe_nodes):
    report = result.report
    model = onnx.load(os.path.join(result.out_dir, "model.onnx"))
    assert model.ir_version <= 10
    moe_nodes = [n for n in model.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
    assert len(moe_nodes) == expected_moe_nodes
    for n in moe_nodes:  # never the attribute ORT's CPU kernel gets wrong
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["normalize_routing_weights"] == 1
    layers = report["moe_layers"]
    assert layers["unfused"] == 0
    lowered_dense = [l for l in layers["layers"] if l.get("lowered_to", "").startswith("dense")]
    assert len(lowered_dense) == layers["fused"] - expected_moe_nodes
    assert all(l.get("lowering_note") for l in lowered_dense), "every non-MoE lowering states why"
    rows = report["numerics"]["inputs"]
    assert report["numerics"]["passed"] and len({r["input"] for r in rows}) == 2  # two sequence lengths
    assert max(r["rel_l2"] for r in rows) < 1e-4
    saved = json.load(open(os.path.join(result.out_dir, "report.json")))
    assert saved["moe_layers"]["fused"] == layers["fused"]
    return model


@pytest.mark.parametrize("family", list(MOE_NODES))
def test_transformers_family_compiles_exactly(family, zoo_artifact):
    result = zoo_artifact(family)
    model = _check_artifact(result, MOE_NODES[family])
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "seq"]


@pytest.mark.parametrize("style", list(zoo.HANDWRITTEN))
def test_handwritten_style_compiles_to_one_moe_node(style, out_dir):
    factory = {"loop": "loop_moe", "switch": "switch_moe", "gshard": "gshard_moe", "soft_mixture": "soft_mixture_moe",
               "bare_router": "bare_router_moe", "parallel_lists": "parallel_lists_moe", "stacked_on_siblings": "stacked_on_siblings_moe",
               "routed_by_caller": "routed_by_caller_moe", "sigmoid_biased": "sigmoid_biased_moe",
               "token_sorted": "token_sorted_moe", "router_triple": "router_triple_moe",
               "squared_relu_top1": "squared_relu_top1_moe"}
    # squared ReLU has no ORT MoE activation: the layer is lowered to dense ONNX ops (the report says why)
    _check_artifact(_compile(f"moec.zoo:{factory[style]}", out_dir), 0 if style == "squared_relu_top1" else 1)


def test_unfused_reference_export_has_no_moe_node(out_dir):
    result = _compile("moec.zoo:qwen3_moe", out_dir, fuse=False)
    model = onnx.load(os.path.join(result.out_dir, "model.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "MoE"]
    assert result.report["numerics"]["passed"]
    assert any("batched_mm" in n for n in result.report["capture"]["notes"])


def test_report_says_what_each_pass_did(zoo_artifact):
    report = zoo_artifact("deepseek_v3").report
    names = [p["name"] for p in report["passes"]]
    # the fold runs first, unmodified; attention lowering has no cache to lower in a logits graph, and says so
    assert names == ["fold_weight_qdq", "fuse_moe", "lower_moe_onnxruntime", "lower_attention"]
    assert not report["passes"][0]["modified"] and not report["passes"][3]["modified"]
    assert "not a KV-cache decoder" in report["passes"][3]["details"]["reason"]
    assert all(p["validation"]["rel_l2"] < 1e-4 for p in report["passes"][1:3])
    layer = report["moe_layers"]["layers"][0]
    assert layer["spec"]["route"]["scoring"] == "sigmoid" and layer["spec"]["route"]["n_group"] == 4
    assert layer["lowered_to"].startswith("com.microsoft.MoE")
    for key in ("torch", "onnx", "onnxruntime", "transformers"):
        assert report["versions"][key]
    assert set(report["timings_s"]) >= {"capture", "onnx_export", "verify", "total"}


def _tree_bytes(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, root)] = open(p, "rb").read()
    return files


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_compiling_twice_gives_byte_identical_artifacts(target, zoo_artifact, tmp_path):
    """CI caches and diffs artifacts: model, golden files and plugin definitions must not drift (the first
    compile is the run's shared one, often made by another process)."""
    a = zoo_artifact("deepseek_v3", target)
    b = _compile("moec.zoo:deepseek_v3", str(tmp_path / "b"), target=target)
    fa, fb = _tree_bytes(a.out_dir), _tree_bytes(b.out_dir)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name != "report.json":  # timings differ run to run
            assert fa[name] == fb[name], name


@pytest.mark.parametrize("kw", [dict(extra={"quant": "int4"}), dict(target="tensorrt")],
                         ids=["qmoe-int4", "tensorrt"])
def test_routing_given_by_the_caller_lowers_exactly(kw, out_dir):
    """Experts fused on their own get the caller's routing as it comes -- an expert named twice, "no expert"
    (id E), all-zero and negative weights (handwritten 'routed_by_caller'); every lowering matches its
    reference (QMoE: negative weights through a second QMoE under an If; the plugin: distinct ids)."""
    result = _compile("moec.zoo:routed_by_caller_moe", out_dir, **kw)
    report = result.report
    assert report["numerics"]["passed"], report["numerics"]
    [layer] = report["moe_layers"]["layers"]
    assert layer["fused"] and layer["path"].endswith("moe.experts") and layer.get("lowered_to")

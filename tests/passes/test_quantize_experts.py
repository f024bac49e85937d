"""quantize_experts + lower_moe_qmoe: QMoE artifacts equal the dequantized reference; errors reported."""

import itertools
import os
import re
import sys

import onnx
import pytest
import torch

from moec.errors import AccuracyBudgetError, VerificationError
from moec.pipeline import CompileOptions, compile
from moec.quant import QuantError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "property"))
from reference_moe import MoEConfig, ReferenceMoE  # noqa: E402

pytestmark = pytest.mark.slow
DYN = ({0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=64)},)


class Model(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.moe = ReferenceMoE(cfg, 0)

    def forward(self, x):
        return self.moe(x) + x


def _compile(out, gated=True, tolerance=1e-4, **quant):
    cfg = MoEConfig(experts=8, top_k=2, hidden=128, inter=128, scoring="sigmoid", renormalize=False,
                    activation="silu" if gated else "relu", gated=gated, expert_bias=True, shared=True)
    return compile(Model(cfg).eval(), (torch.randn(2, 5, 128),), DYN,
                   options=CompileOptions(out=out, extra=quant, tolerance=tolerance))


CASES = [(bits, block, asym) for bits, block, asym in itertools.product(
    ("int4", "int8"), (None, 16, 32, 64, 128), (False, True)) if not (bits == "int8" and block)]
# 2-bit: per row and block 16 run on dequantized weights; blocks of 32+ on ORT's LUT GEMM (tested below)
CASES += [("int2", block, asym) for block, asym in itertools.product((None, 16), (False, True))]
RATIO = {"int8": 3, "int4": 5, "int2": 7}  # fp32 bytes / quantized bytes, at least (codes + scales)
ERROR = {"int8": 0.02, "int4": 0.2, "int2": 0.8}  # a layer's relative L2 against fp32, at most


@pytest.mark.parametrize("bits,block,asym", CASES)
def test_qmoe_artifact_equals_dequantized_reference(bits, block, asym, tmp_path):
    r = _compile(str(tmp_path / "a"), quant=bits, block_size=block, asymmetric=asym).report
    exact = r["numerics"]["vs_dequantized_reference"]
    assert exact["tolerance_rel_l2"] == 1e-4 and exact["passed"]
    assert max(i["rel_l2"] for i in exact["inputs"]) < 1e-5
    q = r["quantization"]
    assert q["weight_bytes_quantized"] < q["weight_bytes_fp32"] / RATIO[bits]
    layer = q["layers"][0]
    assert 0 < layer["rel_l2_vs_fp32"] < ERROR[bits]
    assert layer["cosine_vs_fp32"] > (0.6 if bits == "int2" else 0.98)
    model = onnx.load(os.path.join(str(tmp_path / "a"), "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "QMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["expert_weight_bits"] == int(bits[3:]) and attrs.get("block_size", 0) == (block or 0)
    assert len(node.input) == 15 and node.input[14]  # router_weights carry the exact mixing weights
    assert bool(node.input[11]) == asym  # zero points only when asymmetric


@pytest.mark.parametrize("bits,block", [("int8", 32), ("int2", 32), ("int2", 128)])
def test_blockwise_kernels_that_quantize_activations_are_flagged(bits, block, tmp_path):
    r = _compile(str(tmp_path / "a"), quant=bits, block_size=block).report
    q = r["quantization"]
    assert q["onnxruntime_quantizes_activations"] and q["tolerance_vs_dequantized"] == 3e-2
    assert ("LUT GEMM" if bits == "int2" else "no fp32 kernel") in q["activations_rounded"]["why"]
    worst = max(i["rel_l2"] for i in r["numerics"]["vs_dequantized_reference"]["inputs"])
    assert 1e-4 < worst < 3e-2  # beyond fp32 rounding (so the flag is needed), within the looser check


def test_activation_rounding_past_the_check_says_why_and_how_to_get_past_it(tmp_path, monkeypatch):
    """ONNX Runtime's rounding of activations can exceed the 3e-2 check (0.0327 measured on a correlated tiny
    Qwen3-MoE at int2 block 32): here the check is made tighter than this model's rounding. The compile fails
    naming the cause, the exact paths instead and a --tolerance that accepts the rounding, writing nothing; that
    --tolerance then accepts it (only ever loosening the check) and is what the report records."""
    import moec.targets.base

    monkeypatch.setattr(moec.targets.base, "ACTIVATIONS_ROUNDED_TOLERANCE", 1e-6)
    with pytest.raises(VerificationError) as failed:
        _compile(str(tmp_path / "a"), quant="int2", block_size=32)
    message = str(failed.value)
    assert "ONNX Runtime rounds the activations here (2-bit weights in blocks of 32 run on its LUT GEMM" in message
    assert "for an exact artifact use --block-size 16 or per row (no --block-size)" in message
    measured = float(re.search(r"relative L2 ([0-9.e-]+)", message).group(1))
    tolerance = float(re.search(r"accept its rounding with --tolerance (\d[\d.e-]*\d)", message).group(1))
    assert measured < tolerance <= 2 * measured and not (tmp_path / "a").exists()
    r = _compile(str(tmp_path / "b"), quant="int2", block_size=32, tolerance=tolerance).report
    assert r["numerics"]["passed"] and r["quantization"]["tolerance_vs_dequantized"] == tolerance


def test_accuracy_budget_fails_naming_the_worst_layer(tmp_path):
    with pytest.raises(AccuracyBudgetError, match=r"int4 per-row .* Worst layers: moe \("):
        _compile(str(tmp_path / "a"), quant="int4", accuracy_budget=1e-3)
    assert not (tmp_path / "a").exists()
    ok = _compile(str(tmp_path / "b"), quant="int8", accuracy_budget=0.05).report
    assert ok["quantization"]["logits_vs_fp32"]["rel_l2"] < 0.05


def test_non_finite_weights_fail_before_writing(tmp_path):
    cfg = MoEConfig(experts=4, top_k=2, hidden=64, inter=32)
    model = Model(cfg).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        model.moe.w_out[2, 3, 5] = float("inf")
    with pytest.raises(QuantError, match="moe.w_out: 1 non-finite"):
        compile(model, (x,), DYN, options=CompileOptions(out=str(tmp_path / "a"), extra={"quant": "int4"},
                                                         validate=False))
    assert not (tmp_path / "a").exists()


def test_cli_quant_flags(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "moec.cli", "compile", "moec.zoo:loop_moe", "--out",
                        str(tmp_path / "q"), "--quant", "int4", "--block-size", "16", "--asymmetric", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantized experts: int4 block 16 asymmetric" in r.stdout and "dequantized reference" in r.stdout
    r = subprocess.run([sys.executable, "-m", "moec.cli", "compile", "moec.zoo:loop_moe", "--out",
                        str(tmp_path / "q2"), "--quant", "int4", "--block-size", "64", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 17 and "does not divide" in r.stderr


def test_calibrated_quantization_runs_gptq_and_stays_exact(tmp_path):
    """--calibration makes the codes GPTQ's (per matrix, where it beats round-to-nearest on held-out tokens); the
    artifact is still exact against its dequantized reference, and the report says what was chosen."""
    import re

    import numpy as np

    # calibration inputs of low effective rank, as a real model's hidden states are: GPTQ wins on the gate/up
    # matrices, whose inputs they are (measured: all 8; the down projections see their nonlinear activations)
    g = np.random.default_rng(0)
    data = (g.standard_normal((64 * 5, 16)) @ g.standard_normal((16, 128))).reshape(64, 5, 128).astype(np.float32)
    np.save(tmp_path / "calibration.npy", data)
    r = _compile(str(tmp_path / "a"), quant="int4", block_size=32, calibration=str(tmp_path / "calibration.npy")).report
    layer = r["quantization"]["layers"][0]
    chosen = re.match(r"gptq on (\d+) of 16 expert matrices", layer["method"])
    assert chosen and int(chosen.group(1)) >= 6, layer["method"]
    assert r["numerics"]["vs_dequantized_reference"]["passed"]
    assert max(i["rel_l2"] for i in r["numerics"]["vs_dequantized_reference"]["inputs"]) < 1e-5
    plain = _compile(str(tmp_path / "b"), quant="int4", block_size=32).report["quantization"]["layers"][0]
    assert plain["method"] == "round-to-nearest"


def test_calibration_halves_the_logits_error_where_hidden_states_are_correlated(tmp_path):
    """The issue's target on a transformers model: calibrated int4 at most half round-to-nearest's logits error
    against fp32. Seeded Gaussian weights give nearly isotropic hidden states, where GPTQ has nothing to
    exploit (README: 0.8-1.0x); power-law singular values (shape_spectrum_, alpha 1) correlate them as a
    trained model's are. Measured 0.41x on this tiny Qwen3-MoE (every expert matrix took GPTQ's codes)."""
    from moec.sources import causal_lm_source
    from moec.zoo import build_hf_model

    def logits_error(out, **extra):
        src = causal_lm_source(build_hf_model("qwen3_moe", spectrum=1.0), "qwen3_moe")
        r = compile(src.module, src.example_args, src.dynamic_shapes,
                    options=CompileOptions(out=str(tmp_path / out), extra={"task": "logits", "quant": "int4",
                                                                           **extra})).report
        assert r["numerics"]["vs_dequantized_reference"]["passed"]  # calibrated codes stay exact in ORT
        return r["quantization"]["logits_vs_fp32"]["rel_l2"], [l["method"] for l in r["quantization"]["layers"]]

    nearest, methods = logits_error("rtn")
    calibrated, chosen = logits_error("gptq", calibration="random:64")
    assert methods == ["round-to-nearest"] * 2 and all(m.startswith("gptq on 16 of 16") for m in chosen), chosen
    assert calibrated <= 0.5 * nearest, (calibrated, nearest)


def test_a_spectrum_keeps_each_matrix_norm_and_singular_vectors():
    from moec.demo import shape_spectrum_

    m = torch.nn.Linear(32, 24, bias=False)
    before = m.weight.detach().clone()
    shape_spectrum_(m, 1.0)
    s = torch.linalg.svdvals(m.weight.detach().double())
    assert torch.allclose(m.weight.norm(), before.norm(), rtol=1e-5)
    assert torch.allclose(s / s[0], torch.arange(1, 25, dtype=torch.float64) ** -1.0, rtol=1e-5)
    shape_spectrum_(m, 0.0)  # alpha 0: unchanged
    assert torch.allclose(s, torch.linalg.svdvals(m.weight.detach().double()))
    with pytest.raises(ValueError, match="spectrum exponent"):
        shape_spectrum_(m, -1.0)


def test_calibration_with_fewer_tokens_than_experts_is_refused(tmp_path):
    from moec.calibration import CalibrationError

    with pytest.raises(CalibrationError, match=r"random:1: 5 calibration tokens reach moe, fewer than its 8 experts"):
        _compile(str(tmp_path / "a"), quant="int4", calibration="random:1")
    assert not os.path.exists(tmp_path / "a")


def test_experts_fused_on_their_own_are_reported_by_the_fusions_name(tmp_path):
    """Experts routed by their caller are fused inside an ExpertsOnly wrapper; the quantization section (and
    --quant auto's choice) names them as the fusion report does, not by the wrapper's inner `.layer`."""
    import moec

    for quant, extra in (("int8", {}), ("auto", {"accuracy_budget": 0.5})):
        report = moec.compile(source="moec.zoo:routed_by_caller_moe", out=str(tmp_path / quant),
                              extra=dict(quant=quant, **extra)).report
        fused = [l["path"] for l in report["moe_layers"]["layers"] if l["fused"]]
        assert fused and [l["path"] for l in report["quantization"]["layers"]] == fused
        if quant == "auto":
            assert list(report["quantization"]["auto"]["choice"]) == fused

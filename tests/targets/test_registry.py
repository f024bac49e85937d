"""Targets are pluggable: one registered from the test suite compiles the demo; broken pass contracts
stop the compile naming the pass."""

import json
import os

import onnx
import pytest
from torch import nn

from moec import targets
from moec.cli import main
from moec.errors import MoecError, PassContractError
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import EXPERTS_LOWERED, EXPERTS_QUANTIZED
from moec.passes.lowering import lower_each
from moec.pipeline import CompileOptions, compile
from moec.targets.base import ArtifactContext, Target

pytestmark = pytest.mark.slow


class LowerMoEToDenseOps(Pass):
    """Every fused layer as exact dense ONNX ops (all experts on all tokens)."""

    name = "lower_moe_dense"
    ensures = (EXPERTS_LOWERED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        layers = lower_each(module, lambda path, fused, top_k: "the dense-reference target runs every expert")
        return PassResult(module, bool(layers), {}, layers)


class DenseReferenceTarget(Target):
    name = "dense-reference"
    description = "standard ONNX ops only (a test target)"

    def lowering_passes(self, options):
        return [LowerMoEToDenseOps()]

    def write_extras(self, artifact: ArtifactContext):
        with open(os.path.join(artifact.workdir, "dense.txt"), "w") as f:
            f.write(f"{artifact.report['moe_layers']['fused']} layers\n")
        return {"file": "dense.txt"}


class NeedsQuantizedExperts(LowerMoEToDenseOps):
    name = "lower_moe_needs_codes"
    requires = (EXPERTS_QUANTIZED,)  # wrong for a float compile: nothing quantizes first


class ForgetsToLower(Pass):
    name = "lower_moe_forgetful"
    ensures = (EXPERTS_LOWERED,)

    def __call__(self, module, ctx):
        return PassResult(module, False)


class _OneLowering(Target):
    def __init__(self, name, lowering):
        self.name, self.lowering = name, lowering

    def lowering_passes(self, options):
        return [self.lowering]


@pytest.fixture
def registered():
    added = []

    def add(target):
        added.append(target.name)
        return targets.register(target)

    yield add
    for name in added:
        targets.unregister(name)


def test_a_target_registered_from_the_tests_compiles_the_demo(registered, tmp_path, capsys):
    registered(DenseReferenceTarget())
    out = tmp_path / "dense"
    assert main(["compile", "--target", "dense-reference", "--out", str(out), "--quiet"]) == 0
    report = json.load(open(out / "report.json"))
    assert report["target"] == "dense-reference" and report["numerics"]["passed"]
    assert report["dense-reference"] == {"file": "dense.txt"} and (out / "dense.txt").read_text() == "4 layers\n"
    layers = report["moe_layers"]["layers"]
    assert len(layers) == 4 and all(l["lowered_to"].startswith("dense ONNX ops") for l in layers)
    assert all(l["lowering_note"] == "the dense-reference target runs every expert" for l in layers)
    model = onnx.load(str(out / "model.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no contrib op, no plugin
    assert [p["name"] for p in report["passes"]] == ["fold_weight_qdq", "fuse_moe", "lower_moe_dense"]
    assert "memory" in report  # planned without target hooks (no expert nodes: no workspace)
    assert report["memory"]["profiles"]["max"]["workspace_bytes"] == 0
    assert main(["verify", str(out)]) == 0  # `moec verify` runs it through the target's (default) hooks


def test_the_cli_offers_registered_targets(registered, capsys):
    registered(DenseReferenceTarget())
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    assert "dense-reference" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compile", "--target", "nowhere"])
    assert "invalid choice: 'nowhere'" in capsys.readouterr().err


def test_a_lowering_with_wrong_preconditions_fails_with_its_name(registered, tmp_path, capsys):
    registered(_OneLowering("needs-codes", NeedsQuantizedExperts()))
    with pytest.raises(PassContractError, match=r"pass 'lower_moe_needs_codes' requires 'experts_quantized'"):
        compile(options=CompileOptions(out=str(tmp_path / "a"), target="needs-codes"))
    assert main(["compile", "--target", "needs-codes", "--out", str(tmp_path / "b"), "--quiet"]) == 21
    assert "lower_moe_needs_codes" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".moec-tmp")]


def test_a_lowering_that_leaves_fused_layers_breaks_its_promise(registered, tmp_path):
    registered(_OneLowering("forgetful", ForgetsToLower()))
    with pytest.raises(PassContractError, match=r"pass 'lower_moe_forgetful' promises 'experts_lowered'.*"
                                                r"model\.model\.layers\.0\.mlp"):
        compile(options=CompileOptions(out=str(tmp_path / "a"), target="forgetful"))


def test_disabling_a_pass_another_requires_names_both(tmp_path):
    with pytest.raises(PassContractError, match=r"pass 'lower_moe_qmoe' requires 'experts_quantized'.*"
                                                r"established by quantize_experts, disabled by --no-pass"):
        compile(options=CompileOptions(out=str(tmp_path / "a"), disabled_passes=["quantize_experts"],
                                       extra={"quant": "int4"}))


def test_an_option_of_another_target_is_refused_naming_it(tmp_path):
    with pytest.raises(MoecError, match=r"--tensorrt-aot .* option of --target tensorrt, not onnxruntime"):
        compile(options=CompileOptions(out=str(tmp_path / "a"), extra={"tensorrt_aot": True}))
    with pytest.raises(MoecError, match=r"--accuracy-level .* option of --target onnxruntime, not tensorrt"):
        compile(options=CompileOptions(out=str(tmp_path / "b"), target="tensorrt",
                                       extra={"quant": "int4", "accuracy_level": 4}))
    assert not os.listdir(tmp_path)


def test_unknown_target_names_the_choices(tmp_path):
    with pytest.raises(MoecError, match="unknown target 'nowhere'; choose one of onnxruntime, tensorrt"):
        compile(options=CompileOptions(out=str(tmp_path / "a"), target="nowhere"))

"""The TensorRT back end behind its capability check: what runs here, and what skips (with the reason)."""

import os
import subprocess
import sys

import pytest

from moec.plugins.tensorrt_plugin import TensorRTUnavailable, register_plugins, tensorrt_available
from moec.targets.tensorrt.engine import (EngineSettings, cache_key, capability, profiles_from_report,
                                          tensorrt_version_problem)

HAVE_TRT = tensorrt_available()[0]


def test_capability_says_why_not():
    cap = capability()
    if not HAVE_TRT:
        assert not cap.tensorrt and "TensorRT is not installed" in cap.reason and not cap.imoe_layer


@pytest.mark.parametrize("version,ok", [("10.9.0.34", True), ("10.16.1", True), ("11.1.0", True),
                                        ("10.8.0.43", False), ("8.6.1", False), ("garbage", False)])
def test_tensorrt_older_than_10_9_is_refused_with_the_reason(version, ok):
    """10.8 lacks tensorrt.plugin.aot_impl and SymIntExprs (first in 10.9): refuse it up front."""
    problem = tensorrt_version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert version in problem


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the unavailable path can't be exercised")
def test_register_plugins_raises_with_the_reason():
    with pytest.raises(TensorRTUnavailable, match="not installed"):
        register_plugins()


def test_engine_cache_key_is_stable_and_tracks_settings(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model bytes")
    s = EngineSettings({"x": ((1, 2), (2, 8), (8, 512))}, 1 << 30)
    k = cache_key(str(path), s, "10.8", "H100")
    assert k == cache_key(str(path), s, "10.8", "H100")
    assert k != cache_key(str(path), EngineSettings(s.profiles, 2 << 30), "10.8", "H100")
    assert k != cache_key(str(path), s, "10.9", "H100") != cache_key(str(path), s, "10.8", "B200")


@pytest.mark.slow
def test_profiles_come_from_the_memory_plan_and_build_engine_explains(tmp_path):
    from moec.pipeline import CompileOptions, compile

    res = compile(source="moec.zoo:qwen3_moe", options=CompileOptions(
        out=str(tmp_path / "a"), target="tensorrt", extra={"max_shape": {"batch": 4, "seq": 256}}))
    prof = profiles_from_report(os.path.join(res.out_dir, "model.onnx"), res.report)
    assert prof["input_ids"] == ((1, 2), (2, 8), (4, 256))
    r = subprocess.run([sys.executable, "-m", "moec.cli", "build-engine", res.out_dir], capture_output=True,
                       text=True, timeout=120)
    if HAVE_TRT and capability().gpu:  # pragma: no cover - GPU hosts only
        assert r.returncode == 0 and os.path.exists(os.path.join(res.out_dir, "model.plan"))
    else:
        assert r.returncode == 20 and "cannot build a TensorRT engine here" in r.stderr


NO_ENGINE_HOST = "TensorRT is not installed here (PyPI's tensorrt needs NVIDIA's index and a GPU host); runs there"


@pytest.mark.skipif(not (HAVE_TRT and capability().gpu), reason=NO_ENGINE_HOST)
@pytest.mark.parametrize("imoe", [True, False])
def test_engine_builds_and_matches_golden_outputs(tmp_path, imoe):  # pragma: no cover - GPU hosts only
    """The engine (IMoELayer where the GPU has it, else the plugin) reproduces eager PyTorch's outputs."""
    from moec.pipeline import CompileOptions, compile
    from moec.targets.tensorrt.engine import build_engine
    from moec.verify import verify

    res = compile(source="moec.zoo:qwen3_moe", options=CompileOptions(out=str(tmp_path / "a"), target="tensorrt"))
    out = build_engine(res.out_dir, cache_dir=str(tmp_path / "cache"), imoe=imoe)
    assert os.path.exists(os.path.join(res.out_dir, out["path"])) and out["cache"] == "miss"
    if not imoe:
        assert out["imoe"]["swapped"] == [] and "disabled" in out["imoe"]["why_not"]
    elif capability().imoe_layer and not out["imoe"]["fallback"]:
        assert len(out["imoe"]["swapped"]) == 2  # qwen3_moe's two SiLU MoE layers
    result = verify(res.out_dir, engine=True)
    assert result.passed, [c.reason for c in result.checks if not c.passed]
    again = build_engine(res.out_dir, cache_dir=str(tmp_path / "cache"), imoe=imoe)
    assert again["cache"] == "hit" and again["key"] == out["key"] and again["imoe"] == out["imoe"]


def test_autotune_types_cover_every_plugin_input_and_the_output():
    from moec.targets.tensorrt.plugin_spec import PLUGIN
    from moec.plugins.tensorrt_plugin import type_combination

    for bits in (0, 4):
        types = [t.strip() for t in type_combination(bits).split(",")]
        assert len(types) == len(PLUGIN.inputs) + 1
        by_name = dict(zip(PLUGIN.inputs + ("output",), types))
        assert by_name["topk_ids"] == "INT32" and by_name["accumulator"] == by_name["output"] == "FP32"
        assert by_name["w_gate_up"] == ("UINT8" if bits else "FP32|FP16|BF16")

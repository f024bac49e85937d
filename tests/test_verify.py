"""`moec verify` from the command line: tables, JUnit, tampered artifacts, and every exit code."""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import onnx
import pytest
from onnx import numpy_helper

from moec.pipeline import CompileOptions, compile


def moec(*args):
    return subprocess.run([sys.executable, "-m", "moec.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("v") / "artifact")
    compile(source="moec.zoo:loop_moe", options=CompileOptions(out=out))
    return out


def test_fresh_artifact_passes_with_junit(artifact, tmp_path):
    r = moec("verify", artifact, "--junit", str(tmp_path / "j.xml"))
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and "rel_l2" in r.stdout
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"


def test_engine_verification_says_what_is_missing(artifact, tmp_path):
    from moec.targets.tensorrt.engine import capability

    r = moec("verify", artifact, "--engine")
    assert r.returncode == 12 and "no TensorRT engine" in r.stderr and "moec build-engine" in r.stderr
    r = moec("verify", artifact, "--engine", "--server", "127.0.0.1:1")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    cap = capability()
    if not (cap.tensorrt and cap.gpu):
        with_plan = str(tmp_path / "with_plan")
        shutil.copytree(artifact, with_plan)
        open(os.path.join(with_plan, "model.plan"), "wb").write(b"not an engine")
        r = moec("verify", with_plan, "--engine")
        assert r.returncode == 12 and "cannot run the TensorRT engine" in r.stderr and cap.reason in r.stderr


def test_tampered_artifact_fails(artifact, tmp_path):
    bad = str(tmp_path / "tampered")
    shutil.copytree(artifact, bad)
    model = onnx.load(os.path.join(bad, "model.onnx"))
    init = next(i for i in model.graph.initializer if "fc2" in i.name)  # one expert weight
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, os.path.join(bad, "model.onnx"))
    r = moec("verify", bad, "--junit", str(tmp_path / "j.xml"))
    assert r.returncode == 10 and "FAIL" in r.stdout and "verification failed" in r.stderr
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("failures") != "0"


def test_missing_golden_and_missing_artifact(artifact, tmp_path):
    r = moec("verify", artifact, "--golden", str(tmp_path / "none"))
    assert r.returncode == 11 and "no golden manifest" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = moec("verify", str(empty), "--golden", os.path.join(artifact, "golden"))
    assert r.returncode == 12 and "no model.onnx" in r.stderr


def test_golden_that_does_not_fit_the_artifact(artifact, tmp_path):
    # a golden recorded for a token model (int64 input_ids) against a float-input artifact
    r = moec("golden", "record", "moec.zoo:qwen3_moe", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    r = moec("verify", artifact, "--golden", str(tmp_path / "g"))
    assert r.returncode == 13 and "golden inputs" in r.stderr


def test_corrupt_golden_file(artifact, tmp_path):
    g = str(tmp_path / "g")
    shutil.copytree(os.path.join(artifact, "golden"), g)
    with open(os.path.join(g, "probe0.output.output.npy"), "ab") as f:
        f.write(b"x")
    r = moec("verify", artifact, "--golden", g)
    assert r.returncode == 11 and "sha256" in r.stderr


def test_unreachable_server(tmp_path, artifact):
    r = moec("verify", "--server", "127.0.0.1:9", "--golden", os.path.join(artifact, "golden"))
    assert r.returncode == 14 and "unreachable" in r.stderr

"""Golden files: deterministic, self-checking, and the committed ones still gate the compiler."""

import json
import os
import shutil

import numpy as np
import pytest

from moec import golden
from moec.errors import GoldenError, OutputExistsError
from moec.pipeline import CompileResult
from moec.verify import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe():
    return golden.Probe("probe0", {"x": np.arange(6, dtype=np.int64).reshape(2, 3)},
                        {"y": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)})


def test_recording_twice_is_byte_identical(tmp_path):
    a = golden.record(str(tmp_path / "a"), [_probe()], model={"source": "t"})
    b = golden.record(str(tmp_path / "b"), [_probe()], model={"source": "t"})
    for name in os.listdir(a):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    with pytest.raises(OutputExistsError):
        golden.record(str(tmp_path / "a"), [_probe()], model={"source": "t"})


def test_load_checks_every_file(tmp_path):
    path = golden.record(str(tmp_path / "g"), [_probe()], model={"source": "t"})
    g = golden.load(path)
    assert g.tolerance == 1e-4 and g.probes[0].inputs["x"].dtype == np.int64

    bad = str(tmp_path / "corrupt")
    shutil.copytree(path, bad)
    arr = np.load(os.path.join(bad, "probe0.output.y.npy"))
    arr[0, 0] += 1
    np.save(os.path.join(bad, "probe0.output.y.npy"), arr)
    with pytest.raises(GoldenError, match="sha256"):
        golden.load(bad)

    os.remove(os.path.join(bad, "probe0.output.y.npy"))
    with pytest.raises(GoldenError, match="missing"):
        golden.load(bad)
    with pytest.raises(GoldenError, match="no golden manifest"):
        golden.load(str(tmp_path / "nothing"))
    with open(os.path.join(bad, "manifest.json"), "w") as f:
        f.write("{")
    with pytest.raises(GoldenError, match="not valid JSON"):
        golden.load(bad)


@pytest.mark.parametrize("edit", [
    lambda m: m["tolerance"].update(rel_l2=1.0),  # a loosened gate
    lambda m: m["probes"][0]["outputs"]["y"].update(dtype="float64"),
    lambda m: m["model"].update(weights_sha256="0" * 64),
    lambda m: m.update(precision="int4"),
])
def test_an_edited_manifest_is_refused(edit, tmp_path):
    """The manifest carries its own sha256: any edit is caught, not only the .npy files'."""
    path = golden.record(str(tmp_path / "g"), [_probe()], model={"source": "t", "weights_sha256": "a" * 64})
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["manifest_sha256"] == golden.manifest_digest(manifest)
    edit(manifest)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(GoldenError, match="does not match its own sha256"):
        golden.load(path)
    del manifest["manifest_sha256"]  # a damaged or removed digest is refused too
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(GoldenError, match="has no manifest_sha256"):
        golden.load(path)
    manifest["format"] = "moec-golden/1"  # recorded before manifests carried a digest: still loads
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    golden.load(path)


def test_compare_reports_shape_mismatch_as_failure():
    g = golden.Golden("x", [_probe()], "fp32", 1e-4)
    checks = golden.compare(g, g.probes[0], {"y": np.zeros((3, 2), np.float32)}, 1e-4)
    assert not checks[0].passed and "shape" in checks[0].reason
    checks = golden.compare(g, g.probes[0], {"y": g.probes[0].outputs["y"] * (1 + 1e-6)}, 1e-4)
    assert checks[0].passed


COMMITTED = {"mixtral-demo": None, "qwen3_moe": "moec.zoo:qwen3_moe", "deepseek_v3": "moec.zoo:deepseek_v3",
             "gpt_oss": "moec.zoo:gpt_oss"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMITTED))
def test_committed_goldens_gate_fresh_compiles(name, zoo_artifact, demo_artifact):
    """The project's own reference models: what we compile today still matches what was recorded (the run's
    shared compiles, which test_pipeline and test_bad_input read too)."""
    gdir = os.path.join(REPO, "golden", name)
    manifest = json.load(open(os.path.join(gdir, "manifest.json")))
    if COMMITTED[name] is None:
        result = CompileResult(str(demo_artifact), json.load(open(demo_artifact / "report.json")))
    else:
        result = zoo_artifact(COMMITTED[name].split(":")[1])
    # the model that was recorded is the model we compiled (same seeded weights)
    assert result.report["model"]["weights_sha256"] == manifest["model"]["weights_sha256"]
    res = verify(result.out_dir, gdir)
    assert res.passed, [c for c in res.checks if not c.passed]


def test_golden_record_for_a_mixed_precision_artifact_takes_its_tolerance(tmp_path, capsys):
    """--precision auto (a --quant auto artifact) has no default tolerance: it needs --tolerance, which is kept."""
    from moec import cli

    out = tmp_path / "g"
    assert cli.main(["golden", "record", "moec.zoo:qwen3_moe", "--out", str(out), "--precision", "auto"]) == 2
    assert "--tolerance" in capsys.readouterr().err and not out.exists()
    assert cli.main(["golden", "record", "moec.zoo:qwen3_moe", "--out", str(out), "--precision", "auto",
                     "--tolerance", "0.08"]) == 0
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["precision"] == "auto" and manifest["tolerance"]["rel_l2"] == 0.08

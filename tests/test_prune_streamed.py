"""--prune-experts FRACTION out of core: experts ranked on the routing the calibration data has as each layer
streams, removed from the graph (captured with the kept count) and from the verification's reference; the
artifact is the in-memory compile's."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx.numpy_helper import to_array

from moec import zoo
from moec.cli import main
from test_mxfp4_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen3_moe")
    zoo.build_hf_model("qwen3_moe").to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


def _compile(source, out, mode, *extra):
    return main(["compile", source, "--out", out, "--out-of-core", mode, "--task", "logits", "--quiet",
                 "--calibration", "random:16", *extra])


def _initializers(out):
    return {t.name: to_array(t, base_dir=out) for t in onnx.load(os.path.join(out, "model.onnx")).graph.initializer}


def _both_modes(source, tmp_path, *flags):
    """Compiled out of core and in memory: ({mode: initializers}, {mode: report})."""
    arts, reports = {}, {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        assert _compile(source, out, mode, *flags) == 0
        arts[mode], reports[mode] = _initializers(out), json.load(open(os.path.join(out, "report.json")))
    return arts, reports


def _same_distance(on: dict, off: dict) -> None:
    """The pruned model's distance from the unpruned one (the report's `pruning`), measured out of core as in memory:
    both full-precision models' logits on the calibration data."""
    assert on["vs_unpruned_on"] == "the calibration data (pruning alone, as in memory)"
    assert 0 < on["vs_unpruned"]["rel_l2"] < 2
    assert on["vs_unpruned"]["rel_l2"] == pytest.approx(off["vs_unpruned"]["rel_l2"], rel=1e-5)
    assert on["vs_unpruned"]["top1_agreement"] == off["vs_unpruned"]["top1_agreement"]


def test_the_streamed_pruned_artifact_is_the_in_memory_one(checkpoint, tmp_path):
    arts, reports = _both_modes(checkpoint, tmp_path, "--prune-experts", "0.25")
    on, off = reports["on"]["pruning"], reports["off"]["pruning"]
    # the same experts go from each layer, ranked on the same routing (2 of 8 at 0.25)
    assert [l["removed"] for l in on["layers"]] == [l["removed"] for l in off["layers"]]
    assert all(len(l["removed"]) == 2 and l["experts_after"] == 6 for l in on["layers"]) and len(on["layers"]) == 2
    assert (on["experts_after"], on["weight_bytes_after"]) == (off["experts_after"], off["weight_bytes_after"])
    assert on["weight_bytes_after"] == on["weight_bytes_before"] * 6 // 8
    _same_distance(on, off)
    # every weight the two artifacts share is the same bytes, the routers' rows and stacked experts included
    shared = set(arts["on"]) & set(arts["off"])
    experts = [n for n in shared if arts["on"][n].ndim == 3]
    assert experts and all(arts["on"][n].shape[0] == 6 for n in experts)
    assert len(shared) >= 0.9 * len(arts["off"])
    assert all(np.array_equal(arts["on"][n], arts["off"][n]) for n in shared)
    n = reports["on"]["numerics"]
    assert n["passed"] and n["against"] == "the pruned model" and n["end_to_end"]["rel_l2"] < 1e-5


def test_a_fraction_the_routing_cannot_take_is_refused_before_any_work(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compile(checkpoint, str(out), "on", "--prune-experts", "0.8") == 23
    err = capsys.readouterr().err
    assert "model.layers.0.mlp would keep 2 of its 8 experts" in err and "largest fraction" in err
    assert not out.exists()


def test_auto_is_refused_by_name(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compile(checkpoint, str(out), "on", "--prune-experts", "auto", "--accuracy-budget", "0.5") == 2
    assert "--prune-experts auto (a FRACTION streams)" in capsys.readouterr().err
    assert not out.exists()


def test_pruned_and_calibrated_int4_codes_are_the_in_memory_ones(checkpoint, tmp_path, monkeypatch):
    """With --quant the kept experts alone are read and coded, GPTQ on the pruned model's activations (the
    calibration data carried through the pruned layers beside the unpruned ones that rank them): the codes are
    the in-memory compile's byte for byte."""
    from moec.calibrate_streamed import LayerInputs

    runs, run = [], LayerInputs._run

    def spy(self, key, *args):
        runs.append(key)
        return run(self, key, *args)

    monkeypatch.setattr(LayerInputs, "_run", spy)
    arts, reports = _both_modes(checkpoint, tmp_path, "--prune-experts", "0.25", "--quant", "int4")
    assert runs == ["layers.0", "layers.0", "layers.1", "layers.1"]  # unpruned, then pruned, per layer
    on, off = (reports[m]["quantization"] for m in ("on", "off"))
    assert [l["removed"] for l in reports["on"]["pruning"]["layers"]] == \
        [l["removed"] for l in reports["off"]["pruning"]["layers"]]
    codes = [n for n in arts["on"] if n.endswith(("mlp.fc1", "mlp.fc2", "fc1_scales", "fc2_scales"))]
    assert len(codes) == 8 and all(arts["on"][n].shape[0] == 6 for n in codes)
    assert all(np.array_equal(arts["on"][n], arts["off"][n]) for n in codes)
    assert [l["method"] for l in on["layers"]] == [l["method"] for l in off["layers"]]
    assert on["logits_vs_fp32_against"].startswith("the unpruned")
    _same_distance(reports["on"]["pruning"], reports["off"]["pruning"])  # pruning alone, as in memory
    n = reports["on"]["numerics"]
    assert n["passed"] and n["inputs"][0]["rel_l2"] < 1e-5 and n["against"] == "the pruned dequantized reference"


def test_a_checkpoints_own_codes_are_pruned_as_in_memory(tmp_path):
    """GPT-OSS MXFP4 experts (tests/test_mxfp4_checkpoint.py's checkpoint): the kept experts' codes are the
    checkpoint's, read by their original index; and the pruned model is measured against the unpruned checkpoint,
    not against itself."""
    path = str(tmp_path / "ckpt")
    write_checkpoint(path)
    arts, reports = _both_modes(path, tmp_path, "--prune-experts", "0.5")
    on, off = reports["on"]["pruning"], reports["off"]["pruning"]
    assert [l["removed"] for l in on["layers"]] == [l["removed"] for l in off["layers"]]
    assert all(len(l["removed"]) == 2 for l in on["layers"])
    shared = set(arts["on"]) & set(arts["off"])
    codes = [n for n in shared if n.endswith(("fc1", "fc2", "fc1_scales", "fc2_scales"))]
    assert len(codes) == 8 and all(arts["on"][n].shape[0] == 2 for n in codes)
    assert [n for n in shared if not np.array_equal(arts["on"][n], arts["off"][n])] == []
    assert on["vs_unpruned"]["rel_l2"] > 1e-2 and reports["on"]["numerics"]["passed"]
    _same_distance(on, off)


def test_a_budget_pruning_exceeds_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    """Checked as soon as the data went through every layer of both models, before the verification runs."""
    import moec.verify_layers

    verified, verify = [], moec.verify_layers.verify_layer_by_layer
    monkeypatch.setattr(moec.verify_layers, "verify_layer_by_layer",
                        lambda *a, **k: verified.append(1) or verify(*a, **k))
    out = tmp_path / "out"
    assert _compile(checkpoint, str(out), "on", "--prune-experts", "0.5", "--accuracy-budget", "0.001") == 16
    assert "against the unpruned model on the calibration data" in capsys.readouterr().err and not verified
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_quant_auto_measures_the_pruned_model_and_writes_the_in_memory_artifact(checkpoint, tmp_path):
    """--quant auto with --prune-experts out of core: the experts each layer loses are chosen in the run that solves
    GPTQ's codes at every precision (on the pruned model's states), the pruning's distance measured there as in
    memory (both models' logits on the calibration data), and the search then measures the pruned model: the
    in-memory compile's pruning, distance, sensitivities, choice and codes, byte for byte."""
    flags = ("--prune-experts", "0.25", "--quant", "auto", "--accuracy-budget", "0.3")
    arts, reports = _both_modes(checkpoint, tmp_path, *flags)
    on, off = reports["on"], reports["off"]
    assert [l["removed"] for l in on["pruning"]["layers"]] == [l["removed"] for l in off["pruning"]["layers"]]
    assert all(len(l["removed"]) == 2 for l in on["pruning"]["layers"])
    _same_distance(on["pruning"], off["pruning"])
    auto, want = on["quantization"]["auto"], off["quantization"]["auto"]
    assert auto["choice"] == {k.removeprefix("model."): v for k, v in want["choice"].items()}
    assert len(set(auto["choice"].values())) == 2  # a mixed choice: the budget spent unevenly
    for path, errors in auto["sensitivity"].items():
        assert errors == pytest.approx(want["sensitivity"]["model." + path], rel=1e-4)
    # the search's error is against the pruned model, as the in-memory compile's logits_vs_fp32 is
    assert auto["measured_rel_l2"] == pytest.approx(off["quantization"]["logits_vs_fp32"]["rel_l2"], rel=1e-4)
    assert auto["measured_against"] == "the pruned full-precision model" and "the pruned model" in auto["measured_on"]
    assert on["quantization"]["weight_bytes_quantized"] == off["quantization"]["weight_bytes_quantized"]
    codes = [n for n in arts["on"] if n.endswith(("mlp.fc1", "mlp.fc2", "fc1_scales", "fc2_scales"))]
    assert len(codes) == 8 and all(arts["on"][n].shape[0] == 6 for n in codes)
    assert all(arts["on"][n].dtype == arts["off"][n].dtype and np.array_equal(arts["on"][n], arts["off"][n])
               for n in codes)
    n = on["numerics"]
    assert n["passed"] and n["inputs"][0]["rel_l2"] < 1e-5 and n["against"] == "the pruned dequantized reference"


def test_quant_auto_with_pruning_over_the_budget_stops_before_the_search(checkpoint, tmp_path, monkeypatch, capsys):
    """Pruning alone past --accuracy-budget (0.255 on the calibration data at 0.25): refused once it is measured,
    before any pass of the precision search, as the in-memory pass refuses it before quantizing."""
    from moec.measure_precision_streamed import StreamedErrors

    searched = []
    monkeypatch.setattr(StreamedErrors, "__call__", lambda self, choices: searched.append(choices))
    out = tmp_path / "out"
    assert _compile(checkpoint, str(out), "on", "--prune-experts", "0.25", "--quant", "auto",
                    "--accuracy-budget", "0.1") == 16
    err = capsys.readouterr().err
    assert "pruning 0.25 of the experts (by contribution) moves the logits by relative L2 0.255" in err
    assert "against the unpruned model on the calibration data" in err and "model.layers.0.mlp" in err
    assert searched == [] and not out.exists() and sorted(os.listdir(tmp_path)) == []

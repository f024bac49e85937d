"""segmented_run: an artifact executed one decoder layer at a time gives what one session gives."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moec.cli import main
from moec.segmented_run import run_segmented, split


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seg") / "a")
    assert main(["compile", "moec.zoo:deepseek_v3", "--out", out, "--task", "logits", "--quiet"]) == 0
    return os.path.join(out, "model.onnx")


def test_segments_follow_the_decoder_layers(artifact):
    segments = split(onnx.load(artifact, load_external_data=False).graph)
    names = [s.name for s in segments]
    assert [n for n in names if n != "other"] == ["layers.0", "layers.1", "layers.2"]
    assert names[0] == "other" and names[-1] == "other"  # embeddings and masks; the final norm and head
    assert sum(len(s.nodes) for s in segments) == len(onnx.load(artifact, load_external_data=False).graph.node)
    for s in segments[1:-1]:
        assert s.initializers and s.inputs and s.outputs  # each layer reads its own weights, hands on its states


def test_the_segmented_run_equals_one_session(artifact):
    ids = np.random.default_rng(0).integers(0, 128, (2, 9)).astype(np.int64)
    whole = ort.InferenceSession(artifact).run(None, {"input_ids": ids})[0]
    run = run_segmented(artifact, {"input_ids": ids})
    got = run.outputs["logits"]
    # the same nodes; ONNX Runtime only fuses differently across a segment's edge (float rounding)
    assert got.shape == whole.shape and np.linalg.norm(got - whole) / np.linalg.norm(whole) < 1e-6
    assert not [f for f in os.listdir(os.path.dirname(artifact)) if f.startswith(".segment")]
    assert {s.name for s, _ in run.handed_on} >= {"layers.0", "layers.1", "layers.2"}

"""--quant auto out of core: many precision choices measured in one pass over the checkpoint, a layer at a time."""

import json
import os
from collections import Counter

import pytest
import torch

from moec import zoo
from moec.cli import main
from moec.measure_precision_streamed import StreamedErrors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen3_moe")
    zoo.build_hf_model("qwen3_moe").to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


def _compile(path, out, budget="0.1"):
    return main(["compile", path, "--out", out, "--out-of-core", "on", "--task", "logits", "--quiet", "--quant",
                 "auto", "--accuracy-budget", budget])


@pytest.fixture(scope="module")
def streamed(checkpoint, tmp_path_factory):
    """The out-of-core --quant auto compile, with every batch StreamedErrors measured: (calls, artifact, how many
    times each (layer, precision, expert)'s codes were made rather than read back)."""
    from moec.precision_codes import PrecisionCodes

    calls, made = [], Counter()
    measure, dequantized = StreamedErrors.__call__, PrecisionCodes.dequantized

    def spy(self, choices):
        got = measure(self, choices)
        calls.append((self, choices, got))
        return got

    def counted(self, path, precision, e, w):
        before = self.made
        got = dequantized(self, path, precision, e, w)
        if self.made > before:
            made[(path, precision, e)] += 1
        return got

    out = str(tmp_path_factory.mktemp("art") / "streamed")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(StreamedErrors, "__call__", spy)
        m.setattr(PrecisionCodes, "dequantized", counted)
        assert _compile(checkpoint, out) == 0
    return calls, out, made


def test_int2_codes_are_made_once_and_read_back_in_the_later_passes(streamed):
    """int2's round-to-nearest codes (their clipping search is what costs) are kept on disk between the search's
    passes: each expert's made once however many passes measure it; int4's are made again (cheap, not kept). The
    codes' work directory is gone once the search is done."""
    calls, out, made = streamed
    assert len(calls) >= 3  # the sensitivity batch, a measurement, a round of steps down
    int2 = [k for k in made if k[1] == "int2"]
    assert len(int2) >= 8 and all(made[k] == 1 for k in int2), made
    assert any(n > 1 for k, n in made.items() if k[1] == "int4")
    assert sorted(os.listdir(os.path.dirname(out))) == ["streamed"]


def test_choices_measured_together_are_each_measured_alone_and_each_layer_is_read_once_a_pass(streamed):
    errors, choices, together = streamed[0][0]
    assert len(choices) == 2 * 3 + 3  # the sensitivity batch: each layer at int2/int4/int8, and each uniform
    reads = Counter()
    prepare = errors.prepare
    errors.prepare = lambda model, key: (reads.update([key]), prepare(model, key))
    alone = [errors([c])[0] for c in choices]
    assert alone == pytest.approx(together, rel=1e-6, abs=1e-9)
    assert reads == {"layers.0": len(choices), "layers.1": len(choices)}  # once a pass, whatever it measures
    assert sorted(set(together)) == sorted(together) and min(together) > 0  # every choice moved the logits


def test_a_layer_read_whole_measures_what_a_layer_streamed_expert_by_expert_does(checkpoint, streamed, tmp_path,
                                                                                 monkeypatch):
    """Streamed layers dequantize each expert as it is read; layers read whole get dequantized copies of their
    stacked experts: the same codes, the same errors."""
    from moec.quantize_streamed import StreamedQuantizer

    monkeypatch.setattr(StreamedQuantizer, "_streamable", lambda self, model, planned: None)
    assert _compile(checkpoint, str(tmp_path / "whole")) == 0
    a, b = (json.load(open(os.path.join(d, "report.json")))["quantization"]["auto"]
            for d in (streamed[1], str(tmp_path / "whole")))
    for path, errors in a["sensitivity"].items():
        assert b["sensitivity"][path] == pytest.approx(errors, rel=1e-5)
    assert a["choice"] == b["choice"]

"""--calibration: every accepted form gives the model's own inputs; every bad one is named with file and line."""

import json

import numpy as np
import pytest
import torch

from moec.calibration import BATCH, CalibrationError, check_spec, load_calibration
from moec.sources import LoadedSource


def token_source(vocab=100, batch=2, seq=6):
    dyn = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=512)},)
    return LoadedSource(torch.nn.Identity(), (torch.zeros(batch, seq, dtype=torch.int64),), dyn, "t", ["input_ids"],
                        ["logits"], [], [f"tokens:{vocab}"])


def float_source():
    dyn = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=512)},)
    return LoadedSource(torch.nn.Identity(), (torch.zeros(2, 5, 16),), dyn, "f", ["x"], ["y"], [], ["float"])


def test_random_gives_n_fixed_seed_sequences_shaped_like_the_example():
    a = load_calibration("random:20", token_source())
    b = load_calibration("random:20", token_source())
    assert sum(x[0].shape[0] for x in a.batches) == 20 and all(x[0].shape[0] <= BATCH for x in a.batches)
    assert all(x[0].shape[1] == 6 and x[0].dtype == torch.int64 for x in a.batches)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.batches, b.batches))
    assert int(max(x[0].max() for x in a.batches)) < 100 and a.tokens == sum(x[0].numel() for x in a.batches)


def test_npy_token_ids_two_dims_and_one(tmp_path):
    ids = np.arange(3 * 7).reshape(3, 7) % 50
    np.save(tmp_path / "c.npy", ids)
    cal = load_calibration(str(tmp_path / "c.npy"), token_source())
    assert len(cal.batches) == 1 and torch.equal(cal.batches[0][0], torch.as_tensor(ids))
    np.save(tmp_path / "one.npy", ids[0].astype(np.int32))
    one = load_calibration(str(tmp_path / "one.npy"), token_source())
    assert one.batches[0][0].shape == (1, 7) and one.batches[0][0].dtype == torch.int64


def test_jsonl_lists_and_dicts_of_different_lengths_batch_by_length(tmp_path):
    lines = [[1, 2, 3], {"input_ids": [4, 5, 6]}, [7, 8], "", [9, 10, 11]]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) if x != "" else "" for x in lines) + "\n")
    cal = load_calibration(str(tmp_path / "c.jsonl"), token_source())
    shapes = sorted(tuple(b[0].shape) for b in cal.batches)
    assert shapes == [(1, 2), (3, 3)]
    three = next(b[0] for b in cal.batches if b[0].shape[1] == 3)
    assert three.tolist() == [[1, 2, 3], [4, 5, 6], [9, 10, 11]]


def test_float_npy_for_a_float_input_model(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 9, 16)).astype(np.float32)
    np.save(tmp_path / "h.npy", x)
    cal = load_calibration(str(tmp_path / "h.npy"), float_source())
    assert cal.batches[0][0].shape == (5, 9, 16) and np.array_equal(cal.batches[0][0].numpy(), x)


@pytest.mark.parametrize("spec,says", [
    ("", "empty"), ("random:0", "N must be >= 1"), ("random:x", "random:N"), ("random", "random:N"),
    ("nope.npy", "no such file"),
])
def test_bad_specs_are_refused_before_loading(spec, says):
    with pytest.raises(CalibrationError, match=says) as e:
        check_spec(spec)
    assert e.value.exit_code == 24


def test_unknown_format(tmp_path):
    (tmp_path / "c.txt").write_text("1 2 3\n")
    with pytest.raises(CalibrationError, match=r"c\.txt.*unknown format"):
        check_spec(str(tmp_path / "c.txt"))


@pytest.mark.parametrize("content,says", [
    ("[1, 2]\n[3, 500]\n", r"line 2: token id 500 is outside the model's vocabulary \[0, 100\)"),
    ("[1, 2]\nnot json\n", r"line 2: not JSON"),
    ("[1, 2.5]\n", r"line 1: expected a non-empty list of token ids"),
    ("[]\n", r"line 1: expected a non-empty list"),
    ("\n\n", r"no sequences"),
    ("[-1]\n", r"line 1: token id -1"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, says):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(CalibrationError, match=says) as e:
        load_calibration(str(tmp_path / "c.jsonl"), token_source())
    assert "c.jsonl" in str(e.value)


def test_bad_npy(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(CalibrationError, match="must be integers"):
        load_calibration(str(tmp_path / "f.npy"), token_source())
    np.save(tmp_path / "big.npy", np.array([[1, 2], [3, 100]]))
    with pytest.raises(CalibrationError, match=r"big\.npy', row 1: token id 100"):
        load_calibration(str(tmp_path / "big.npy"), token_source())
    np.save(tmp_path / "h.npy", np.zeros((2, 9, 8), np.float32))
    with pytest.raises(CalibrationError, match=r"row 0: dim 2 is 8, but the model was captured with it fixed at 16"):
        load_calibration(str(tmp_path / "h.npy"), float_source())
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(CalibrationError, match="not a readable .npy"):
        load_calibration(str(tmp_path / "junk.npy"), token_source())
    (tmp_path / "t.jsonl").write_text("[1]\n")
    with pytest.raises(CalibrationError, match="input is float"):
        load_calibration(str(tmp_path / "t.jsonl"), float_source())


@pytest.mark.parametrize("content,says", [
    (b"[1, 2]\n\xff\xfe\n", r"not UTF-8"),
    (b"[1, 99999999999999999999999]\n", r"line 1: a token id does not fit in 64 bits"),
])
def test_undecodable_jsonl(tmp_path, content, says):
    (tmp_path / "c.jsonl").write_bytes(content)
    with pytest.raises(CalibrationError, match=says):
        load_calibration(str(tmp_path / "c.jsonl"), token_source())


def test_npy_that_is_not_numbers_or_not_finite_or_empty(tmp_path):
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(CalibrationError, match="expected a numeric array"):
        load_calibration(str(tmp_path / "s.npy"), float_source())
    x = np.zeros((3, 4, 16), np.float32)
    x[1, 2, 3] = np.nan
    np.save(tmp_path / "n.npy", x)
    with pytest.raises(CalibrationError, match=r"row 1: non-finite"):
        load_calibration(str(tmp_path / "n.npy"), float_source())
    np.save(tmp_path / "e.npy", np.zeros((2, 0, 16), np.float32))
    with pytest.raises(CalibrationError, match=r"row 0: an empty sequence"):
        load_calibration(str(tmp_path / "e.npy"), float_source())


def test_sequences_outside_the_captured_range_are_refused(tmp_path):
    np.save(tmp_path / "long.npy", np.ones((2, 600), np.int64))
    with pytest.raises(CalibrationError, match=r"row 0: dim 1 \(seq\) is 600, outside the range the model accepts "
                                               r"\[2, 512\]"):
        load_calibration(str(tmp_path / "long.npy"), token_source())
    static = token_source()
    static.dynamic_shapes = None  # captured with the example's [2, 6] fixed
    np.save(tmp_path / "seven.npy", np.ones((4, 7), np.int64))
    with pytest.raises(CalibrationError, match=r"row 0: dim 1 is 7, but the model was captured with it fixed at 6"):
        load_calibration(str(tmp_path / "seven.npy"), static)
    np.save(tmp_path / "five.npy", np.ones((5, 6), np.int64))  # fixed batch 2: two batches, one row left over
    cal = load_calibration(str(tmp_path / "five.npy"), static)
    assert [b[0].shape for b in cal.batches] == [(2, 6), (2, 6)] and "1 left over" in cal.description


def test_a_model_that_fails_on_the_data_is_a_calibration_error():
    from moec.analysis.routing_stats import run_calibration_batch

    emb = torch.nn.Embedding(10, 4)
    with pytest.raises(CalibrationError, match=r"fails on calibration batch 3 \(shape \[1, 2\]\).*IndexError"):
        run_calibration_batch(emb, (torch.tensor([[1, 50]]),), 3)

"""The codes --quant auto's out-of-core search measures, kept on disk between its passes (moec.precision_codes)."""

import errno
import os

import numpy as np
import pytest
import torch

from moec.errors import MoecError
from moec.passes.fusion_rules import ExpertWeights
from moec.precision_codes import PrecisionCodes
from moec.quant import QuantSpec, dequantize, quantize

SPECS = {"int2": QuantSpec(2, None, True), "int4": QuantSpec(4, 32, False), "int8": QuantSpec(8, None, True)}


def _expert(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(torch.randn(1, 64, 64, generator=gen), torch.randn(1, 64, 32, generator=gen), None, None,
                         True, "stacked gate|up")


def _rounded(path, precision, e, w):
    return (quantize(w.w_gate_up, SPECS[precision], f"{path}.w_gate_up"),
            quantize(w.w_down, SPECS[precision], f"{path}.w_down"))


def test_codes_read_back_dequantize_exactly_as_made_and_only_kept_ones_are_not_made_again(tmp_path):
    codes = PrecisionCodes(SPECS, str(tmp_path), lambda msg: None, make=_rounded, kept=("int2",))
    w = _expert()
    for precision in SPECS:  # asymmetric int4 in blocks too: zero points packed and read back
        want = [dequantize(q) for q in _rounded("m.mlp", precision, 0, w)]
        for _ in range(2):
            got = codes.dequantized("m.mlp", precision, 0, w)
            assert torch.equal(got.w_gate_up, want[0]) and torch.equal(got.w_down, want[1])
    assert codes.made == 1 + 2 + 2  # int2 made once then read back; int4 and int8 made each time
    directory = codes.directory
    assert os.listdir(directory) == ["0.int2.0.npz"]
    codes.close()
    assert not os.path.exists(directory) and codes.directory is None
    codes.dequantized("m.mlp", "int2", 0, w)  # made again once the store is gone, not kept
    assert codes.made == 6


def test_a_full_disk_stops_the_keeping_of_made_codes_and_refuses_codes_put(tmp_path, monkeypatch):
    said = []
    codes = PrecisionCodes(SPECS, str(tmp_path), said.append, make=_rounded, kept=("int2",))

    def full(file, **arrays):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    w = _expert()
    want = dequantize(_rounded("m.mlp", "int2", 0, w)[0])
    assert torch.equal(codes.dequantized("m.mlp", "int2", 0, w).w_gate_up, want)  # the compile goes on
    assert torch.equal(codes.dequantized("m.mlp", "int2", 0, w).w_gate_up, want)
    assert codes.made == 2 and len(said) == 1 and "no room left" in said[0]
    with pytest.raises(MoecError, match="no room in .* for the experts' codes"):
        codes.put("m.mlp", "int4", 1, _rounded("m.mlp", "int4", 1, w))
    assert os.listdir(codes.directory) == []  # no partial file left
    codes.close()


def test_codes_never_put_and_not_makeable_are_a_bug_said_plainly(tmp_path):
    codes = PrecisionCodes(SPECS, str(tmp_path), lambda msg: None)
    with pytest.raises(RuntimeError, match="expert 3's codes at int4 were never put"):
        codes.dequantized("m.mlp", "int4", 3, _expert())
    codes.close()

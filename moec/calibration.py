"""Calibration data: the token sequences (or inputs) a compile measures the model on.

``--calibration`` takes one of:
  - ``random:N``  N fixed-seed random inputs shaped like the model's example (a smoke test of the
    mechanics, not of a real distribution: experts ranked on random tokens are ranked on noise);
  - ``FILE.npy``  an integer array of token ids ``[N, S]`` (or ``[S]``: one sequence), or for a
    model whose input is not token ids, a float array ``[N, ...]`` shaped like one example row;
  - ``FILE.jsonl`` one sequence per line: a JSON list of token ids or ``{"input_ids": [...]}``;
    sequences of different lengths are run as separate batches.

Everything is checked up front and refused with the file (and line) named: token ids outside the
vocabulary, empty files, shapes the model can't take.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from moec.errors import MoecError

BATCH = 8  # sequences per forward pass


class CalibrationError(MoecError):
    """--calibration can't be used: the file, the line and what is wrong are named."""

    exit_code = 24


@dataclass
class Calibration:
    """What to run: positional-argument tuples for the whole model, and where they came from."""

    batches: list[tuple]
    description: str  # for the report: "random:16" or the file with its sequence count

    @property
    def tokens(self) -> int:
        return sum(int(np.prod(b[0].shape[:2])) if b[0].dim() > 1 else int(b[0].shape[0]) for b in self.batches)


def check_spec(spec: str) -> None:
    """What can be refused before the model loads: the form of the spec, the file's existence and format."""
    if not spec or not spec.strip():
        raise CalibrationError("--calibration is empty; give FILE.npy, FILE.jsonl or random:N.")
    m = re.fullmatch(r"random:(\d+)", spec.strip())
    if m:
        if int(m.group(1)) < 1:
            raise CalibrationError(f"--calibration {spec}: N must be >= 1.")
        return
    if spec.startswith("random"):
        raise CalibrationError(f"--calibration '{spec}': expected random:N with N an integer, e.g. random:32.")
    if not os.path.isfile(spec):
        raise CalibrationError(f"--calibration '{spec}': no such file (expected FILE.npy, FILE.jsonl or random:N).")
    if not spec.endswith((".npy", ".jsonl")):
        raise CalibrationError(f"--calibration '{spec}': unknown format; expected .npy, .jsonl or random:N.")


def load_calibration(spec: str, src) -> Calibration:
    """`spec` as --calibration takes it, for the loaded source `src` (moec.sources.LoadedSource)."""
    check_spec(spec)
    m = re.fullmatch(r"random:(\d+)", spec.strip())
    if m:
        n = int(m.group(1))
        return Calibration(_random_batches(src, n), f"random:{n} (fixed-seed random inputs)")
    if len(src.example_args) != 1:
        raise CalibrationError(f"--calibration '{spec}': the model takes {len(src.example_args)} inputs; a "
                               "calibration file feeds models with one input (use random:N).")
    kind = src.input_kinds[0] if src.input_kinds else ("float" if src.example_args[0].is_floating_point() else "int")
    if spec.endswith(".npy"):
        rows = _npy_rows(spec, src, kind)
    else:
        if not kind.startswith("tokens:"):
            raise CalibrationError(f"--calibration '{spec}': a .jsonl file holds token ids, but the model's input "
                                   f"is {kind}; give a .npy array shaped like its input.")
        rows = _jsonl_rows(spec)
    if not rows:
        raise CalibrationError(f"--calibration '{spec}': no sequences in the file.")
    if kind.startswith("tokens:"):
        vocab = int(kind.split(":")[1])
        for i, row in enumerate(rows):
            bad = (row < 0) | (row >= vocab)
            if bad.any():
                where = f"line {i + 1}" if spec.endswith(".jsonl") else f"row {i}"
                raise CalibrationError(f"--calibration '{spec}', {where}: token id {int(row[bad][0])} is outside the "
                                       f"model's vocabulary [0, {vocab}).")
    dtype = src.example_args[0].dtype
    batches = _batch_rows([torch.as_tensor(r).to(dtype) for r in rows])
    return Calibration(batches, f"{os.path.basename(spec)} ({len(rows)} sequences)")


def _random_batches(src, n: int) -> list[tuple]:
    batch = src.example_args[0].shape[0] if src.example_args and src.example_args[0].dim() > 1 else None
    per = max(1, min(BATCH, n)) if batch is not None and src._is_dynamic(0, 0) else (batch or 1)
    out, done, seed = [], 0, 9000
    while done < n:
        args = src.make_inputs(seed=seed, batch=per if src._is_dynamic(0, 0) else None)
        out.append(args)
        done += int(args[0].shape[0]) if args and args[0].dim() > 1 else 1
        seed += 1
    return out


def _npy_rows(path: str, src, kind: str) -> list[np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CalibrationError(f"--calibration '{path}': not a readable .npy array ({exc}).") from exc
    example = src.example_args[0]
    if kind.startswith("tokens:") or not example.is_floating_point():
        if not np.issubdtype(arr.dtype, np.integer):
            raise CalibrationError(f"--calibration '{path}': token ids must be integers, the array is {arr.dtype}.")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] < 1:
            raise CalibrationError(f"--calibration '{path}': expected token ids shaped [N, S], got {list(arr.shape)}.")
        return [a.astype(np.int64) for a in arr]
    want = list(example.shape[1:])
    if arr.ndim != example.dim() or (len(want) > 1 and list(arr.shape[2:]) != want[1:]) or (
            len(want) == 1 and list(arr.shape[1:]) != want):
        raise CalibrationError(f"--calibration '{path}': the model's input is shaped like {list(example.shape)} "
                               f"(first dim: the count); the array is {list(arr.shape)}.")
    return [a.astype(np.float32) for a in arr]


def _jsonl_rows(path: str) -> list[np.ndarray]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise CalibrationError(f"--calibration '{path}', line {i + 1}: not JSON ({exc}).") from exc
            ids = item.get("input_ids") if isinstance(item, dict) else item
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in ids):
                raise CalibrationError(f"--calibration '{path}', line {i + 1}: expected a non-empty list of token "
                                       "ids or {\"input_ids\": [...]}.")
            rows.append(np.asarray(ids, dtype=np.int64))
    return rows


def _batch_rows(rows: list[torch.Tensor]) -> list[tuple]:
    """Equal-length rows stacked, at most BATCH at a time, in file order within each length."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for r in rows:
        by_shape.setdefault(tuple(r.shape), []).append(r)
    out = []
    for group in by_shape.values():
        for i in range(0, len(group), BATCH):
            out.append((torch.stack(group[i:i + BATCH]),))
    return out

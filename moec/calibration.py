"""Calibration data: the token sequences (or inputs) a compile measures the model on.

``--calibration`` takes one of:
  - ``random:N``  N fixed-seed random inputs shaped like the model's example (a smoke test of the
    mechanics, not of a real distribution: experts ranked on random tokens are ranked on noise);
  - ``FILE.npy``  an integer array of token ids ``[N, S]`` (or ``[S]``: one sequence), or for a
    model whose input is not token ids, a float array ``[N, ...]`` shaped like one example row;
  - ``FILE.jsonl`` one sequence per line: a JSON list of token ids or ``{"input_ids": [...]}``;
    sequences of different lengths are run as separate batches.

Everything is checked before any pass runs and refused with the file (and line or row) named:
unreadable or non-numeric data, non-finite values, empty sequences, token ids outside the
vocabulary (when the model's vocabulary is known), and shapes the model was not captured for (a
fixed dim that differs from the example's, a dynamic one outside its declared range).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from moec.errors import MoecError

BATCH = 8  # sequences per forward pass (when the batch dim is dynamic)
INT64 = (-(2**63), 2**63 - 1)


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
    example = src.example_args[0]
    kind = src.input_kinds[0] if src.input_kinds else ("float" if example.is_floating_point() else "int")
    if spec.endswith(".npy"):
        rows = _npy_rows(spec, example)
    else:
        if example.is_floating_point():
            raise CalibrationError(f"--calibration '{spec}': a .jsonl file holds token ids, but the model's input "
                                   f"is {kind}; give a .npy array shaped like its input.")
        rows = _jsonl_rows(spec)
    if not rows:
        raise CalibrationError(f"--calibration '{spec}': no sequences in the file.")
    where = (lambda i: f"line {i + 1}") if spec.endswith(".jsonl") else (lambda i: f"row {i}")  # noqa: E731
    if kind.startswith("tokens:"):
        vocab = int(kind.split(":")[1])
        for i, row in enumerate(rows):
            bad = (row < 0) | (row >= vocab)
            if bad.any():
                raise CalibrationError(f"--calibration '{spec}', {where(i)}: token id {int(row[bad][0])} is outside "
                                       f"the model's vocabulary [0, {vocab}).")
    for i, row in enumerate(rows):
        _check_row(spec, where(i), row.shape, src)
    batches = _batch_rows([torch.as_tensor(r).to(example.dtype) for r in rows], _static_batch(src))
    if not batches:
        raise CalibrationError(f"--calibration '{spec}': {len(rows)} sequences, fewer than the model's fixed batch "
                               f"size {_static_batch(src)}.")
    used = sum(int(b[0].shape[0]) for b in batches)
    dropped = f", {len(rows) - used} left over for the model's fixed batch size" if used < len(rows) else ""
    return Calibration(batches, f"{os.path.basename(spec)} ({used} sequences{dropped})")


# ----------------------------------------------------------------------------- shapes


def _static_batch(src):
    return None if src.dim_range(0, 0) is not None else int(src.example_args[0].shape[0])


def _check_row(spec: str, where: str, row_shape: tuple, src) -> None:
    """One sequence (the example's shape without its batch dim) against what the model was captured for."""
    example = src.example_args[0]
    if 0 in row_shape:
        raise CalibrationError(f"--calibration '{spec}', {where}: an empty sequence (shape {list(row_shape)}).")
    for axis, size in enumerate(row_shape, start=1):
        bounds = src.dim_range(0, axis)
        if bounds is None:
            if size != int(example.shape[axis]):
                raise CalibrationError(
                    f"--calibration '{spec}', {where}: dim {axis} is {size}, but the model was captured with it fixed "
                    f"at {int(example.shape[axis])} (the example's shape {list(example.shape)}).")
            continue
        lo, hi = bounds
        if size < lo or (hi is not None and size > hi):
            name = getattr(src.dim_spec(0, axis), "__name__", "")
            raise CalibrationError(
                f"--calibration '{spec}', {where}: dim {axis} ({name}) is {size}, outside the "
                f"range the model accepts [{lo}, {hi if hi is not None else 'inf'}].")


# ----------------------------------------------------------------------------- reading


def _random_batches(src, n: int) -> list[tuple]:
    dynamic_batch = bool(src.example_args) and src.example_args[0].dim() > 1 and src.dim_range(0, 0) is not None
    out, done, seed = [], 0, 9000
    while done < n:
        args = src.make_inputs(seed=seed, batch=min(BATCH, n - done) if dynamic_batch else None)
        out.append(args)
        done += int(args[0].shape[0]) if args and args[0].dim() > 1 else 1
        seed += 1
    return out


def _npy_rows(path: str, example: torch.Tensor) -> list[np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CalibrationError(f"--calibration '{path}': not a readable .npy array ({exc}).") from exc
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.floating):
        raise CalibrationError(f"--calibration '{path}': expected a numeric array, it holds {arr.dtype}.")
    if not example.is_floating_point():
        if not np.issubdtype(arr.dtype, np.integer):
            raise CalibrationError(f"--calibration '{path}': token ids must be integers, the array is {arr.dtype}.")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise CalibrationError(f"--calibration '{path}': expected token ids shaped [N, S], got {list(arr.shape)}.")
        return [a.astype(np.int64) for a in arr]
    if arr.ndim != example.dim():
        raise CalibrationError(f"--calibration '{path}': the model's input is shaped like {list(example.shape)} "
                               f"(first dim: the count); the array is {list(arr.shape)}.")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr).reshape(len(arr), -1).all(axis=1))[0][0])
        raise CalibrationError(f"--calibration '{path}', row {bad}: non-finite values (NaN/inf).")
    return list(arr)


def _jsonl_rows(path: str) -> list[np.ndarray]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"--calibration '{path}': not UTF-8 text ({exc}).") from exc
    for i, line in enumerate(lines):
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
        if any(not INT64[0] <= t <= INT64[1] for t in ids):
            raise CalibrationError(f"--calibration '{path}', line {i + 1}: a token id does not fit in 64 bits.")
        rows.append(np.asarray(ids, dtype=np.int64))
    return rows


def _batch_rows(rows: list[torch.Tensor], static_batch) -> list[tuple]:
    """Equal-length rows stacked in file order within each length: at most BATCH at a time, or exactly
    the model's fixed batch size (a remainder that can't fill one is left out)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for r in rows:
        by_shape.setdefault(tuple(r.shape), []).append(r)
    step = static_batch or BATCH
    out = []
    for group in by_shape.values():
        for i in range(0, len(group), step):
            chunk = group[i:i + step]
            if static_batch and len(chunk) < static_batch:
                continue
            out.append((torch.stack(chunk),))
    return out

"""Error metrics shared by pass validation, artifact verification and quantization reports."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ErrorStats:
    rel_l2: float  # ||a - b|| / ||b||  (b is the reference)
    max_abs: float
    cosine: float

    def to_dict(self) -> dict:
        return {"rel_l2": _finite(self.rel_l2), "max_abs": _finite(self.max_abs), "cosine": _finite(self.cosine)}


def _finite(x: float):
    return float(x) if math.isfinite(x) else str(x)


def compare_tensors(reference, actual) -> ErrorStats:
    """Relative L2, max abs and cosine of `actual` against `reference` (float64)."""
    r = _as_f64(reference).ravel()
    a = _as_f64(actual).ravel()
    if r.shape != a.shape:
        return ErrorStats(math.inf, math.inf, 0.0)
    if not (np.isfinite(r).all() and np.isfinite(a).all()):
        same = np.array_equal(r, a, equal_nan=True)
        return ErrorStats(0.0 if same else math.inf, 0.0 if same else math.inf, 1.0 if same else 0.0)
    diff = a - r
    ref_norm = float(np.linalg.norm(r))
    diff_norm = float(np.linalg.norm(diff))
    rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    act_norm = float(np.linalg.norm(a))
    cos = float(r @ a) / (ref_norm * act_norm) if ref_norm > 0 and act_norm > 0 else (1.0 if diff_norm == 0 else 0.0)
    return ErrorStats(rel, float(np.abs(diff).max()) if diff.size else 0.0, cos)


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)

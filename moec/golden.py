"""Golden inputs/outputs: record them, load them (checking every file), compare an artifact's outputs.

Layout of a golden directory (small, diff-friendly, byte-identical when recorded twice):
    manifest.json                 format, model identity + weights hash, precision, tolerance,
                                  per-probe tensors (file, shape, dtype, sha256), library versions,
                                  and manifest_sha256: its own digest, so an edited manifest is refused
    probe<N>.input.<name>.npy
    probe<N>.output.<name>.npy
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from moec.errors import GoldenError, OutputExistsError
from moec.fsutil import make_workdir, release_workdir, remove_stale_workdirs, swap_into_place
from moec.numerics import compare_tensors

FORMAT = "moec-golden/2"  # /2: the manifest carries its own sha256
LEGACY_FORMATS = ("moec-golden/1",)  # recorded before the digest: loaded without it
# Relative-L2 tolerance of an artifact against eager fp32 PyTorch, by the artifact's precision.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 5e-2, "int4": 1.5e-1, "int2": 6e-1}


def recorded_tolerance(dtype: str, quantized: bool, verified: float) -> float:
    """The tolerance a compile's goldens record: the one its verification passed, except for a float bf16 artifact,
    verified here in fp32 arithmetic (moec.widen_bf16), whose goldens must also serve a runtime's bf16 kernels."""
    return TOLERANCES["bf16"] if dtype == "bf16" and not quantized else verified


@dataclass
class Probe:
    name: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class Golden:
    path: str
    probes: list[Probe]
    precision: str
    tolerance: float
    manifest: dict = field(default_factory=dict)


def weights_sha256(module) -> str:
    """A hash of a torch module's parameters and buffers, by name (the model's identity)."""
    h = hashlib.sha256()
    for name, t in sorted(list(module.state_dict().items())):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().numpy().view(np.uint8).tobytes())
    return h.hexdigest()


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_golden(path: str, probes: list[Probe], *, model: dict, precision: str = "fp32",
                 tolerance: Optional[float] = None, versions: Optional[dict] = None) -> None:
    """Write a golden directory at `path` (which must not exist)."""
    os.makedirs(path)
    entries = []
    for p in probes:
        entry = {"name": p.name, "inputs": {}, "outputs": {}}
        for kind, tensors in (("inputs", p.inputs), ("outputs", p.outputs)):
            for name, arr in sorted(tensors.items()):
                fname = f"{p.name}.{kind[:-1]}.{name}.npy"
                np.save(os.path.join(path, fname), np.ascontiguousarray(arr))
                entry[kind][name] = {"file": fname, "shape": list(arr.shape), "dtype": str(arr.dtype),
                                     "sha256": _sha(os.path.join(path, fname))}
        entries.append(entry)
    manifest = {
        "format": FORMAT, "model": model, "precision": precision,
        "tolerance": {"rel_l2": tolerance if tolerance is not None else TOLERANCES[precision]},
        "probes": entries, "versions": versions or {},
        "reference": "eager PyTorch (fp32) on the original model, before any moec pass",
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own digest (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record(out: str, probes: list[Probe], *, model: dict, force: bool = False, **kw) -> str:
    """write_golden into a temporary directory beside `out`, then rename it into place."""
    if os.path.exists(out) and not force:
        raise OutputExistsError(f"golden directory '{out}' already exists; pass --force to re-record it.")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    remove_stale_workdirs(parent)
    tmp = make_workdir(parent)
    try:
        write_golden(os.path.join(tmp, "golden"), probes, model=model, **kw)
        swap_into_place(os.path.join(tmp, "golden"), out, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_workdir(tmp)
    return os.path.abspath(out)


def load(path: str) -> Golden:
    """Load and check a golden directory; anything malformed in it is a GoldenError (exit 11)."""
    try:
        return _load(path)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a manifest with fields missing or mistyped
        raise GoldenError(f"golden manifest '{os.path.join(path, 'manifest.json')}' is malformed "
                          f"({type(exc).__name__}: {exc}); re-record the golden.") from exc


def _load(path: str) -> Golden:
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise GoldenError(f"no golden manifest at '{manifest_path}'; record one with `moec golden record`.")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except ValueError as exc:
        raise GoldenError(f"golden manifest '{manifest_path}' is not valid JSON: {exc}") from exc
    if manifest.get("format") not in (FORMAT,) + LEGACY_FORMATS:
        raise GoldenError(f"'{manifest_path}' has format {manifest.get('format')!r}; expected {FORMAT!r}.")
    probes = []
    for entry in manifest["probes"]:
        tensors: dict[str, dict[str, np.ndarray]] = {"inputs": {}, "outputs": {}}
        for kind in ("inputs", "outputs"):
            for name, meta in entry[kind].items():
                fpath = os.path.join(path, meta["file"])
                if not os.path.isfile(fpath):
                    raise GoldenError(f"golden file '{fpath}' is missing.")
                if _sha(fpath) != meta["sha256"]:
                    raise GoldenError(f"golden file '{fpath}' does not match its sha256 in the manifest "
                                      "(corrupt or edited); re-record the golden.")
                try:
                    arr = np.load(fpath, allow_pickle=False)
                except Exception as exc:
                    raise GoldenError(f"golden file '{fpath}' is not a readable .npy: {exc}") from exc
                tensors[kind][name] = arr
        probes.append(Probe(entry["name"], tensors["inputs"], tensors["outputs"]))
    recorded = manifest.get("manifest_sha256")
    if recorded is None and manifest["format"] == FORMAT:
        raise GoldenError(f"golden manifest '{manifest_path}' has no manifest_sha256, which its format "
                          f"{FORMAT} requires (the field was damaged or removed); re-record the golden.")
    if recorded is not None and recorded != manifest_digest(manifest):
        raise GoldenError(f"golden manifest '{manifest_path}' does not match its own sha256 (corrupt or edited: "
                          "a tolerance, a file hash or a probe changed); re-record the golden.")
    return Golden(path, probes, manifest.get("precision", "fp32"), float(manifest["tolerance"]["rel_l2"]), manifest)


@dataclass(frozen=True)
class OutputCheck:
    probe: str
    output: str
    rel_l2: float
    max_abs: float
    cosine: float
    passed: bool
    reason: str = ""


def compare(golden: Golden, probe: Probe, actual: dict[str, np.ndarray], tolerance: float) -> list[OutputCheck]:
    checks = []
    for name, expected in probe.outputs.items():
        got = actual.get(name)
        if got is None:
            checks.append(OutputCheck(probe.name, name, float("inf"), float("inf"), 0.0, False,
                                      "the artifact has no output of this name"))
            continue
        if got.shape != expected.shape or got.dtype != expected.dtype:
            checks.append(OutputCheck(probe.name, name, float("inf"), float("inf"), 0.0, False,
                                      f"shape/dtype {got.shape} {got.dtype} != golden {expected.shape} {expected.dtype}"))
            continue
        s = compare_tensors(expected, got)
        ok = s.rel_l2 <= tolerance
        checks.append(OutputCheck(probe.name, name, s.rel_l2, s.max_abs, s.cosine, ok,
                                  "" if ok else f"relative L2 {s.rel_l2:.3g} > {tolerance:g}"))
    return checks


def format_table(checks: list[OutputCheck], tolerance: float) -> str:
    head = f"{'probe':<10} {'output':<16} {'rel_l2':>10} {'max_abs':>10} {'cosine':>10}  result"
    lines = [head, "-" * len(head)]
    for c in checks:
        lines.append(f"{c.probe:<10} {c.output:<16} {c.rel_l2:>10.3g} {c.max_abs:>10.3g} {c.cosine:>10.6f}  "
                     + ("PASS" if c.passed else f"FAIL ({c.reason})"))
    lines.append(f"tolerance: relative L2 <= {tolerance:g}")
    return "\n".join(lines)

"""Bad input, table-driven and fuzzed: every refusal has its documented exit code, a message naming the
problem, and leaves nothing written or changed.

The corpus (CASES) runs `moec.cli.main(argv)` in-process, in a fresh directory holding whatever the case
set up; afterwards that directory must be byte-for-byte what it was (no --out, no `.moec-tmp*`, an
existing artifact / Triton repository untouched). Cases marked `early` must be refused before the model
is even loaded (validate.py: "everything a compile can refuse before doing any work").

The hypothesis tests fuzz (a) compile options drawn from valid and invalid domains (always at least one
invalid: they must all be refused before loading), (b) a sharded Hugging Face checkpoint with truncated
files, flipped header bits and deleted files (exit 3), (c) a golden directory likewise (`moec verify`:
exit 10-13). An exit code of 1 or 70 (internal error) is always a bug.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moec import pipeline
from moec.cli import main

# ----------------------------------------------------------------------------- helpers

# README "Failure behaviour and exit codes" and the `moec verify` table (0 is success, not an error code).
DOCUMENTED = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 130, 143}
VERIFY_CODES = {10, 11, 12, 13}
_ERROR_LINE = re.compile(r"^moec(?: [\w-]+)*: error: ", re.MULTILINE)
FUZZ = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class ReachedStage(BaseException):
    """Raised by a guard in place of a compile stage: the input was not refused before that stage.
    A BaseException so that main()'s `except Exception` (exit 70) does not swallow it."""


def run_cli(argv: list[str], stop_at: Optional[str] = None) -> tuple[Union[int, str], str, str]:
    """main(argv) in-process -> (exit code, stdout, stderr). `stop_at`: a moec.pipeline stage function
    replaced by a guard; reaching it returns the code "reached <stage>" instead of running it."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if stop_at:
            def guard(*args, **kwargs):
                raise ReachedStage(stop_at)

            mp.setattr(pipeline, stop_at, guard)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except ReachedStage as exc:
            code = f"reached {exc.args[0]}"
    return code, out.getvalue(), err.getvalue()


def error_message(err: str) -> str:
    """The one `moec[ sub]: error: ...` paragraph of stderr (progress lines before it are not the message)."""
    assert "Traceback" not in err, f"a traceback on stderr:\n{err}"
    assert "internal error" not in err, f"an internal error (a bug, exit 70):\n{err}"
    starts = [m.start() for m in _ERROR_LINE.finditer(err)]
    assert len(starts) == 1, f"expected exactly one 'moec: error: ...' message, got {len(starts)}:\n{err}"
    return err[starts[0]:]


def snapshot(root: Path) -> dict[str, str]:
    """Every directory and file under root: relative path -> 'dir' or the file's sha256."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, root)
        tree[rel + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                tree[os.path.join(rel, name)] = "link:" + os.readlink(path)
                continue
            with open(path, "rb") as f:
                tree[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return tree


def assert_unchanged(before: dict, after: dict, root: Path) -> None:
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    leftovers = [k for k in after if ".moec-tmp" in k]
    assert not leftovers, f"temporary directories left behind under {root}: {leftovers}"
    assert not (created or removed or changed), (
        f"the failed command wrote or changed files under {root}: created {created[:8]}, removed {removed[:8]}, "
        f"changed {changed[:8]}")


def compile_(t: Path, *options: str, source: Optional[str] = None, out: str = "out") -> list[str]:
    """`moec compile [SOURCE] --out t/out OPTIONS...`"""
    return ["compile", *([source] if source is not None else []), "--out", str(t / out), *options]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write(path: Path, data: Union[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def flip_bits(path: Path, positions: list[int]) -> None:
    data = bytearray(path.read_bytes())
    for p in positions:
        data[(p // 8) % len(data)] ^= 1 << (p % 8)
    path.write_bytes(bytes(data))


def safetensors_header_end(path: Path) -> int:
    """8 + the header length: the region the checker reads before any tensor data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def edit_tensors(ckpt: Path, fn: Callable[[dict], None]) -> None:
    """Rewrite an unsharded checkpoint's model.safetensors through fn(tensors)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    """Rewrite a JSON file through fn(obj), which edits obj in place (its result is ignored)."""
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2))


def edit_golden_manifest(golden: Path, fn: Callable[[dict], object]) -> None:
    """Edit a manifest as a consistent (re-signed) golden of another model would read."""
    from moec.golden import manifest_digest

    def edit_and_sign(m):
        fn(m)
        m["manifest_sha256"] = manifest_digest(m)

    edit_json(golden / "manifest.json", edit_and_sign)


# A tensor of the tiny qwen3_moe checkpoint that is loaded under its own name (expert weights are
# converted to fused ones by transformers, so their checkpoint names don't survive loading).
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
INDEX = "model.safetensors.index.json"

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    NOT_CALLABLE = 3

    def raises():
        raise RuntimeError("weights file missing: /data/w.bin")

    def returns_int():
        return 42

    def returns_string_module():
        return "a model", (torch.randn(2, 4),)

    def returns_four():
        return nn.Linear(4, 4), (torch.randn(2, 4),), None, "extra"

    def non_tensor_inputs():
        return nn.Linear(4, 4), ("not a tensor",)

    def none_input():
        return nn.Linear(4, 4), None

    def dense_mlp():
        return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval(), (torch.randn(3, 8),)
''')


class Resources:
    """The module-scoped things a case may copy into its directory (built on first use)."""

    def __init__(self, request):
        self._request = request

    def artifact(self, dst: Path) -> Path:
        return copy_tree(self._request.getfixturevalue("demo_artifact"), dst)

    def checkpoint(self, dst: Path, sharded: bool = False) -> Path:
        name = "sharded_checkpoint" if sharded else "checkpoint"
        return copy_tree(self._request.getfixturevalue(name), dst)

    def factories(self) -> None:
        self._request.getfixturevalue("factories")


# ----------------------------------------------------------------------------- module fixtures


# demo_artifact: the run's shared compile of the built-in demo (tests/conftest.py); cases copy it.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real tiny transformers checkpoint (qwen3_moe): config.json + one model.safetensors."""
    from moec import zoo

    root = tmp_path_factory.mktemp("ckpt") / "qwen3"
    zoo.build_hf_model("qwen3_moe").save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory) -> Path:
    """The same, in two shards with model.safetensors.index.json."""
    from moec import zoo

    root = tmp_path_factory.mktemp("ckpt_sharded") / "qwen3"
    zoo.build_hf_model("qwen3_moe").save_pretrained(root, max_shard_size="200KB")
    assert (root / "model.safetensors.index.json").exists()
    return root


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """A user package `badinput_factories` of broken factories, importable for the module's tests."""
    root = tmp_path_factory.mktemp("factories")
    write(root / "badinput_factories" / "__init__.py", "")
    write(root / "badinput_factories" / "models.py", FACTORIES)
    write(root / "badinput_factories" / "broken_import.py", "import badinput_no_such_dependency\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith("badinput_factories")]:
        del sys.modules[name]


# ----------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # built from the case's directory t
    code: Union[int, tuple[int, ...]]  # the exit code (a tuple where the README allows either)
    says: tuple[str, ...]  # regexes the error message must match ({tmp} is the case's directory)
    setup: Optional[Callable[[Path, Resources], None]] = None
    early: bool = False  # refused before the model is loaded
    nonroot: bool = False  # relies on file permissions, which root ignores


def _art(t: Path, r: Resources) -> None:
    r.artifact(t / "art")


def _ckpt(edit: Callable[[Path], None], sharded: bool = False) -> Callable[[Path, Resources], None]:
    def setup(t: Path, r: Resources) -> None:
        edit(r.checkpoint(t / "ckpt", sharded=sharded))
    return setup


def _art_then(edit: Callable[[Path], None]) -> Callable[[Path, Resources], None]:
    def setup(t: Path, r: Resources) -> None:
        edit(r.artifact(t / "art"))
    return setup


def _uses_factories(t: Path, r: Resources) -> None:
    r.factories()


def _file(rel: str, data: Union[str, bytes] = "not a directory\n") -> Callable[[Path, Resources], None]:
    return lambda t, r: write(t / rel, data)


def _existing_out(t: Path, r: Resources) -> None:
    write(t / "out" / "model.onnx", b"an earlier artifact")
    write(t / "out" / "report.json", "{}\n")


def _readonly_dir(t: Path, r: Resources) -> None:
    (t / "ro").mkdir()
    os.chmod(t / "ro", 0o555)


def _existing_version(t: Path, r: Resources) -> None:
    write(t / "repo" / "moe_model" / "config.pbtxt", 'name: "moe_model"\n')
    write(t / "repo" / "moe_model" / "1" / "model.onnx", b"version one")


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _garble_header_key(ckpt: Path) -> None:
    """A tensor entry whose "data_offsets" key is misspelt (same length: the header still parses)."""
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    end = safetensors_header_end(path)
    path.write_bytes(data[:end].replace(b'"data_offsets"', b'"data_offsetz"', 1) + data[end:])


def _first_shard(ckpt: Path) -> Path:
    return ckpt / sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[0]


def _nan(key: str, value: float = float("nan")) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        def fn(ts):
            ts[key] = ts[key].clone()
            ts[key].view(-1)[3] = value
        edit_tensors(ckpt, fn)
    return edit


def _first_expert_key(ckpt: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return next(k for k in f.keys() if "layers.0.mlp.experts" in k)


def _nan_in_expert(ckpt: Path) -> None:
    _nan(_first_expert_key(ckpt))(ckpt)


def _rename_golden_input(golden: Path) -> None:
    def fn(m):
        for p in m["probes"]:
            p["inputs"]["tokens"] = p["inputs"].pop("input_ids")
    edit_golden_manifest(golden, fn)


def _golden_dtype_int32(golden: Path) -> None:
    """probe inputs stored as int32 (files and hashes consistent): the artifact takes int64."""
    manifest = json.loads((golden / "manifest.json").read_text())
    for p in manifest["probes"]:
        meta = p["inputs"]["input_ids"]
        arr = np.load(golden / meta["file"]).astype(np.int32)
        np.save(golden / meta["file"], arr)
        meta["dtype"] = "int32"
        meta["sha256"] = hashlib.sha256((golden / meta["file"]).read_bytes()).hexdigest()
    from moec.golden import manifest_digest

    manifest["manifest_sha256"] = manifest_digest(manifest)
    (golden / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _port_url() -> str:
    return f"127.0.0.1:{free_port()}"


CASES = [
    # --- sources ------------------------------------------------------------------------------------
    Case("source/uninterpretable", lambda t: compile_(t, source="just_a_word"), 3, (r"just_a_word",)),
    Case("source/unknown-module", lambda t: compile_(t, source="badinput_no_such_pkg.models:build"), 3,
         (r"badinput_no_such_pkg", r"cannot import")),
    Case("source/module-import-fails", lambda t: compile_(t, source="badinput_factories.broken_import:f"), 3,
         (r"badinput_factories\.broken_import", r"badinput_no_such_dependency"), setup=_uses_factories),
    Case("source/module-without-factory", lambda t: compile_(t, source="badinput_factories.models:missing"), 3,
         (r"'missing'",), setup=_uses_factories),
    Case("source/factory-not-callable", lambda t: compile_(t, source="badinput_factories.models:NOT_CALLABLE"), 3,
         (r"NOT_CALLABLE",), setup=_uses_factories),
    Case("source/factory-raises", lambda t: compile_(t, source="badinput_factories.models:raises"), 3,
         (r"badinput_factories\.models:raises", r"RuntimeError", r"weights file missing"), setup=_uses_factories),
    Case("source/factory-returns-int", lambda t: compile_(t, source="badinput_factories.models:returns_int"), 3,
         (r"returns_int", r"\bint\b"), setup=_uses_factories),
    Case("source/factory-returns-non-module",
         lambda t: compile_(t, source="badinput_factories.models:returns_string_module"), 3,
         (r"returns_string_module", r"module"), setup=_uses_factories),
    Case("source/factory-returns-4-tuple", lambda t: compile_(t, source="badinput_factories.models:returns_four"),
         3, (r"returns_four",), setup=_uses_factories),
    Case("source/factory-non-tensor-inputs",
         lambda t: compile_(t, source="badinput_factories.models:non_tensor_inputs"), 3,
         (r"non_tensor_inputs", r"\bstr\b|tensor"), setup=_uses_factories),
    Case("source/factory-none-input", lambda t: compile_(t, source="badinput_factories.models:none_input"), 3,
         (r"none_input", r"None|tensor"), setup=_uses_factories),
    Case("source/pt2-missing", lambda t: compile_(t, source=str(t / "model.pt2")), 3,
         (r"{tmp}/model\.pt2", r"does not exist")),
    Case("source/pt2-corrupt", lambda t: compile_(t, source=str(t / "model.pt2")), 3,
         (r"{tmp}/model\.pt2",), setup=_file("model.pt2", b"PK\x03\x04 definitely not an exported program")),
    Case("source/hf-dir-without-config", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt", r"config\.json"), setup=_ckpt(lambda c: os.remove(c / "config.json"))),
    Case("source/hf-config-corrupt-json", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt/config\.json", r"JSON"), setup=_ckpt(lambda c: write(c / "config.json", "{not json"))),
    Case("source/hf-config-without-weights", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt", r"safetensors"), setup=_ckpt(lambda c: os.remove(c / "model.safetensors"))),
    Case("source/hf-truncated-safetensors", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt/model\.safetensors", r"truncated"),
         setup=_ckpt(lambda c: _truncate(c / "model.safetensors", (c / "model.safetensors").stat().st_size - 999))),
    Case("source/hf-safetensors-header-only", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt/model\.safetensors",), setup=_ckpt(lambda c: _truncate(c / "model.safetensors", 5))),
    Case("source/hf-safetensors-header-garbled", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt/model\.safetensors",), setup=_ckpt(_garble_header_key)),
    Case("source/hf-missing-shard", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"model-00001-of-00002\.safetensors", r"not in"),
         setup=_ckpt(lambda c: os.remove(_first_shard(c)), sharded=True)),
    Case("source/hf-index-corrupt-json", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"{tmp}/ckpt/model\.safetensors\.index\.json",),
         setup=_ckpt(lambda c: write(c / "model.safetensors.index.json", '{"weight_map": '), sharded=True)),
    Case("source/hf-missing-tensor", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (re.escape(Q_PROJ), r"lacks"), setup=_ckpt(lambda c: edit_tensors(c, lambda ts: ts.pop(Q_PROJ)))),
    Case("source/hf-unexpected-tensor", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"model\.layers\.0\.self_attn\.extra_proj\.weight",),
         setup=_ckpt(lambda c: edit_tensors(c, lambda ts: ts.__setitem__(
             "model.layers.0.self_attn.extra_proj.weight", ts[Q_PROJ].clone())))),
    Case("source/hf-tensor-shape-mismatch", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (re.escape(Q_PROJ), r"48, 40|\(48, 40\)"),
         setup=_ckpt(lambda c: edit_tensors(c, lambda ts: ts.__setitem__(Q_PROJ, ts[Q_PROJ][:, :40].clone())))),
    Case("source/hf-nan-weight", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (re.escape(Q_PROJ), r"NaN|non-finite"), setup=_ckpt(_nan(Q_PROJ))),
    Case("source/hf-inf-weight", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (re.escape(Q_PROJ), r"inf|non-finite"), setup=_ckpt(_nan(Q_PROJ, float("inf")))),
    Case("source/hf-nan-expert-weight", lambda t: compile_(t, source=str(t / "ckpt")), 3,
         (r"layers\.0\.mlp\.experts", r"NaN|non-finite"), setup=_ckpt(_nan_in_expert)),
    Case("source/hf-nan-weight-quantized", lambda t: compile_(t, "--quant", "int8", source=str(t / "ckpt")), 17,
         (re.escape(Q_PROJ), r"NaN|non-finite"), setup=_ckpt(_nan(Q_PROJ))),

    # --- options ------------------------------------------------------------------------------------
    Case("option/quant-bad-value", lambda t: compile_(t, "--quant", "int3"), 2, (r"--quant", r"int3"), early=True),
    Case("option/block-size-not-a-choice", lambda t: compile_(t, "--quant", "int4", "--block-size", "48"), 2,
         (r"--block-size", r"48"), early=True),
    Case("option/block-size-not-dividing", lambda t: compile_(t, "--quant", "int4", "--block-size", "128"), 17,
         (r"block size 128", r"divide")),
    Case("option/block-size-without-quant", lambda t: compile_(t, "--block-size", "32"), 2,
         (r"--block-size", r"--quant")),
    Case("option/asymmetric-without-quant", lambda t: compile_(t, "--asymmetric"), 2,
         (r"--asymmetric", r"--quant")),
    Case("option/quant-dense-without-quant", lambda t: compile_(t, "--quant-dense"), 2,
         (r"--quant-dense", r"--quant(?!-)")),
    Case("option/quant-with-no-fusion", lambda t: compile_(t, "--quant", "int8", "--no-fusion"), 2,
         (r"--quant", r"--no-fusion")),
    Case("option/tensorrt-aot-on-onnxruntime", lambda t: compile_(t, "--tensorrt-aot"), 2,
         (r"--tensorrt-aot", r"tensorrt"), early=True),
    Case("option/accuracy-level-on-tensorrt",
         lambda t: compile_(t, "--target", "tensorrt", "--quant", "int4", "--accuracy-level", "4"), 2,
         (r"--accuracy-level", r"onnxruntime"), early=True),
    Case("option/accuracy-level-0-on-tensorrt",
         lambda t: compile_(t, "--target", "tensorrt", "--quant", "int4", "--accuracy-level", "0"), 2,
         (r"--accuracy-level", r"onnxruntime"), early=True),
    Case("option/quant-auto-without-budget", lambda t: compile_(t, "--quant", "auto"), 2,
         (r"--quant auto", r"--accuracy-budget")),
    Case("option/quant-auto-with-quant-dense",
         lambda t: compile_(t, "--quant", "auto", "--accuracy-budget", "0.1", "--quant-dense"), 2,
         (r"--quant-dense", r"--quant auto")),
    Case("option/quant-auto-on-tensorrt",
         lambda t: compile_(t, "--target", "tensorrt", "--quant", "auto", "--accuracy-budget", "0.1"), 2,
         (r"--quant auto", r"tensorrt"), early=True),
    Case("option/accuracy-budget-negative", lambda t: compile_(t, "--quant", "int8", "--accuracy-budget=-0.5"), 2,
         (r"--accuracy-budget", r"-0\.5"), early=True),
    Case("option/accuracy-budget-nan", lambda t: compile_(t, "--quant", "int8", "--accuracy-budget", "nan"), 2,
         (r"--accuracy-budget", r"nan"), early=True),
    # --prune-experts / --prune-by / --calibration (exit 23: pruning, 24: calibration data)
    Case("prune/fraction-zero", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "0"), 23,
         (r"--prune-experts 0", r"strictly between 0 and 1"), early=True),
    Case("prune/fraction-one", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "1"), 23,
         (r"--prune-experts 1", r"strictly between 0 and 1"), early=True),
    Case("prune/fraction-negative", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts=-0.2"), 23,
         (r"--prune-experts -0\.2",), early=True),
    Case("prune/fraction-text", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "most"), 23,
         (r"--prune-experts 'most'", r"auto"), early=True),
    Case("prune/without-calibration", lambda t: compile_(t, "--prune-experts", "0.25"), 23,
         (r"--calibration FILE",), early=True),
    Case("prune/auto-without-budget", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "auto"),
         23, (r"auto", r"--accuracy-budget"), early=True),
    Case("prune/prune-by-alone", lambda t: compile_(t, "--prune-by", "count"), 23,
         (r"--prune-by count", r"--prune-experts"), early=True),
    Case("prune/no-fusion", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "0.25",
                                               "--no-fusion"), 23, (r"--no-fusion",), early=True),
    Case("prune/fewer-than-top-k", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "0.9"), 23,
         (r"model\.model\.layers\.0\.mlp would keep 1 of its 8 experts", r"top-2", r"largest fraction .* 0\.75")),
    Case("prune/over-budget", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "0.5",
                                                 "--accuracy-budget", "0.001"), 16,
         (r"--accuracy-budget 0\.001", r"pruning 0\.5 of the experts", r"nothing was written")),
    Case("quant/no-fused-layer", lambda t: compile_(t, "--quant", "int8", source="badinput_factories.models:dense_mlp"),
         17, (r"--quant int8 works on fused MoE layers", r"no MoE layer of this model was fused"),
         setup=_uses_factories),
    Case("prune/no-fused-layer", lambda t: compile_(t, "--calibration", "random:4", "--prune-experts", "0.5",
                                                    source="badinput_factories.models:dense_mlp"), 17,
         (r"--prune-experts 0\.5 works on fused MoE layers",), setup=_uses_factories),
    Case("calibration/random-zero", lambda t: compile_(t, "--calibration", "random:0"), 24, (r"random:0", r">= 1"),
         early=True),
    Case("calibration/random-malformed", lambda t: compile_(t, "--calibration", "random:some"), 24,
         (r"random:some", r"random:N"), early=True),
    Case("calibration/missing-file", lambda t: compile_(t, "--calibration", str(t / "nope.npy")), 24,
         (r"{tmp}/nope\.npy", r"no such file"), early=True),
    Case("calibration/unknown-format", lambda t: compile_(t, "--calibration", str(t / "c.txt")), 24,
         (r"{tmp}/c\.txt", r"unknown format"), setup=_file("c.txt", "1 2 3\n"), early=True),
    Case("calibration/token-outside-vocabulary", lambda t: compile_(t, "--calibration", str(t / "c.jsonl")), 24,
         (r"{tmp}/c\.jsonl', line 2", r"token id 300", r"\[0, 256\)"), setup=_file("c.jsonl", "[1, 2]\n[3, 300]\n")),
    Case("calibration/bad-jsonl-line", lambda t: compile_(t, "--calibration", str(t / "c.jsonl")), 24,
         (r"{tmp}/c\.jsonl', line 1", r"not JSON"), setup=_file("c.jsonl", "{oops\n")),
    Case("calibration/float-ids", lambda t: compile_(t, "--calibration", str(t / "c.npy")), 24,
         (r"{tmp}/c\.npy", r"must be integers"), setup=lambda t, r: np.save(t / "c.npy", np.ones((2, 4)))),
    Case("option/tolerance-negative", lambda t: compile_(t, "--tolerance=-1"), 2, (r"--tolerance", r"-1"),
         early=True),
    Case("option/tolerance-nan", lambda t: compile_(t, "--tolerance", "nan"), 2, (r"--tolerance", r"nan"),
         early=True),
    Case("option/tolerance-zero", lambda t: compile_(t, "--tolerance", "0"), 2, (r"--tolerance", r"\b0"),
         early=True),
    Case("option/tolerance-inf", lambda t: compile_(t, "--tolerance", "inf"), 2, (r"--tolerance", r"inf"),
         early=True),
    Case("option/max-shape-malformed", lambda t: compile_(t, "--max-shape", "batch=eight"), 2,
         (r"--max-shape", r"batch=eight"), early=True),
    Case("option/max-shape-no-size", lambda t: compile_(t, "--max-shape", "batch"), 2,
         (r"--max-shape", r"batch"), early=True),
    Case("option/max-shape-unknown-dim", lambda t: compile_(t, "--max-shape", "foo=8"), 2,
         (r"--max-shape", r"foo", r"batch|seq")),
    Case("option/max-shape-zero", lambda t: compile_(t, "--max-shape", "seq=0"), 2, (r"--max-shape", r"seq=0"),
         early=True),
    Case("option/max-shape-negative", lambda t: compile_(t, "--max-shape", "batch=-4"), 2,
         (r"--max-shape", r"batch=-4"), early=True),
    Case("option/max-shape-beyond-model", lambda t: compile_(t, "--max-shape", "seq=100000"), 2,
         (r"--max-shape", r"seq", r"512")),
    Case("option/device-memory-unparseable", lambda t: compile_(t, "--device-memory", "lots"), 18,
         (r"lots",), early=True),
    Case("option/device-memory-zero", lambda t: compile_(t, "--device-memory", "0"), 2,
         (r"--device-memory",), early=True),
    Case("option/device-memory-empty", lambda t: compile_(t, "--device-memory="), (2, 18),
         (r"--device-memory",), early=True),
    Case("option/device-memory-too-small", lambda t: compile_(t, "--device-memory", "1MB"), 19,
         (r"does not fit", r"1\.00 MiB|1 ?MB|1000000|976")),
    Case("option/shard-size-zero", lambda t: compile_(t, "--shard-size", "0"), 2, (r"--shard-size 0",), early=True),
    Case("option/shard-size-unparseable", lambda t: compile_(t, "--shard-size", "big"), (2, 18),
         (r"'big'|\bbig\b",), early=True),
    Case("option/shard-size-negative", lambda t: compile_(t, "--shard-size=-5MB"), (2, 18), (r"-5MB",),
         early=True),
    Case("option/no-pass-unknown", lambda t: compile_(t, "--no-pass", "no_such_pass"), 2,
         (r"--no-pass", r"no_such_pass")),
    Case("option/model-version-zero", lambda t: compile_(t, "--triton-repo", str(t / "repo"), "--model-version", "0"),
         2, (r"--model-version", r"\b0\b"), early=True),
    Case("option/model-version-negative",
         lambda t: compile_(t, "--triton-repo", str(t / "repo"), "--model-version=-2"), 2,
         (r"--model-version", r"-2"), early=True),
    Case("option/model-version-not-int", lambda t: compile_(t, "--model-version", "one"), 2,
         (r"--model-version", r"one"), early=True),
    Case("option/max-batch-size-negative", lambda t: compile_(t, "--triton-repo", str(t / "repo"),
                                                              "--max-batch-size=-1"), 2,
         (r"--max-batch-size", r"-1"), early=True),
    Case("option/instances-zero", lambda t: compile_(t, "--triton-repo", str(t / "repo"), "--instances", "0"), 2,
         (r"--instances", r"\b0\b"), early=True),
    Case("option/instances-negative", lambda t: compile_(t, "--instances=-3"), 2, (r"--instances", r"-3"),
         early=True),
    Case("option/unknown-target", lambda t: compile_(t, "--target", "cuda"), 2, (r"--target", r"cuda"), early=True),
    Case("option/unknown-option", lambda t: compile_(t, "--quantize", "int8"), 2, (r"--quantize",), early=True),

    # --- destinations -------------------------------------------------------------------------------
    Case("dest/out-exists", lambda t: compile_(t), 9, (r"{tmp}/out", r"--force"), setup=_existing_out, early=True),
    Case("dest/out-is-a-file", lambda t: compile_(t), 9, (r"{tmp}/out", r"--force"), setup=_file("out"),
         early=True),
    Case("dest/out-parent-is-a-file", lambda t: compile_(t, out="file/out"), 2, (r"{tmp}/file",),
         setup=_file("file"), early=True),
    Case("dest/out-in-read-only-dir", lambda t: compile_(t, out="ro/out"), 2, (r"{tmp}/ro", r"writable"),
         setup=_readonly_dir, early=True, nonroot=True),
    Case("dest/out-empty", lambda t: ["compile", "--out", ""], 2, (r"--out",), early=True),
    Case("dest/triton-repo-is-a-file", lambda t: compile_(t, "--triton-repo", str(t / "repo")), 2,
         (r"--triton-repo", r"{tmp}/repo"), setup=_file("repo"), early=True),
    Case("dest/triton-repo-parent-is-a-file", lambda t: compile_(t, "--triton-repo", str(t / "file" / "repo")), 2,
         (r"--triton-repo", r"{tmp}/file"), setup=_file("file"), early=True),
    Case("dest/triton-repo-empty", lambda t: compile_(t, "--triton-repo", ""), 2, (r"--triton-repo",), early=True),
    Case("dest/triton-version-exists", lambda t: compile_(t, "--triton-repo", str(t / "repo")), 9,
         (r"{tmp}/repo/moe_model/1", r"--force"), setup=_existing_version, early=True),
    *[Case(f"dest/model-name-{label}", lambda t, n=name: compile_(t, "--triton-repo", str(t / "repo"),
                                                                 f"--model-name={n}"), 2,
           (r"--model-name", re.escape(name) if name else r"''|\"\"|empty"), early=True)
      for label, name in [("empty", ""), ("traversal", "../../evil"), ("slash", "a/b"), ("dot", "."),
                          ("dotdot", ".."), ("space", "my model"), ("leading-dash", "-x"), ("colon", "a:b"),
                          ("non-ascii", "modèle"), ("too-long", "m" * 129), ("hidden", ".hidden")]],

    # --- goldens, verify, inspect -------------------------------------------------------------------
    Case("verify/golden-dir-missing", lambda t: ["verify", str(t / "art"), "--golden", str(t / "nope")], 11,
         (r"{tmp}/nope",), setup=_art),
    Case("verify/golden-manifest-corrupt-json", lambda t: ["verify", str(t / "art")], 11,
         (r"{tmp}/art/golden/manifest\.json", r"JSON"),
         setup=_art_then(lambda a: write(a / "golden" / "manifest.json", '{"format": "moec-golden/1", '))),
    Case("verify/golden-manifest-without-probes", lambda t: ["verify", str(t / "art")], 11,
         (r"{tmp}/art/golden/manifest\.json", r"probes"),
         setup=_art_then(lambda a: write(a / "golden" / "manifest.json", '{"format": "moec-golden/1"}'))),
    Case("verify/golden-manifest-entry-without-sha256", lambda t: ["verify", str(t / "art")], 11,
         (r"{tmp}/art/golden/manifest\.json", r"sha256"),
         setup=_art_then(lambda a: edit_golden_manifest(
             a / "golden", lambda m: m["probes"][0]["inputs"]["input_ids"].pop("sha256")))),
    Case("verify/golden-manifest-wrong-format", lambda t: ["verify", str(t / "art")], 11,
         (r"{tmp}/art/golden/manifest\.json", r"format"),
         setup=_art_then(lambda a: edit_golden_manifest(a / "golden", lambda m: m.update(format="other/9")))),
    Case("verify/golden-npy-truncated", lambda t: ["verify", str(t / "art")], 11,
         (r"{tmp}/art/golden/probe0\.output\.logits\.npy",),
         setup=_art_then(lambda a: _truncate(a / "golden" / "probe0.output.logits.npy", 100))),
    Case("verify/golden-npy-missing", lambda t: ["verify", str(t / "art")], 11,
         (r"{tmp}/art/golden/probe1\.input\.input_ids\.npy", r"missing"),
         setup=_art_then(lambda a: os.remove(a / "golden" / "probe1.input.input_ids.npy"))),
    Case("verify/golden-input-names-differ", lambda t: ["verify", str(t / "art")], 13,
         (r"tokens", r"input_ids"), setup=_art_then(lambda a: _rename_golden_input(a / "golden"))),
    Case("verify/golden-input-dtype-differs", lambda t: ["verify", str(t / "art")], 13,
         (r"input_ids", r"int32"), setup=_art_then(lambda a: _golden_dtype_int32(a / "golden"))),
    Case("verify/artifact-without-model-onnx", lambda t: ["verify", str(t / "art")], 12,
         (r"model\.onnx", r"{tmp}/art"), setup=_art_then(lambda a: os.remove(a / "model.onnx"))),
    Case("verify/artifact-model-onnx-corrupt", lambda t: ["verify", str(t / "art")], 12,
         (r"{tmp}/art/model\.onnx",), setup=_art_then(lambda a: write(a / "model.onnx", b"\x00garbage" * 64))),
    Case("verify/artifact-dir-missing", lambda t: ["verify", str(t / "nothing")], (11, 12), (r"{tmp}/nothing",)),
    Case("verify/server-unreachable",
         lambda t: ["verify", "--server", (t / "url").read_text(), "--golden", str(t / "art" / "golden")], 14,
         (r"127\.0\.0\.1:\d+", r"unreachable"),
         setup=lambda t, r: (_art(t, r), write(t / "url", _port_url()))),
    Case("verify/server-without-golden", lambda t: ["verify", "--server", "127.0.0.1:1"], 2, (r"--golden",)),
    Case("verify/no-dir-no-server", lambda t: ["verify"], 2, (r"DIR|--server",)),
    Case("verify/tolerance-negative", lambda t: ["verify", str(t / "art"), "--tolerance=-1"], 2,
         (r"--tolerance", r"-1"), setup=_art),
    Case("verify/tolerance-nan", lambda t: ["verify", str(t / "art"), "--tolerance", "nan"], 2,
         (r"--tolerance", r"nan"), setup=_art),
    Case("verify/junit-dir-missing", lambda t: ["verify", str(t / "art"), "--junit", str(t / "no" / "j.xml")], 2,
         (r"{tmp}/no",), setup=_art),
    Case("inspect/no-report", lambda t: ["inspect", str(t / "art")], (2, 12), (r"report\.json", r"{tmp}/art"),
         setup=_art_then(lambda a: os.remove(a / "report.json"))),
    Case("inspect/corrupt-report", lambda t: ["inspect", str(t / "art")], (2, 12),
         (r"{tmp}/art/report\.json",), setup=_art_then(lambda a: write(a / "report.json", '{"target": '))),
    Case("inspect/routing-without-calibration", lambda t: ["inspect", str(t / "art"), "--routing"], 2,
         (r"{tmp}/art/report\.json", r"no routing statistics", r"--calibration"), setup=_art),
    Case("inspect/memory-and-routing", lambda t: ["inspect", str(t / "art"), "--routing", "--memory"], 2,
         (r"--memory or --routing",), setup=_art),
    Case("inspect/quant-without-quantization", lambda t: ["inspect", str(t / "art"), "--quant"], 2,
         (r"no quantized experts", r"--quant"), setup=_art),
    Case("golden-record/seq-len-zero", lambda t: ["golden", "record", "--out", str(t / "g"), "--seq-len", "0"], 2,
         (r"--seq-len", r"\b0\b")),
    Case("golden-record/seq-len-negative", lambda t: ["golden", "record", "--out", str(t / "g"), "--seq-len=-4"],
         2, (r"--seq-len", r"-4")),
    Case("golden-record/exists", lambda t: ["golden", "record", "--out", str(t / "g")], 9,
         (r"{tmp}/g", r"--force"), setup=_file("g/manifest.json", "{}\n")),
    Case("golden-record/bad-source", lambda t: ["golden", "record", "badinput_no_such_pkg:f", "--out", str(t / "g")],
         3, (r"badinput_no_such_pkg",)),
    Case("golden-record/out-parent-is-a-file", lambda t: ["golden", "record", "--out", str(t / "file" / "g")], 2,
         (r"{tmp}/file",), setup=_file("file")),
]


def _ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    return ids


def test_corpus_is_big_enough():
    groups = {c.id.split("/")[0] for c in CASES}
    assert len(_ids_unique()) >= 60 and {"source", "option", "dest", "verify", "inspect", "golden-record"} <= groups


@pytest.mark.parametrize("case", CASES, ids=_ids_unique())
def test_bad_input(case: Case, tmp_path, monkeypatch, request):
    if case.nonroot and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    t = tmp_path / "case"
    t.mkdir()
    monkeypatch.chdir(t)  # a default output (moec-out/...) would land here and be caught
    try:
        if case.setup:
            case.setup(t, Resources(request))
        argv = case.argv(t)
        before = snapshot(t)
        code, _, err = run_cli(argv, stop_at="load" if case.early else None)
        after = snapshot(t)
    finally:
        if (t / "ro").exists():
            os.chmod(t / "ro", 0o755)
    expected = case.code if isinstance(case.code, tuple) else (case.code,)
    assert code in expected, f"moec {argv}: exit {code}, expected {' or '.join(map(str, expected))}\n{err}"
    message = error_message(err)
    for pattern in case.says:
        pattern = pattern.replace("{tmp}", re.escape(str(t)))
        assert re.search(pattern, message), f"the message does not match {pattern!r}:\n{message}"
    assert_unchanged(before, after, t)


# ----------------------------------------------------------------------------- fuzzing

OUT, EXISTING, FILE, REPO = "<out>", "<existing dir>", "<file>", "<repo>"

# option -> (valid values, invalid values); every invalid value here is refusable before the model loads.
OPTION_DOMAINS = {
    "--quant": (["int8", "int4"], ["int3", "fp8", "", "INT8"]),
    "--block-size": (["32", "64"], ["0", "-16", "48", "x"]),
    "--accuracy-level": (["0", "4"], ["2", "x"]),
    "--tolerance": (["1e-4", "0.05"], ["0", "-1", "nan", "inf", "-inf", "x"]),
    "--accuracy-budget": (["0", "0.1"], ["-0.5", "nan", "inf", "x"]),
    "--max-shape": (["batch=4,seq=64", "seq=128"], ["batch", "batch=x", "=4", "seq=0", "batch=-2", "batch=4=5"]),
    "--device-memory": (["80GiB", "512MB"], ["lots", "-1GB", "0", "12XB", "1e3GB"]),
    "--shard-size": (["2GB", "700KiB"], ["0", "-5MB", "big", "0KiB"]),
    "--model-version": (["1", "3"], ["0", "-1", "one", "1.5"]),
    "--prune-experts": (["0.25", "auto"], ["0", "1", "1.5", "-0.2", "most"]),
    "--prune-by": (["count", "contribution"], ["size", ""]),
    "--calibration": (["random:8"], ["random:0", "random:x", "", FILE]),
    "--max-batch-size": (["0", "8"], ["-1", "x"]),
    "--instances": (["1", "2"], ["0", "-2", "x"]),
    "--model-name": (["m1", "moe_model"], ["", "../evil", "a/b", ".", "..", "a b", "-x", "m" * 129]),
    "--target": (["onnxruntime", "tensorrt"], ["cuda", "TensorRT", ""]),
    "--out": ([OUT], [EXISTING, FILE, FILE + "/sub"]),
    "--triton-repo": ([REPO], [FILE, FILE + "/repo"]),
}
FLAGS = ["--quant-dense", "--no-fusion", "--tensorrt-aot", "--asymmetric", "--no-validate", "--require-fusion", "--static",
         "--quiet"]


@st.composite
def bad_compile_argv(draw) -> list[tuple[str, str]]:
    """(option, value) pairs with at least one invalid value, plus some flags."""
    names = sorted(OPTION_DOMAINS)
    bad = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    others = draw(st.lists(st.sampled_from([n for n in names if n not in bad]), max_size=5, unique=True))
    pairs = [(n, draw(st.sampled_from(OPTION_DOMAINS[n][1]))) for n in bad]
    for n in others:
        valid, invalid = OPTION_DOMAINS[n]
        pairs.append((n, draw(st.sampled_from(valid + invalid))))
    if any(n == "--model-version" for n, _ in pairs) and not any(n == "--triton-repo" for n, _ in pairs):
        pairs.append(("--triton-repo", REPO))  # the version is only checked against a repository
    pairs += [(f, None) for f in draw(st.lists(st.sampled_from(FLAGS), max_size=3, unique=True))]
    return draw(st.permutations(pairs))


def _materialize(pairs, t: Path) -> list[str]:
    write(t / "file", "a regular file\n")
    write(t / "existing" / "model.onnx", b"an earlier artifact")
    paths = {OUT: t / "out", EXISTING: t / "existing", FILE: t / "file", REPO: t / "repo"}
    argv = ["compile"]
    if not any(n == "--out" for n, _ in pairs):
        argv += ["--out", str(t / "out")]
    for name, value in pairs:
        if value is None:
            argv.append(name)
            continue
        for token, path in paths.items():
            value = value.replace(token, str(path)) if token in value else value
        argv.append(f"{name}={value}")
    return argv


@FUZZ
@given(pairs=bad_compile_argv())
def test_fuzz_compile_options_are_refused_up_front(pairs):
    with tempfile.TemporaryDirectory() as d:
        t = Path(d)
        argv = _materialize(pairs, t)
        before = snapshot(t)
        code, _, err = run_cli(argv, stop_at="load")
        assert code != "reached load", f"moec {argv}: not refused before loading the model"
        assert code in DOCUMENTED, f"moec {argv}: exit {code}, not a documented error code\n{err}"
        error_message(err)
        assert_unchanged(before, snapshot(t), t)


@st.composite
def corruption(draw, files: list[str], flippable: Callable[[str], bool] = lambda name: True):
    """(file, 'truncate' | 'flip' | 'delete', parameter): a truncation keeps a fraction of the file (always
    losing at least 2 bytes, so a JSON file loses its closing brace, not just its newline)."""
    name = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["truncate", "delete"] + (["flip"] if flippable(name) else [])))
    if kind == "truncate":
        return name, kind, draw(st.floats(0.0, 1.0))
    if kind == "flip":
        return name, kind, draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=8))
    return name, kind, None


def _corrupt(root: Path, name: str, kind: str, param) -> None:
    """Apply a corruption; bit flips in a .safetensors file stay in its header (8-byte length + JSON)."""
    path = root / name
    size = path.stat().st_size
    if kind == "delete":
        os.remove(path)
    elif kind == "truncate":
        _truncate(path, min(int(size * param), size - 2))
    else:
        span = safetensors_header_end(path) if name.endswith(".safetensors") else size
        flip_bits(path, sorted({p % (span * 8) for p in param}))  # each bit once: two flips would cancel


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _checkpoint_files(root: Path) -> list[str]:
    """What moec reads of a checkpoint: config.json, the index, the shards (generation_config.json plays no
    part in the logits artifact, so a corrupt one need not be refused)."""
    return sorted(f for f in os.listdir(root) if f.endswith(".safetensors") or f in ("config.json", INDEX))


@FUZZ
@given(data=st.data())
def test_fuzz_corrupted_checkpoint_is_refused(data, sharded_checkpoint, fuzz_root):
    # bit flips only in the safetensors headers: a flip in config.json or the index's metadata can be harmless
    name, kind, param = data.draw(corruption(_checkpoint_files(sharded_checkpoint),
                                             flippable=lambda f: f.endswith(".safetensors")))
    t = Path(tempfile.mkdtemp(dir=fuzz_root))
    try:
        ckpt = copy_tree(sharded_checkpoint, t / "ckpt")
        _corrupt(ckpt, name, kind, param)
        before = snapshot(t)
        argv = compile_(t, source=str(ckpt))
        code, _, err = run_cli(argv, stop_at="eager_reference")
        assert code != "reached eager_reference", f"{kind} of {name} ({param}) not detected: the checkpoint loaded"
        assert code == 3, f"{kind} of {name} ({param}): exit {code}, expected 3\n{err}"
        error_message(err)
        assert_unchanged(before, snapshot(t), t)
    finally:
        shutil.rmtree(t, ignore_errors=True)


def _golden_files(artifact: Path, manifest: bool) -> list[str]:
    files = sorted(os.listdir(artifact / "golden"))
    return ["manifest.json"] if manifest else [f for f in files if f.endswith(".npy")]


def _fuzz_golden(data, demo_artifact: Path, fuzz_root: Path, manifest: bool) -> None:
    name, kind, param = data.draw(corruption(_golden_files(demo_artifact, manifest)))
    t = Path(tempfile.mkdtemp(dir=fuzz_root))
    try:
        art = copy_tree(demo_artifact, t / "art")
        _corrupt(art / "golden", name, kind, param)
        before = snapshot(t)
        code, _, err = run_cli(["verify", str(art)])
        assert code in VERIFY_CODES, f"{kind} of golden/{name} ({param}): exit {code}, expected 10-13\n{err}"
        error_message(err)
        assert_unchanged(before, snapshot(t), t)
    finally:
        shutil.rmtree(t, ignore_errors=True)


@FUZZ
@given(data=st.data())
def test_fuzz_corrupted_golden_tensors_fail_verify(data, demo_artifact, fuzz_root):
    _fuzz_golden(data, demo_artifact, fuzz_root, manifest=False)


@FUZZ
@given(data=st.data())
def test_fuzz_corrupted_golden_manifest_fails_verify(data, demo_artifact, fuzz_root):
    _fuzz_golden(data, demo_artifact, fuzz_root, manifest=True)

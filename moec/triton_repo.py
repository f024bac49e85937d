"""Write a Triton Inference Server model repository entry for an ONNX artifact.

Layout: ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/VERSION/model.onnx`` (+ external data).
The config is generated from the ONNX signature and parsed back as Triton's
``ModelConfig`` protobuf before anything is written; the version directory is
written to a temporary directory and renamed into place, and an existing version
is never replaced unless `force` is set.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import onnx

from moec.errors import MoecError, OutputExistsError
from moec.fsutil import make_workdir, release_workdir, remove_stale_workdirs, swap_into_place

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]  # -1 for dynamic


def onnx_signature(model_path: str) -> tuple[list[TensorSpec], list[TensorSpec], list[Optional[str]]]:
    """Inputs and outputs of the model, and the symbolic name of each input's first dim."""
    model = onnx.load(model_path, load_external_data=False)
    first_dims = []

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise MoecError(f"tensor '{v.name}' has ONNX type {t.elem_type}, which Triton can't serve.")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(v.name, _ONNX_TO_TRITON[t.elem_type], dims)

    inputs = [spec(v) for v in model.graph.input]
    for v in model.graph.input:
        d = v.type.tensor_type.shape.dim
        first_dims.append(d[0].dim_param if d and d[0].HasField("dim_param") else None)
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs, first_dims


def render_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int,
                  instances: int, platform: str = "onnxruntime_onnx", kind: str = "KIND_CPU",
                  extra: str = "") -> str:
    def block(t: TensorSpec) -> str:
        dims = t.dims[1:] if max_batch_size > 0 else t.dims
        return (f"  {{\n    name: \"{t.name}\"\n    data_type: {t.data_type}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}")

    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(block(t) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(block(t) for t in outputs) + "\n]",
    ]
    if max_batch_size > 0:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 100\n}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def validate_config(text: str):
    """Parse as Triton's ModelConfig (rejects misspelled fields and enum values)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise MoecError(f"generated config.pbtxt does not parse as Triton's ModelConfig: {exc}") from exc


def tensorrt_accelerator_config(workspace_bytes: int = 1 << 30) -> str:
    """ONNX Runtime model served through the TensorRT execution accelerator (KIND_GPU instances).

    Parameters are the ones Triton's onnxruntime backend documents for the accelerator. The ONNX must
    hold no moec plugin node (the server can't load the Python plugin): see moec/targets/tensorrt/artifact.py (triton_model).
    """
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
        '      name : "tensorrt"\n'
        '      parameters { key: "precision_mode" value: "FP32" }\n'
        f'      parameters {{ key: "max_workspace_size_bytes" value: "{workspace_bytes}" }}\n'
        '      parameters { key: "trt_engine_cache_enable" value: "true" }\n'
        "    } ]\n  }\n}"
    )


def staging_parent(repo: str) -> Optional[str]:
    """The directory to stage a model in, outside the repository: its parent, when that is a writable
    directory on the same filesystem (so the final rename is atomic); None otherwise."""
    repo = os.path.abspath(repo)
    parent = os.path.dirname(repo)
    try:
        same_fs = os.stat(parent).st_dev == os.stat(repo).st_dev
    except OSError:
        return None
    if parent == repo or not same_fs or not os.access(parent, os.W_OK | os.X_OK):
        return None
    return parent


def _place(staged: str, model_dir: str, version: int, force: bool) -> None:
    """Move a staged model directory (config.pbtxt + VERSION/) into the repository."""
    try:
        os.rename(staged, model_dir)  # a new model: appears with its config and version at once
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    _place_version(staged, model_dir, version, force)  # the model exists (or appeared meanwhile)


def _place_version(staged: str, model_dir: str, version: int, force: bool) -> None:
    """Into an existing model directory: the version directory whole, then the config atomically."""
    work = make_workdir(model_dir)  # hidden inside a model directory: not a version Triton loads
    try:
        os.rename(os.path.join(staged, "config.pbtxt"), os.path.join(work, "config.pbtxt"))
        os.rename(os.path.join(staged, str(version)), os.path.join(work, str(version)))
        swap_into_place(os.path.join(work, str(version)), os.path.join(model_dir, str(version)), replace=force)
        os.replace(os.path.join(work, "config.pbtxt"), os.path.join(model_dir, "config.pbtxt"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        release_workdir(work)


def remove_version(repo: str, name: str, version: int, model_dir_existed: bool) -> None:
    """Undo a model version this run published (its artifact could not be placed after all)."""
    model_dir = os.path.join(repo, name)
    if not model_dir_existed:
        shutil.rmtree(model_dir, ignore_errors=True)
    else:
        shutil.rmtree(os.path.join(model_dir, str(version)), ignore_errors=True)


def check_version_free(repo: str, name: str, version: int, force: bool) -> None:
    if version < 1:
        raise MoecError(f"--model-version must be >= 1 (got {version}).")
    vdir = os.path.join(repo, name, str(version))
    if os.path.exists(vdir) and not force:
        raise OutputExistsError(
            f"Triton model version '{vdir}' already exists; moec never overwrites a model version unless "
            "asked: pass --force, or choose another --model-version."
        )


def write_model_repository(repo: str, name: str, model_path: str, files: list[str], *, version: int = 1,
                           force: bool = False, max_batch_size: Optional[int] = None, instances: int = 1,
                           platform: str = "onnxruntime_onnx", kind: str = "KIND_CPU", extra: str = "",
                           max_batch_cap: Optional[int] = None, config_text: Optional[str] = None,
                           extra_files: Optional[dict[str, str]] = None) -> str:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/VERSION/<model files>. `max_batch_cap`: the largest
    batch the model accepts (a TensorRT engine's profile; Triton refuses a larger max_batch_size).
    `config_text`: a config of the caller's (a python-backend model) instead of one from the ONNX
    signature; `extra_files`: name in the version directory -> file to copy there."""
    check_version_free(repo, name, version, force)
    text = config_text if config_text is not None else signature_config(
        name, model_path, max_batch_size, instances, platform, kind, extra, max_batch_cap)
    validate_config(text)
    files = [(f, "model.plan" if platform == "tensorrt_plan" and f == model_path else os.path.basename(f))
             for f in files] + [(src, dest) for dest, src in (extra_files or {}).items()]
    return _write_staged(repo, name, version, force, text, files)


def signature_config(name: str, model_path: str, max_batch_size: Optional[int], instances: int, platform: str,
                     kind: str, extra: str, max_batch_cap: Optional[int]) -> str:
    inputs, outputs, first_dims = onnx_signature(model_path if model_path.endswith(".onnx") else
                                                 os.path.join(os.path.dirname(model_path), "model.onnx"))
    batchable = bool(inputs) and all(d is not None and d == first_dims[0] for d in first_dims) and all(
        o.dims and o.dims[0] == -1 for o in outputs)
    if max_batch_size is None:
        max_batch_size = min(8, max_batch_cap or 8) if batchable else 0
    elif max_batch_cap is not None and max_batch_size > max_batch_cap:
        raise MoecError(f"--max-batch-size {max_batch_size} exceeds the TensorRT engine's optimization profile "
                        f"(max batch {max_batch_cap}); Triton would refuse to load the model. Use "
                        f"--max-batch-size <= {max_batch_cap}, or compile with a larger --max-shape batch=N.")
    if max_batch_size > 0 and not batchable:
        raise MoecError(
            f"--max-batch-size {max_batch_size}: the model's inputs do not share a dynamic first (batch) "
            "dimension, so Triton can't batch it; use --max-batch-size 0."
        )
    return render_config(name, inputs, outputs, max_batch_size, instances, platform, kind, extra)


def _write_staged(repo: str, name: str, version: int, force: bool, text: str, files: list[tuple[str, str]]) -> str:
    model_dir = os.path.join(repo, name)
    os.makedirs(repo, exist_ok=True)
    # Staged outside the repository (Triton tries to load every directory in it, hidden ones too), then
    # renamed in: a new model appears whole, a new version of an existing one appears whole. Where the
    # repository's parent can't take the stage (a mount point, '/', not writable), it is staged inside
    # the model's directory instead, which then exists, empty of versions, while the files are copied.
    stage_parent = staging_parent(repo)
    inside = stage_parent is None
    created_model_dir = inside and not os.path.isdir(model_dir)
    if inside:
        os.makedirs(model_dir, exist_ok=True)
        stage_parent = model_dir
    remove_stale_workdirs(stage_parent)
    if os.path.isdir(model_dir):
        remove_stale_workdirs(model_dir)  # left inside a model directory by an older moec
    tmp = make_workdir(stage_parent)
    placed = False
    try:
        staged = os.path.join(tmp, name)
        os.makedirs(os.path.join(staged, str(version)))
        for src, dest in files:
            shutil.copy2(src, os.path.join(staged, str(version), dest))
        with open(os.path.join(staged, "config.pbtxt"), "w") as fh:
            fh.write(text)
        if inside:
            _place_version(staged, model_dir, version, force)
        else:
            _place(staged, model_dir, version, force)
        placed = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_workdir(tmp)
        if not placed and created_model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
    return os.path.abspath(model_dir)


def generate_config(name: str, instances: int = 1) -> str:
    """A decoupled python-backend model answering Triton's generate extension (moec/triton_backends/
    genai_generate.py): text_input or input_ids, max_tokens and stream in; text_output and output_ids out."""
    def tensor(n: str, t: str, dims: str, optional: bool) -> str:
        return (f"  {{\n    name: \"{n}\"\n    data_type: {t}\n    dims: [ {dims} ]"
                + ("\n    optional: true" if optional else "") + "\n  }")

    inputs = [tensor("text_input", "TYPE_STRING", "1", True), tensor("input_ids", "TYPE_INT64", "-1", True),
              tensor("max_tokens", "TYPE_INT32", "1", True), tensor("stream", "TYPE_BOOL", "1", True)]
    outputs = [tensor("text_output", "TYPE_STRING", "1", False), tensor("output_ids", "TYPE_INT64", "-1", False)]
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
        "model_transaction_policy {\n  decoupled: true\n}",
        "input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]"]) + "\n"

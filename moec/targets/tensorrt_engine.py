"""Build a TensorRT engine from moec's TensorRT-flavored ONNX (documented builder API, TensorRT >= 10.8).

Optimization profiles come from the artifact's memory plan (min/opt/max of the dynamic dims), the
workspace pool limit from the plan's kernel workspace, a timing cache is kept next to the engine,
and engines are cached by a hash of the ONNX bytes, the settings, TensorRT's version and the GPU.
Everything TensorRT-specific sits behind `capability()`; nothing here runs without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

from moec.errors import MoecError


class EngineBuildError(MoecError):
    exit_code = 20


@dataclass(frozen=True)
class Capability:
    tensorrt: bool
    gpu: bool
    sm: Optional[tuple[int, int]]
    reason: str
    tensorrt_version: str = ""

    @property
    def imoe_layer(self) -> bool:
        """TensorRT's native IMoELayer (network.add_moe) needs SM100 or newer."""
        return self.tensorrt and self.gpu and self.sm is not None and self.sm >= (10, 0)


def capability() -> Capability:
    try:
        import tensorrt as trt
    except ImportError as exc:
        return Capability(False, False, None, f"TensorRT is not installed ({exc})")
    try:
        import torch

        gpu = torch.cuda.is_available()
        sm = torch.cuda.get_device_capability() if gpu else None
    except Exception:  # torch without CUDA
        gpu, sm = False, None
    if not gpu:
        return Capability(True, False, None, "no CUDA GPU is visible", trt.__version__)
    return Capability(True, True, tuple(sm), "", trt.__version__)


@dataclass(frozen=True)
class EngineSettings:
    profiles: dict  # input name -> (min shape, opt shape, max shape)
    workspace_bytes: int
    fp16: bool = False


def cache_key(onnx_path: str, settings: EngineSettings, trt_version: str, gpu: str) -> str:
    h = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps(asdict(settings), sort_keys=True, default=list).encode())
    h.update(f"{trt_version}|{gpu}".encode())
    return h.hexdigest()


def profiles_from_report(onnx_path: str, report: dict) -> dict:
    """Per graph input (min, opt, max) shapes from the memory plan's dim profiles."""
    import onnx

    dims = {name: p["dims"] for name, p in report["memory"]["profiles"].items()}
    model = onnx.load(onnx_path, load_external_data=False)
    out = {}
    for v in model.graph.input:
        shape = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out[v.name] = tuple(tuple(dims[p].get(s, s) if isinstance(s, str) else s for s in shape)
                            for p in ("min", "opt", "max"))
    return out


def build_engine(artifact_dir: str, settings: Optional[EngineSettings] = None, cache_dir: Optional[str] = None,
                 report: Optional[dict] = None) -> dict:
    """Build DIR/model.plan (or copy it from the engine cache); `report` defaults to DIR/report.json."""
    cap = capability()
    if not (cap.tensorrt and cap.gpu):
        raise EngineBuildError(f"cannot build a TensorRT engine here: {cap.reason}. Run `moec build-engine DIR` "
                               "on a host with an NVIDIA GPU and TensorRT >= 10.8.")
    import tensorrt as trt  # pragma: no cover - needs TensorRT and a GPU
    import torch

    from moec.plugins.tensorrt_plugin import register_plugins

    onnx_path = os.path.join(artifact_dir, "model.onnx")
    if report is None:
        with open(os.path.join(artifact_dir, "report.json")) as f:
            report = json.load(f)
    if settings is None:
        ws = report["memory"]["profiles"]["max"]["workspace_bytes"]
        settings = EngineSettings(profiles_from_report(onnx_path, report), max(int(ws) * 2, 256 << 20))
    register_plugins()
    gpu = torch.cuda.get_device_name()
    key = cache_key(onnx_path, settings, trt.__version__, gpu)
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "moec", "engines")
    cached = os.path.join(cache_dir, f"{key}.plan")
    engine_path = os.path.join(artifact_dir, "model.plan")
    if os.path.exists(cached):
        shutil.copy2(cached, engine_path)
        return {"path": "model.plan", "cache": "hit", "key": key}

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in settings.profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing_path = os.path.join(cache_dir, "timing.cache")
    os.makedirs(cache_dir, exist_ok=True)
    timing = config.create_timing_cache(open(timing_path, "rb").read() if os.path.exists(timing_path) else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the TensorRT log above).")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    shutil.copy2(engine_path, cached)
    with open(timing_path, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    return {"path": "model.plan", "cache": "miss", "key": key}

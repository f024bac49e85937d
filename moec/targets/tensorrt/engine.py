"""Build a TensorRT engine from moec's TensorRT-flavored ONNX (documented builder API, TensorRT >= 10.9).

Optimization profiles come from the artifact's memory plan (min/opt/max of the dynamic dims), the
workspace pool limit from the plan's kernel workspace, a timing cache is kept next to the engine,
and engines are cached by a hash of the ONNX bytes, the settings, TensorRT's version and the GPU.
On SM100/SM103/SM110 GPUs with TensorRT >= 10.16 the experts plugin layers TensorRT's IMoELayer
can compute are swapped for it (moec/targets/tensorrt/imoe.py); if that build fails, the engine is
built again with the plugin and the report says why. `EngineSession` runs a built engine (verify --engine).
Everything TensorRT-specific sits behind `capability()`; nothing here runs without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from typing import Optional

from moec.errors import ArtifactError, MoecError, SignatureMismatchError


class EngineBuildError(MoecError):
    exit_code = 20


MIN_TENSORRT = (10, 9)  # tensorrt.plugin's aot_impl, SymIntExprs and the parser's `aot` attribute


def tensorrt_version_problem(version: str) -> Optional[str]:
    """Why TensorRT `version` can't build moec's engines, or None."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return f"TensorRT reports an unreadable version '{version}'"
    if len(major_minor) < 2 or major_minor < MIN_TENSORRT:
        return (f"TensorRT {version} is too old: moec's plugin needs TensorRT >= "
                f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} (tensorrt.plugin's aot_impl)")
    return None


@dataclass(frozen=True)
class Capability:
    tensorrt: bool
    gpu: bool
    sm: Optional[tuple[int, int]]
    reason: str
    tensorrt_version: str = ""

    @property
    def imoe_layer(self) -> bool:
        """TensorRT's native IMoELayer (network.add_moe, TensorRT >= 10.16) runs on SM 10.x and 11.x
        (Blackwell data center, Thor); TensorRT documents SM 12.x as unsupported."""
        return self.imoe_why_not is None

    @property
    def imoe_why_not(self) -> Optional[str]:
        if not (self.tensorrt and self.gpu):
            return self.reason
        if self.sm is None or not (10, 0) <= self.sm < (12, 0):
            return f"IMoELayer needs an SM100/SM103/SM110 GPU; this one is SM{self.sm[0]}{self.sm[1]}"
        if not self.has_add_moe:
            return f"TensorRT {self.tensorrt_version} has no IMoELayer (network.add_moe is new in 10.16)"
        return None

    has_add_moe: bool = False


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
    too_old = tensorrt_version_problem(trt.__version__)
    if too_old:
        return Capability(False, gpu, tuple(sm) if sm else None, too_old, trt.__version__)
    if not gpu:
        return Capability(True, False, None, "no CUDA GPU is visible", trt.__version__)
    return Capability(True, True, tuple(sm), "", trt.__version__, hasattr(trt.INetworkDefinition, "add_moe"))


@dataclass(frozen=True)
class EngineSettings:
    profiles: dict  # input name -> (min shape, opt shape, max shape)
    workspace_bytes: int
    imoe: bool = True  # swap eligible experts plugin layers for IMoELayer where the GPU and TensorRT have it


def workspace_bytes(report: dict, floor: int = 256 << 20) -> int:
    """TensorRT's workspace pool for an artifact: twice the kernel workspace its memory plan found at
    the max profile (the plan's figure is ONNX Runtime's; TensorRT's tactics may want more)."""
    ws = ((report.get("memory") or {}).get("profiles") or {}).get("max", {}).get("workspace_bytes")
    return max(int(ws) * 2, floor) if ws is not None else max(1 << 30, floor)


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
                 report: Optional[dict] = None, imoe: Optional[bool] = None, log=print) -> dict:
    """Build DIR/model.plan (or copy it from the engine cache); `report` defaults to DIR/report.json.
    `imoe` (default: settings.imoe, True) allows the IMoELayer swap.

    Returns {"path", "cache": "hit"|"miss", "key", "imoe": {"available", "why_not", "swapped",
    "refused", "fallback"}}."""
    cap = capability()
    if not (cap.tensorrt and cap.gpu):
        raise EngineBuildError(f"cannot build a TensorRT engine here: {cap.reason}. Run `moec build-engine DIR` "
                               "on a host with an NVIDIA GPU and TensorRT >= 10.9.")
    import onnx  # pragma: no cover - needs TensorRT and a GPU
    import tensorrt as trt
    import torch

    from moec.plugins.tensorrt_plugin import register_plugins
    from moec.targets.tensorrt.imoe import ImoeSwap, swap_in_imoe_layers

    onnx_path = os.path.join(artifact_dir, "model.onnx")
    if report is None:
        with open(os.path.join(artifact_dir, "report.json")) as f:
            report = json.load(f)
    if settings is None:
        settings = EngineSettings(profiles_from_report(onnx_path, report), workspace_bytes(report))
    if imoe is not None:
        settings = replace(settings, imoe=imoe)
    register_plugins()
    gpu = torch.cuda.get_device_name()
    key = cache_key(onnx_path, settings, trt.__version__, gpu)
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "moec", "engines")
    cached = os.path.join(cache_dir, f"{key}.plan")
    engine_path = os.path.join(artifact_dir, "model.plan")
    if os.path.exists(cached) and os.path.exists(cached + ".json"):
        shutil.copy2(cached, engine_path)
        with open(cached + ".json") as f:
            return {**json.load(f), "cache": "hit"}

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    os.makedirs(cache_dir, exist_ok=True)
    timing_path = os.path.join(cache_dir, "timing.cache")

    def parse():
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
        return network, parser  # the parser owns weights the network points at: keep it alive

    def build(network):
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        # precisions come from the ONNX's types (no FP16 builder flag: TensorRT 11 dropped it)
        # the plugin's output aliases its zero-filled accumulator input, which TensorRT accepts only
        # with this preview feature on (documented for IPluginV3 aliasing since 10.3)
        if hasattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03"):
            config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in settings.profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        timing = config.create_timing_cache(open(timing_path, "rb").read() if os.path.exists(timing_path) else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        return builder.build_serialized_network(network, config), config

    why_not = cap.imoe_why_not if settings.imoe else "disabled (--no-imoe)"
    network, parser = parse()
    swap, serialized = ImoeSwap(), None
    if why_not is None:
        failure = None
        try:
            swap = swap_in_imoe_layers(network, onnx.load(onnx_path, load_external_data=False), trt)
            log(f"IMoELayer: {len(swap.swapped)} experts layer(s) swapped in, {len(swap.refused)} kept as plugins")
            if swap.swapped:
                serialized, config = build(network)
                failure = None if serialized is not None else "the builder returned no engine (see its log above)"
        except Exception as exc:  # an API TensorRT documents but this build lacks, a layer it rejects ...
            failure = f"{type(exc).__name__}: {exc}"
        if failure:
            swap = ImoeSwap(refused=swap.refused, fallback=f"TensorRT could not build the engine with IMoELayers "
                                                            f"({failure}); built with the experts plugin instead")
            log(swap.fallback)
            network, parser = parse()  # a fresh network: the failed one may be half rewritten
    if serialized is None:
        serialized, config = build(network)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the TensorRT log above).")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    with open(timing_path, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    result = {"path": "model.plan", "key": key,
              "imoe": {"available": why_not is None, "why_not": why_not, **swap.to_dict()}}
    shutil.copy2(engine_path, cached)
    with open(cached + ".json", "w") as f:
        json.dump(result, f)
    return {**result, "cache": "miss"}


class EngineSession:
    """A built engine, loaded once (deserialized, one execution context) and run on numpy feeds.
    Needs TensorRT and a GPU; says why not otherwise (ArtifactError, exit 12)."""

    def __init__(self, engine_path: str):
        cap = capability()
        if not (cap.tensorrt and cap.gpu):
            raise ArtifactError(f"cannot run the TensorRT engine '{engine_path}' here: {cap.reason}")
        import tensorrt as trt  # pragma: no cover - needs TensorRT and a GPU
        import torch

        from moec.plugins.tensorrt_plugin import register_plugins, torch_dtypes

        register_plugins()  # the JIT plugin's Python implementation runs inside the engine
        self.trt, self.torch, self.path, self.to_torch = trt, torch, engine_path, torch_dtypes()
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not load '{engine_path}' (built by another TensorRT version or "
                                "for another GPU? rebuild it with `moec build-engine`)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]

    def _dtype(self, name):
        dt = self.engine.get_tensor_dtype(name)
        if dt not in self.to_torch:
            raise ArtifactError(f"engine tensor '{name}' has type {dt}, which moec can't feed or read")
        return self.to_torch[dt]

    def run(self, feeds: dict) -> dict:  # pragma: no cover - needs TensorRT and a GPU
        """numpy outputs by name for numpy `feeds` (cast to the engine's input types)."""
        import numpy as np

        torch, ctx = self.torch, self.context
        if set(self.inputs) != set(feeds):
            raise SignatureMismatchError(f"inputs {sorted(feeds)} do not match the engine's {sorted(self.inputs)}")
        tensors = {}
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self._dtype(name))
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise SignatureMismatchError(f"input '{name}' of shape {tuple(t.shape)} is outside the engine's "
                                             f"optimization profile {self.engine.get_tensor_profile_shape(name, 0)}")
            tensors[name] = t
        for name in self.names:
            if name not in tensors:
                tensors[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
            ctx.set_tensor_address(name, tensors[name].data_ptr())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the input copies above run on the current stream
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError(f"TensorRT failed to run '{self.path}'")
        stream.synchronize()
        # numpy has no bfloat16: such outputs come back as float32 (the golden comparison then names the dtype)
        return {n: (tensors[n].float() if tensors[n].dtype == torch.bfloat16 else tensors[n]).cpu().numpy()
                for n in self.names if n not in self.inputs}

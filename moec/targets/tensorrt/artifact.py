"""The tensorrt target's artifact extras: plugin definitions, and an engine where TensorRT can build one.

The engine builder itself (TensorRT's documented builder API, optimization profiles, timing and
engine caches) lives in engine.py behind a capability check; here we decide whether to call it, run
a built engine on the artifact's goldens, say exactly what was skipped and why, and decide what a
Triton model repository gets.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from moec.targets.base import ArtifactContext, TritonModel
from moec.targets.tensorrt.plugin_spec import PLUGIN

HOW_TO_BUILD = ("copy this directory to a host with an NVIDIA GPU and TensorRT >= 10.9 "
                "(pip install 'moec[tensorrt]'), then run `moec build-engine DIR`")


def triton_model(artifact: ArtifactContext) -> TritonModel:
    """The Triton model for a --target tensorrt artifact being built in `artifact.workdir`.

    Triton's servers run no Python in their TensorRT and ONNX Runtime backends, and moec's experts
    plugin is a Python plugin (tensorrt.plugin): only an engine whose plugin layers are AOT (PTX
    embedded in the plan) runs there as it is. Anything else is served as ONNX Runtime with the
    TensorRT accelerator, from the copy of the ONNX whose plugin nodes are expanded to standard ops
    (plugin_reference.py: the subgraph the artifact was verified with, `artifact.evaluable_files`)."""
    from moec.targets.tensorrt.engine import workspace_bytes
    from moec.triton_repo import tensorrt_accelerator_config

    report, aot = artifact.report, bool(artifact.options.extra.get("tensorrt_aot"))
    engine = (report.get("tensorrt") or {}).get("engine") or {}
    if engine.get("built") and aot:  # pragma: no cover - needs TensorRT and a GPU
        plan = os.path.join(artifact.workdir, engine["path"])
        return TritonModel(plan, [plan], "tensorrt_plan", "KIND_GPU", "",
                           "TensorRT engine with the AOT plugin (no plugin code needed in the server)",
                           profile_max_batch(artifact.model_path, report))
    why = ("the engine uses the JIT plugin, whose Python implementation Triton's backends can't run "
           "(compile with --tensorrt-aot for a tensorrt_plan model)" if engine.get("built")
           else "no TensorRT engine was built here")
    note = (f"ONNX Runtime with the TensorRT accelerator ({why}); its experts plugin nodes are expanded to "
            "standard ONNX ops that compute every expert for every token (exact, but E/k times the experts' "
            "work), because Triton can't load moec's Python plugin")
    files = artifact.evaluable_files
    return TritonModel(files[0], list(files), "onnxruntime_onnx", "KIND_GPU",
                       tensorrt_accelerator_config(workspace_bytes(report)), note)


def profile_max_batch(onnx_path: str, report: dict) -> Optional[int]:
    """The max-profile size of the first input's first (batch) dim, when it is dynamic."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
    name = dims[0].dim_param if dims else ""
    max_dims = (((report.get("memory") or {}).get("profiles") or {}).get("max") or {}).get("dims") or {}
    return int(max_dims[name]) if name and name in max_dims else None


def capability() -> tuple[bool, str]:
    """(can build engines here, why not)."""
    from moec.targets.tensorrt.engine import capability as engine_capability

    cap = engine_capability()
    return bool(cap.tensorrt and cap.gpu), cap.reason


def write_tensorrt_extras(out_dir: str, report: dict, log: Callable[[str], None]) -> dict:
    with open(os.path.join(out_dir, "plugins.json"), "w") as f:
        json.dump({"plugins": [PLUGIN.describe()],
                   "registration": "import moec.plugins.tensorrt_plugin; moec.plugins.tensorrt_plugin.register_plugins()"},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    ok, reason = capability()
    result = {"plugins_file": "plugins.json", "plugin": f"{PLUGIN.namespace}::{PLUGIN.name} v{PLUGIN.version}"}
    if not ok:
        log(f"TensorRT engine skipped: {reason}")
        result["engine"] = {"built": False, "reason": reason, "how_to_build": HOW_TO_BUILD}
        return result
    result["engine"] = build_and_verify_engine(out_dir, report, log)  # pragma: no cover
    return result


def build_and_verify_engine(out_dir: str, report: Optional[dict] = None, log: Callable[[str], None] = print,
                            imoe: Optional[bool] = None, cache_dir: Optional[str] = None) -> dict:
    """Build the engine (needs TensorRT and a GPU) and run it on the artifact's goldens.

    An engine with IMoELayers that misses the goldens is rebuilt with the experts plugin (TensorRT
    documents no precision for IMoELayer); any other mismatch raises VerificationError (exit 8; in a
    compile nothing is written)."""
    from moec.errors import VerificationError
    from moec.targets.tensorrt.engine import build_engine
    from moec.verify import verify

    log("building the TensorRT engine")
    engine = build_engine(out_dir, report=report, log=log, imoe=imoe, cache_dir=cache_dir)
    log("verifying the TensorRT engine against the goldens")
    checked = verify(out_dir, engine=True)
    if not checked.passed and engine["imoe"]["swapped"]:
        reason = (f"the engine with IMoELayers missed the goldens (worst relative L2 {checked.worst_rel_l2:.3g} > "
                  f"{checked.tolerance:g}); rebuilt with the experts plugin")
        log(reason)
        engine = build_engine(out_dir, report=report, log=log, imoe=False, cache_dir=cache_dir)
        engine["imoe"] = {**engine["imoe"], "why_not": None, "fallback": reason}
        checked = verify(out_dir, engine=True)
    engine["verified"] = {"passed": checked.passed, "tolerance": checked.tolerance,
                          "worst_rel_l2": checked.worst_rel_l2}
    if not checked.passed:
        raise VerificationError(f"the TensorRT engine built from {out_dir}/model.onnx does not reproduce the "
                                f"goldens: {checked.failures}")
    return {"built": True, **engine}

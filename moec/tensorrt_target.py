"""The tensorrt target's artifact extras: plugin definitions, and an engine where TensorRT can build one.

The engine builder itself (TensorRT's documented builder API, optimization profiles, timing and
engine caches) lives in moec/targets/tensorrt_engine.py behind a capability check; here we
decide whether to call it, run a built engine on the artifact's goldens, and say exactly what was
skipped and why.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from moec.plugin_spec import PLUGIN

HOW_TO_BUILD = ("copy this directory to a host with an NVIDIA GPU and TensorRT >= 10.9 "
                "(pip install 'moec[tensorrt]'), then run `moec build-engine DIR`")


def capability() -> tuple[bool, str]:
    """(can build engines here, why not)."""
    from moec.targets.tensorrt_engine import capability as engine_capability

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
    from moec.targets.tensorrt_engine import build_engine
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

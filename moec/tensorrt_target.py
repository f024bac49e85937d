"""The tensorrt target's artifact extras: plugin definitions, and an engine where TensorRT can build one.

The engine builder itself (TensorRT's documented builder API, optimization profiles, timing and
engine caches) lives in moec/targets/tensorrt_engine.py behind a capability check; here we only
decide whether to call it and say exactly what was skipped and why.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from moec.plugin_spec import PLUGIN

HOW_TO_BUILD = ("copy this directory to a host with an NVIDIA GPU and TensorRT >= 10.8 "
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
    from moec.targets.tensorrt_engine import build_engine  # pragma: no cover - needs TensorRT and a GPU

    log("building the TensorRT engine")
    engine = build_engine(out_dir, report=report)  # pragma: no cover
    result["engine"] = {"built": True, **engine}  # pragma: no cover
    return result

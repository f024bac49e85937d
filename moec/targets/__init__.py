"""The compile targets: one folder each, registered here by name (the CLI's --target choices).

Adding a target: a folder moec/targets/<name>/ whose __init__.py defines `TARGET`, a
moec.targets.base.Target, and one line in `_BUILTIN`. A target defined elsewhere (a plugin
package, a test) is added at run time with `register(target)`.
"""

from __future__ import annotations

import importlib

from moec.errors import MoecError
from moec.targets.base import Target

# name -> module defining TARGET; imported on first use (the CLI lists names without importing torch).
_BUILTIN = {
    "onnxruntime": "moec.targets.onnxruntime",
    "tensorrt": "moec.targets.tensorrt",
}
_REGISTERED: dict[str, Target] = {}


def names() -> list[str]:
    return list(_BUILTIN) + [n for n in _REGISTERED if n not in _BUILTIN]


def register(target: Target) -> Target:
    """Add (or replace) a target under `target.name`; returns it."""
    _REGISTERED[target.name] = target
    return target


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def get(name: str) -> Target:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise MoecError(f"unknown target '{name}'; choose one of {', '.join(names())}.")
    target = importlib.import_module(_BUILTIN[name]).TARGET
    _REGISTERED[name] = target
    return target


def all_targets() -> list[Target]:
    return [get(n) for n in names()]

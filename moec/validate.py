"""Everything a compile can refuse before doing any work: destinations, names and option domains.

Each check raises a MoecError naming the option, the value and what would be accepted; the CLI
turns it into its exit code (2 for usage, 9 for a destination that exists without --force).
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

from moec.errors import MoecError, OutputExistsError

# Triton model names are directory names in the repository: one path component, and we keep to the
# characters every filesystem and Triton's own URLs take.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_model_name(name: str) -> None:
    if not name or not _MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise MoecError(f"--model-name {name!r} is not a valid Triton model name: it becomes a directory of the "
                        "repository, so it must be one path component of letters, digits, '_', '.' or '-' "
                        "(starting with a letter or digit, at most 128 characters), e.g. 'moe_model'.")


def check_destination(path: str, flag: str, force: bool = False, must_be_dir_if_exists: bool = False) -> None:
    """`path` can be created (its nearest existing ancestor is a writable directory), and is not in the way."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            if must_be_dir_if_exists:
                raise MoecError(f"{flag} '{path}' is a file, not a directory.")
            if not force:
                raise OutputExistsError(f"{flag} '{path}' exists and is a file; moec never overwrites it unless "
                                        "asked: pass --force to replace it, or choose another path.")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise MoecError(f"{flag} '{path}': '{ancestor}' is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MoecError(f"{flag} '{path}': the directory '{ancestor}' is not writable by this user.")


def check_positive(value: Optional[float], flag: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise MoecError(f"{flag} {value}: must be a finite number {'>= 0' if allow_zero else '> 0'}.")


def check_max_shape(max_shape: Optional[dict], dim_ranges: dict) -> None:
    """--max-shape names dims the model has, with sizes its Dims allow."""
    for name, size in (max_shape or {}).items():
        if name not in dim_ranges:
            have = ", ".join(dim_ranges) or "none (its shapes are static)"
            raise MoecError(f"--max-shape {name}={size}: the model has no dynamic dim '{name}'; its dynamic dims "
                            f"are {have}.")
        lo, hi, _ = dim_ranges[name]
        if size < max(lo, 1) or (hi is not None and size > hi):
            bound = f"{max(lo, 1)}..{hi}" if hi is not None else f">= {max(lo, 1)}"
            raise MoecError(f"--max-shape {name}={size}: the model's dim '{name}' takes {bound}.")

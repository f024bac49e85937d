"""Atomic directory placement: artifacts appear whole or not at all."""

from __future__ import annotations

import os
import shutil


def swap_into_place(tmp: str, dest: str) -> None:
    """Rename the finished directory `tmp` to `dest`, replacing an existing `dest` (caller checked --force).

    The old directory is renamed aside first, so at every moment `dest` is either the old
    artifact or the new one, never a mix.
    """
    if os.path.exists(dest):
        old = tmp + ".old"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)

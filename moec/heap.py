"""Keep a streaming compile's resident memory at what it holds, not at what it once held.

An out-of-core compile allocates and frees the same large tensors over and over (an expert's weights, a
layer's codes). glibc serves allocations below its mmap threshold from the heap, and raises that threshold
to the size of any mmapped block freed (up to 32 MiB): after the first layer, every expert-sized tensor
comes from the heap, where a long-lived block allocated between two of them (a packed code array kept for
the layer) stops the freed space from going back to the system, and resident memory climbs layer by layer.
`bounded_heap()` fixes the threshold at 1 MiB (large blocks always mmapped, so freeing them returns them),
and `trim()` hands the heap's free pages back after each layer. Both are no-ops off glibc. The threshold is
the process's: it stays fixed after the compile (a cost of one mmap per large allocation, no change of results).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

M_MMAP_THRESHOLD = -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 20

_libc: Optional[ctypes.CDLL] = None
_looked = False


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _looked
    if not _looked:
        _looked = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # glibc's own: absent elsewhere (musl, macOS)
            _libc = libc
        except (OSError, AttributeError):
            pass
    return _libc


def bounded_heap() -> bool:
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss() -> int:
    """The process's peak resident bytes so far (VmHWM), 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

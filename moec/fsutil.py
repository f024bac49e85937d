"""Atomic directory placement: artifacts appear whole or not at all.

Work happens in a temporary directory beside the destination, named for its owner
(`.moec-tmp-<host>-<pid>-<random>`), and is renamed into place when done. The owner holds an flock
on the directory for as long as it lives (the kernel drops it when the process dies, whatever its
PID namespace). A compile killed outright (SIGKILL, power loss) can't clean up after itself; the next
one in the same place removes temporary directories of this host whose lock nobody holds. A directory
is created under another prefix (`.moec-new-`) and renamed once locked, so a run cleaning up never
mistakes one being born for one abandoned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from typing import Callable, Optional

PREFIX = ".moec-tmp-"
NEW_PREFIX = ".moec-new-"  # a work directory before its lock is taken (make_workdir)
NEW_GRACE_S = 60.0  # an unlocked .moec-new- directory younger than this may still be about to be locked
_OWNED = re.compile(r"(?P<prefix>" + re.escape(PREFIX) + "|" + re.escape(NEW_PREFIX)
                    + r")(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-")
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def make_workdir(parent: str) -> str:
    """A new temporary directory in `parent`, named for this process, with the permissions the umask gives
    a normal directory (mkdtemp's 0700 would keep a Triton server running as another user out)."""
    os.makedirs(parent, exist_ok=True)
    # Made under a name of its own, locked, then renamed: an unlocked directory under PREFIX means its
    # owner is gone, so another run cleaning `parent` in between must not see this one before its lock.
    new = tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{_host()}-{os.getpid()}-", dir=parent)
    path = os.path.join(parent, PREFIX + os.path.basename(new)[len(NEW_PREFIX):])
    fd = None
    try:
        fd = os.open(new, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until released or this process exits (it follows the inode across renames)
        os.chmod(new, 0o777 & ~umask())
        os.rename(new, path)  # a fresh random suffix: nothing else has this name
    except BaseException:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(new, ignore_errors=True)
        raise
    _HELD[path] = fd
    return path


_HELD: dict[str, int] = {}  # work directory (as created) -> its lock descriptor


def release_workdir(path: str) -> None:
    """Drop the lock of a work directory this process made (after it was renamed into place or removed)."""
    fd = _HELD.pop(path, None)
    if fd is not None:
        os.close(fd)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owned_by_a_live_process(path: str) -> bool:
    """Whether some process holds the directory's lock (its owner, alive in any PID namespace)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # can't tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's own lock
    return False


def _younger_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < seconds
    except OSError:
        return True  # gone or unreadable: leave it


def _pid_alive(pid: int) -> bool:
    """Whether a process of this PID exists here (a directory not yet locked has no other sign of life)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def remove_stale_workdirs(parent: str, log: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Remove temporary directories in `parent` left by dead moec processes on this host; returns them."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.match(name)
        path = os.path.join(parent, name)
        if not m or m.group("host") != _host() or (os.path.isdir(path) and _owned_by_a_live_process(path)):
            continue
        if m.group("prefix") == NEW_PREFIX and (_pid_alive(int(m.group("pid"))) or _younger_than(path, NEW_GRACE_S)):
            continue  # unlocked only because its owner is about to lock it (its PID may be another namespace's)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:  # a config written beside its version directory (triton_repo)
            try:
                os.remove(path)
            except OSError:
                pass
        if not os.path.exists(path):
            removed.append(path)
            log(f"removed {path}, left by an interrupted moec run (process {m.group('pid')})")
    return removed


def disk_error(exc: BaseException) -> Optional[OSError]:
    """The out-of-space (or file-size-limit) OSError behind `exc`, if that is what it is."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def swap_into_place(tmp: str, dest: str, replace: bool = True) -> None:
    """Rename the finished directory `tmp` to `dest`.

    `replace`: an existing `dest` (directory or file) is renamed aside first, so at every moment `dest`
    is either the old artifact or the new one, never a mix. Otherwise the rename itself is the check:
    if `dest` appeared meanwhile (a concurrent writer), OutputExistsError, and `dest` is untouched.
    """
    from moec.errors import OutputExistsError

    if not replace or not os.path.lexists(dest):
        try:
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "exists", dest)
            os.rename(tmp, dest)  # onto an existing non-empty directory this fails: never a silent overwrite
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            raise OutputExistsError(f"'{dest}' appeared while moec was writing it (another run?); not "
                                    "replacing it without --force.") from exc
        return
    old = tmp + ".old"
    with _signals_blocked():  # between the two renames DEST is absent: no Ctrl-C / SIGTERM may land there
        os.rename(dest, old)
        os.rename(tmp, dest)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


@contextlib.contextmanager
def _signals_blocked():
    """Hold SIGINT/SIGTERM until the block ends (they are delivered then)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (AttributeError, ValueError, OSError):  # not supported here
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

"""Nothing half-written: interrupted, killed and out-of-disk compiles leave no artifact, and the next
compile removes what a killed one could not."""

import os
import signal
import subprocess
import sys
import time

import pytest

from moec.fsutil import PREFIX, make_workdir, remove_stale_workdirs

ENV = dict(os.environ, OMP_WAIT_POLICY="passive", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
# a two-layer model from the zoo: the same stages as the 4-layer demo in under half the time
SOURCE = "moec.zoo:granitemoe"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leftovers(root) -> list:
    return [p for p in os.listdir(root) if p.startswith(PREFIX)]


def test_stale_workdirs_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    mine = make_workdir(str(tmp_path))
    host = os.path.basename(mine)[len(PREFIX):].rsplit("-", 2)[0]
    dead = tmp_path / f"{PREFIX}{host}-{_dead_pid()}-abc123"
    other_host = tmp_path / f"{PREFIX}elsewhere-{_dead_pid()}-abc123"
    unowned = tmp_path / f"{PREFIX}xyz"  # an older moec's name: owner unknown, kept
    for d in (dead, other_host, unowned):
        (d / "golden").mkdir(parents=True)
    assert remove_stale_workdirs(str(tmp_path)) == [str(dead)]
    assert sorted(_leftovers(tmp_path)) == sorted([os.path.basename(mine), other_host.name, unowned.name])


def _compile_until(tmp_path, marker: str, sig: int, delay: float = 0.0, extra=()):
    """Start `moec compile SOURCE`, send `sig` once stderr shows `marker`; returns (rc, stderr, out)."""
    out = tmp_path / "out"
    # SIGINT as a terminal would deliver it: pytest-xdist's workers ignore SIGINT, and children inherit that
    p = subprocess.Popen([sys.executable, "-m", "moec.cli", "compile", SOURCE, "--out", str(out), *extra],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            p.send_signal(sig)
            break
    seen += p.stderr.read().splitlines(keepends=True)
    return p.wait(timeout=300), "".join(seen), out


@pytest.mark.slow
@pytest.mark.parametrize("sig,rc,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_compile_leaves_nothing(sig, rc, word, tmp_path):
    code, err, out = _compile_until(tmp_path, "verify:", sig)
    assert code == rc and f"moec: {word}; nothing was written" in err, err[-2000:]
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["verify:", "package:"])
def test_a_killed_compile_is_cleaned_up_by_the_next(stage, tmp_path):
    """SIGKILL at a stage: no output and no partial Triton model; the next compile removes the leftovers."""
    repo = tmp_path / "repo"
    code, err, out = _compile_until(tmp_path, stage, signal.SIGKILL, extra=["--triton-repo", str(repo)])
    assert code == -signal.SIGKILL and not out.exists()
    left = _leftovers(tmp_path)
    assert len(left) >= 1  # killed mid-way: its work dir stays (the compile's, and the repository's staging)
    assert not repo.exists() or os.listdir(repo) in ([], ["moe_model"])
    if repo.exists() and os.listdir(repo):  # it got as far as placing the model: then it is whole
        assert sorted(os.listdir(repo / "moe_model")) == ["1", "config.pbtxt"]
    r = subprocess.run([sys.executable, "-m", "moec.cli", "compile", SOURCE, "--out", str(out),
                        "--triton-repo", str(repo), "--force"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and all(f"removed {tmp_path / d}" in r.stderr for d in left), r.stderr[-1500:]
    assert not _leftovers(tmp_path) and (out / "model.onnx").exists()
    assert sorted(os.listdir(repo / "moe_model")) == ["1", "config.pbtxt"]


@pytest.mark.slow
def test_running_out_of_disk_says_so_and_leaves_nothing(tmp_path):
    """A file-size limit makes the artifact's writes fail the way a full disk does (EFBIG, like ENOSPC)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "from moec.cli import main; sys.exit(main(['compile', '--out', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 22, r.stderr[-2000:]
    assert "out of disk space writing the artifact (File too large" in r.stderr
    assert "Nothing was written" in r.stderr
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_artifacts_get_the_umask_permissions_not_mkdtemp_0700(tmp_path):
    from moec.fsutil import umask

    work = make_workdir(str(tmp_path))
    assert os.stat(work).st_mode & 0o777 == 0o777 & ~umask()


def test_force_replaces_a_file_and_leaves_nothing_beside_it(tmp_path):
    from moec.fsutil import swap_into_place

    dest, work = tmp_path / "out", make_workdir(str(tmp_path))
    dest.write_text("an old file")
    (tmp_path / os.path.basename(work) / "model.onnx").write_text("new")
    swap_into_place(work, str(dest), replace=True)
    assert (dest / "model.onnx").read_text() == "new" and os.listdir(tmp_path) == ["out"]


def test_without_replace_a_destination_that_appeared_is_left_alone(tmp_path):
    from moec.errors import OutputExistsError
    from moec.fsutil import swap_into_place

    dest, work = tmp_path / "out", make_workdir(str(tmp_path))
    (dest / "1").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="appeared while moec was writing it"):
        swap_into_place(work, str(dest), replace=False)
    assert os.listdir(dest) == ["1"]


def test_a_new_workdir_is_never_taken_for_a_stale_one(tmp_path, monkeypatch):
    """Between creating its directory and locking it, a run must not look abandoned: another run cleaning
    the same parent at that moment removed it, and the first failed with FileNotFoundError (seen with
    eight compiles into one Triton repository). The other run's cleaner is made to arrive in that window."""
    import moec.fsutil as fsutil

    removed = []
    real_chmod = os.chmod

    def chmod_after_a_cleaner(path, mode):
        removed.extend(remove_stale_workdirs(str(tmp_path)))
        real_chmod(path, mode)

    monkeypatch.setattr(fsutil.os, "chmod", chmod_after_a_cleaner)
    path = make_workdir(str(tmp_path))
    monkeypatch.undo()
    assert removed == [] and os.path.isdir(path)
    assert remove_stale_workdirs(str(tmp_path)) == []  # locked now: still live


def test_a_workdir_that_died_before_its_lock_is_cleaned_up(tmp_path):
    mine = make_workdir(str(tmp_path))
    host = os.path.basename(mine)[len(PREFIX):].rsplit("-", 2)[0]
    unlocked_dead = tmp_path / f"{fsutil_new_prefix()}{host}-{_dead_pid()}-abc123"
    unlocked_live = tmp_path / f"{fsutil_new_prefix()}{host}-{os.getpid()}-abc124"  # being created right now
    unlocked_young = tmp_path / f"{fsutil_new_prefix()}{host}-{_dead_pid()}-abc125"  # its PID may be another namespace's
    for d in (unlocked_dead, unlocked_live, unlocked_young):
        d.mkdir()
    old = time.time() - 600
    os.utime(unlocked_dead, (old, old))
    os.utime(unlocked_live, (old, old))
    assert remove_stale_workdirs(str(tmp_path)) == [str(unlocked_dead)]
    assert unlocked_live.is_dir() and unlocked_young.is_dir()


def fsutil_new_prefix() -> str:
    from moec.fsutil import NEW_PREFIX
    return NEW_PREFIX

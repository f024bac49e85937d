"""Run a real Triton Inference Server on loopback: start, wait until ready, read why a model failed, stop.

The server comes from tools/setup_triton_server.sh (.venv-triton). Ports are picked free in
advance, every address is 127.0.0.1, the log is kept for error messages, and `stop()` always
ends the whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from moec.errors import ModelNotReadyError, ServerError


@dataclass(frozen=True)
class ServerInstall:
    tritonserver: str
    backends: str
    venv_bin: str
    lib_dirs: tuple[str, ...]


def find_install(root: Optional[str] = None) -> ServerInstall:
    root = root or os.environ.get("MOEC_TRITON_VENV") or os.path.join(_repo_root(), ".venv-triton")
    ready = os.path.join(root, "bin", "tritonserver-ready")
    if not os.path.exists(ready):
        raise ServerError(
            f"no Triton server installed at '{root}'. Run `bash tools/setup_triton_server.sh` (it installs "
            "nvidia-pytriton's tritonserver into .venv-triton), or set MOEC_TRITON_VENV."
        )
    site = next(
        os.path.join(root, "lib", d, "site-packages") for d in os.listdir(os.path.join(root, "lib"))
        if d.startswith("python")
    )
    return ServerInstall(
        tritonserver=os.path.join(site, "pytriton", "tritonserver", "bin", "tritonserver"),
        backends=os.path.join(root, "backends"),
        venv_bin=os.path.join(root, "bin"),
        lib_dirs=(os.path.join(site, "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""),
    )


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """`with TritonServer(repo) as server: server.http_url ...`"""

    def __init__(self, model_repository: str, install: Optional[ServerInstall] = None, startup_timeout: float = 60.0):
        self.repo = os.path.abspath(model_repository)
        self.install = install or find_install()
        self.startup_timeout = startup_timeout
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: Optional[subprocess.Popen] = None
        self._log = tempfile.NamedTemporaryFile(prefix="tritonserver-", suffix=".log", delete=False)
        self._final_log: Optional[str] = None  # the log's text once stop() has removed its file

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        with open(self._log.name, errors="replace") as f:
            return f.read()

    def start(self) -> "TritonServer":
        if self._final_log is not None:  # started again after a stop: a fresh log
            self._log = tempfile.NamedTemporaryFile(prefix="tritonserver-", suffix=".log", delete=False)
            self._final_log = None
        i = self.install
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([i.venv_bin, env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*i.lib_dirs, env.get("LD_LIBRARY_PATH", "")])
        cmd = [
            i.tritonserver, f"--model-repository={self.repo}", f"--backend-directory={i.backends}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--exit-on-error=false", "--strict-readiness=false",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerError(f"tritonserver exited with code {code} while starting:\n" + self.log()[-3000:])
            if self._get("/v2/health/live") == 200:
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver was not live after {self.startup_timeout:.0f} s:\n" + self.log()[-3000:])

    def _get(self, path: str) -> Optional[int]:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def wait_model_ready(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._get(f"/v2/models/{name}/ready") == 200:
                return
            reason = model_failure_reason(self.http_url, name)
            if reason:
                raise ModelNotReadyError(f"Triton could not load model '{name}': {reason}")
            time.sleep(0.2)
        raise ModelNotReadyError(f"model '{name}' was not ready after {timeout:.0f} s; server log:\n"
                                 + self.log()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self.proc = None
        if self._final_log is None:  # keep the text for log(), leave no file behind
            self._final_log = self.log()
            self._log.close()
            os.unlink(self._log.name)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def model_failure_reason(http_url: str, name: str) -> Optional[str]:
    """The server's own words for why `name` is UNAVAILABLE (repository index), or None."""
    import json

    req = urllib.request.Request(f"http://{http_url}/v2/repository/index", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            index = json.loads(r.read())
    except (OSError, ValueError):
        return None
    for entry in index:
        if entry.get("name") == name and entry.get("state") == "UNAVAILABLE":
            return entry.get("reason") or "UNAVAILABLE (no reason given)"
    return None

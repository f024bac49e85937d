"""A real Triton Inference Server loads the repository moec wrote and serves the artifact."""

import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from moec.errors import ModelNotReadyError
from moec.pipeline import CompileOptions, compile

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    result = compile(source="moec.zoo:qwen3_moe", options=CompileOptions(
        out=str(root / "artifact"), triton_repo=str(root / "repo"), model_name="qwen3"))
    return result


def _golden(result, i):
    g = os.path.join(result.out_dir, "golden")
    return (np.load(os.path.join(g, f"probe{i}.input.input_ids.npy")),
            np.load(os.path.join(g, f"probe{i}.output.logits.npy")))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_http_and_grpc_serve_the_golden_outputs(compiled, triton):
    server = triton(os.path.dirname(compiled.triton_model_dir))
    server.wait_model_ready("qwen3")
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for i in (0, 1):  # two sequence lengths
        ids, ref = _golden(compiled, i)
        h = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
        h.set_data_from_numpy(ids)
        g = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
        g.set_data_from_numpy(ids)
        assert _rel(http.infer("qwen3", [h]).as_numpy("logits"), ref) < 1e-5
        assert _rel(grpc.infer("qwen3", [g]).as_numpy("logits"), ref) < 1e-5


def test_concurrent_requests_are_dynamically_batched(compiled, triton, tmp_path):
    # A longer queue delay makes the server batch the concurrent requests for sure.
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(os.path.dirname(compiled.triton_model_dir), repo)
    cfg = repo / "qwen3" / "config.pbtxt"
    cfg.write_text(re.sub(r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 300000",
                          cfg.read_text()))
    server = triton(str(repo))
    server.wait_model_ready("qwen3")
    ids, _ = _golden(compiled, 0)  # [2, 8]
    import onnxruntime as ort

    local = ort.InferenceSession(os.path.join(compiled.out_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 128, size=(1, 8), dtype=np.int64) for _ in range(8)]
    results = [None] * len(requests)

    def send(i):
        client = httpclient.InferenceServerClient(server.http_url)
        inp = httpclient.InferInput("input_ids", [1, 8], "INT64")
        inp.set_data_from_numpy(requests[i])
        results[i] = client.infer("qwen3", [inp]).as_numpy("logits")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for req, got in zip(requests, results):
        assert got is not None and _rel(got, local.run(None, {"input_ids": req})[0]) < 1e-5
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics("qwen3")
    s = stats["model_stats"][0]
    assert s["inference_count"] == 8 and s["execution_count"] < 8  # several requests per execution


def test_moec_verify_through_the_server(compiled, triton):
    server = triton(os.path.dirname(compiled.triton_model_dir))
    server.wait_model_ready("qwen3")
    r = subprocess.run([sys.executable, "-m", "moec.cli", "verify", "--server", server.http_url, "--model-name",
                        "qwen3", "--golden", os.path.join(compiled.out_dir, "golden")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "triton" in r.stdout and "PASS" in r.stdout


def test_model_that_fails_to_load_quotes_the_server(compiled, triton, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(os.path.dirname(compiled.triton_model_dir), repo)
    (repo / "qwen3" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    server = triton(str(repo))
    with pytest.raises(ModelNotReadyError) as err:
        server.wait_model_ready("qwen3", timeout=30)
    assert "Triton could not load model 'qwen3'" in str(err.value) and len(str(err.value)) > 40
    r = subprocess.run([sys.executable, "-m", "moec.cli", "verify", "--server", server.http_url, "--model-name",
                        "qwen3", "--golden", os.path.join(compiled.out_dir, "golden")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 15 and "not ready" in r.stderr


def test_server_is_stopped_after_use(compiled, server_install):
    """The process is gone and so is its log file; the log's text stays readable."""
    from moec.server import TritonServer

    with TritonServer(os.path.dirname(compiled.triton_model_dir), server_install) as server:
        pid, log_file = server.proc.pid, server._log.name
        assert os.path.exists(log_file)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(log_file)
    assert "Started HTTPService" in server.log()


def test_concurrent_compiles_into_one_repository_stay_loadable(triton, tmp_path):
    """4 compiles at once into one repository: two names, and two that collide (same name and version):
    one of those wins, the other exits 9; the repository holds whole models only, and the real server
    loads every one. (Four, not more: this machine has 2 cores, and each compile is CPU-bound.)"""
    repo = tmp_path / "repo"
    names = ["m0", "m1", "clash", "clash"]
    env = dict(os.environ, OMP_WAIT_POLICY="passive", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    # a two-layer zoo model, not the 4-layer demo: the race is the same, each compile half the time
    procs = [subprocess.Popen([sys.executable, "-m", "moec.cli", "compile", "moec.zoo:granitemoe",
                               "--out", str(tmp_path / f"a{i}"),
                               "--triton-repo", str(repo), "--model-name", name, "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for i, name in enumerate(names)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results[:2]), results[:2]
    assert sorted(rc for rc, _ in results[2:]) == [0, 9], results[2:]
    loser = next(err for rc, err in results[2:] if rc == 9)
    assert "already exists" in loser or "appeared while moec was writing it" in loser
    assert sorted(os.listdir(repo)) == sorted(set(names))  # no temporary or partial entries
    for name in set(names):
        assert sorted(os.listdir(repo / name)) == ["1", "config.pbtxt"]
        assert (repo / name / "1" / "model.onnx").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".moec-tmp")]
    server = triton(str(repo))
    for name in set(names):
        server.wait_model_ready(name)
    winner = tmp_path / f"a{2 + [rc for rc, _ in results[2:]].index(0)}"
    ids = np.load(winner / "golden" / "probe0.input.input_ids.npy")
    ref = np.load(winner / "golden" / "probe0.output.logits.npy")
    http = httpclient.InferenceServerClient(server.http_url)
    x = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    x.set_data_from_numpy(ids)
    assert _rel(http.infer("clash", [x]).as_numpy("logits"), ref) < 1e-5

"""Shared test settings: quiet, deterministic, bounded thread pools, hypothesis profiles."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(2)

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "artifact")


@pytest.fixture
def decoder_feeds():
    """make(session, batch, past, seq, rng): feeds for a text-generation artifact's ONNX Runtime session —
    random token ids, a full mask, the positions after `past`, and random past keys and values."""
    import numpy as np

    def make(session, batch: int, past: int, seq: int, rng) -> dict:
        sizes = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        feeds = {"input_ids": rng.integers(0, 128, (batch, seq)), "attention_mask": np.ones((batch, past + seq)),
                 "position_ids": np.tile(np.arange(past, past + seq), (batch, 1))}
        feeds = {k: v.astype(np.int64) for k, v in feeds.items()}
        for i in session.get_inputs()[3:]:
            feeds[i.name] = rng.standard_normal([sizes.get(d, d) for d in i.shape]).astype(np.float32)
        return feeds

    return make


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Callable[[str, Callable[[Path], None]], Path]:
    """shared_dir(key, make) -> the directory `make(path)` wrote, made once per test run however many tests and
    pytest-xdist workers ask for it: under a lock in the run's own temporary root, which the workers share.
    A compile is most of a test's time on CI's 2 cores; tests that need the same artifact read one copy.
    Read-only to the tests: copy it before changing anything in it. Any text is a key (made a file name here)."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "shared"
    root.mkdir(exist_ok=True)

    def get(key: str, make: Callable[[Path], None]) -> Path:
        key = re.sub(r"[^\w.=-]+", "_", key)
        path, done = root / key, root / f"{key}.done"
        with FileLock(str(root / f"{key}.lock")):
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # a failed try's leftovers: start clean
                make(path)
                done.touch()
        return path

    return get


def _result(out: Path):
    from moec.pipeline import CompileResult

    return CompileResult(str(out), json.load(open(out / "report.json")))


def _key(prefix: str, kw: dict) -> str:
    return prefix + "-" + "-".join(f"{k}={v}" for k, v in sorted(kw.items()))


@pytest.fixture(scope="session")
def demo_artifact(shared_dir) -> Path:
    """The built-in demo compiled with default options (model.onnx, report.json, golden/), once per run: the
    committed-golden and bad-input tests read it (the bad-input cases copy it). Read-only."""
    import moec

    return shared_dir("demo", lambda path: moec.compile(out=str(path)))


@pytest.fixture(scope="session")
def zoo_artifact(shared_dir):
    """zoo_artifact(family, target="onnxruntime") -> CompileResult of compiling the factory source
    `moec.zoo:FAMILY` with default options (a logits graph), once per test run: the pipeline, golden, memory
    planner and TensorRT lowering tests read the same ones. Read-only."""
    from moec.pipeline import CompileOptions, compile

    def get(family: str, target: str = "onnxruntime"):
        def make(path: Path) -> None:
            compile(source=f"moec.zoo:{family}", options=CompileOptions(out=str(path), target=target))
        return _result(shared_dir(f"zoo-{family}-{target}", make))

    return get


@pytest.fixture(scope="session")
def hf_dir(shared_dir):
    """hf_dir(family) -> the zoo's FAMILY saved as a Hugging Face directory (head size 16 so attention is
    lowered, eos 1, pad 0), once per run. Read-only."""
    from moec import zoo

    def get(family: str) -> Path:
        def make(path: Path) -> None:
            zoo.build_hf_model(family, head_dim=16, eos_token_id=1, pad_token_id=0).save_pretrained(path)
        return shared_dir(f"hf-{family}", make)

    return get


@pytest.fixture(scope="session")
def hf_decoder(shared_dir, hf_dir):
    """hf_decoder(family, **compile_kwargs) -> CompileResult of the KV-cache decoder compiled from hf_dir(family),
    once per run for each distinct set of compile arguments. Read-only."""
    import moec

    def get(family: str, **kw):
        def make(path: Path) -> None:
            moec.compile(source=str(hf_dir(family)), out=str(path), **kw)
        return _result(shared_dir(_key(f"decoder-{family}", kw), make))

    return get


def generation_model(family: str, **overrides):
    """The zoo's FAMILY (config overrides applied) with no end-of-sequence token (random weights: every step
    runs, as the golden does) and pad 0."""
    from moec import zoo

    model = zoo.build_hf_model(family, **overrides)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


@pytest.fixture(scope="session")
def generation_artifact(shared_dir):
    """generation_artifact(family, **overrides) -> (CompileResult, model repository, model):
    generation_model(family, **overrides) saved and compiled as a KV-cache decoder with a Triton model named
    FAMILY, once per run (the model is built afresh for each caller: the same seeded weights):
    test_generation checks it against transformers, the generate endpoint's tests serve it. Read-only."""
    import moec

    def get(family: str, **overrides):
        def make(path: Path) -> None:
            generation_model(family, **overrides).save_pretrained(path / "hf")
            moec.compile(source=str(path / "hf"), out=str(path / "out"), triton_repo=str(path / "repo"),
                         model_name=family)
        path = shared_dir(_key(f"generation-{family}", overrides), make)
        return _result(path / "out"), path / "repo", generation_model(family, **overrides)

    return get

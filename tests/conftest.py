"""Shared test settings: quiet, deterministic, bounded thread pools, hypothesis profiles."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
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

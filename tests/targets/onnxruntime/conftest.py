"""Decoders compiled with and without the onnxruntime target's graph passes, shared by their tests."""

import pytest

GRAPH_PASSES = ["fuse_rotary", "fuse_skip_norm"]
FAMILIES = ("qwen3_moe", "gpt_oss")


@pytest.fixture(scope="session")
def graph_pass_pairs(hf_decoder):
    """{family: (with the graph passes, without them)} for Qwen3-MoE (rotate_half rotary after q/k norms)
    and GPT-OSS (rotary on split halves, sinks, sliding windows), head size 16 so attention is lowered too.
    Shared by the run's test files (tests/conftest.py's hf_decoder)."""
    return {family: (hf_decoder(family), hf_decoder(family, disabled_passes=GRAPH_PASSES)) for family in FAMILIES}

"""Decoders compiled with and without the onnxruntime target's graph passes, shared by their tests."""

import pytest

import moec
from moec import zoo

GRAPH_PASSES = ["fuse_rotary", "fuse_skip_norm"]


@pytest.fixture(scope="session")
def graph_pass_pairs(tmp_path_factory):
    """{family: (with the graph passes, without them)} for Qwen3-MoE (rotate_half rotary after q/k norms)
    and GPT-OSS (rotary on split halves, sinks, sliding windows), head size 16 so attention is lowered too."""
    root = tmp_path_factory.mktemp("graph_passes")
    pairs = {}
    for family in ("qwen3_moe", "gpt_oss"):
        zoo.build_hf_model(family, head_dim=16, eos_token_id=1, pad_token_id=0).save_pretrained(root / family)
        on = moec.compile(source=str(root / family), out=str(root / f"{family}-on"))
        off = moec.compile(source=str(root / family), out=str(root / f"{family}-off"), disabled_passes=GRAPH_PASSES)
        pairs[family] = (on, off)
    return pairs

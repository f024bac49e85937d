"""Decoders compiled with and without the onnxruntime target's graph passes, shared by their tests."""

import json
import os
import shutil

import pytest
from filelock import FileLock

import moec
from moec import zoo
from moec.pipeline import CompileResult

GRAPH_PASSES = ["fuse_rotary", "fuse_skip_norm"]
FAMILIES = ("qwen3_moe", "gpt_oss")


@pytest.fixture(scope="session")
def graph_pass_pairs(tmp_path_factory, worker_id):
    """{family: (with the graph passes, without them)} for Qwen3-MoE (rotate_half rotary after q/k norms)
    and GPT-OSS (rotary on split halves, sinks, sliding windows), head size 16 so attention is lowered too.
    Four decoder compiles (about a minute): under pytest-xdist the workers share one set (the run's own
    temporary root, under a lock) instead of each compiling it (test_fuse_rotary and test_fuse_skip_norm may
    run on different workers)."""
    if worker_id == "master":
        return _compile_pairs(tmp_path_factory.mktemp("graph_passes"))
    root = tmp_path_factory.getbasetemp().parent / "graph_passes"  # this run's, shared by its workers
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker's failed try: the next one starts clean
            root.mkdir()
            _compile_pairs(root)
            (root / "done").touch()
    return {family: tuple(CompileResult(str(root / f"{family}-{k}"),
                                        json.load(open(os.path.join(root, f"{family}-{k}", "report.json"))))
                          for k in ("on", "off")) for family in FAMILIES}


def _compile_pairs(root) -> dict:
    pairs = {}
    for family in FAMILIES:
        zoo.build_hf_model(family, head_dim=16, eos_token_id=1, pad_token_id=0).save_pretrained(root / family)
        on = moec.compile(source=str(root / family), out=str(root / f"{family}-on"))
        off = moec.compile(source=str(root / family), out=str(root / f"{family}-off"), disabled_passes=GRAPH_PASSES)
        pairs[family] = (on, off)
    return pairs

"""rewrite_strided_views: a reshape of transposed attention output that torch.onnx's decomposition re-traces as
a view (transformers' Doge and Inkling) converts once the view reads a contiguous copy; the artifact matches
eager, and programs that convert as they are are left alone."""

import os
import sys

import torch

from moec.pipeline import CompileOptions, compile
from moec.sources import causal_lm_source

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import survey_families  # noqa: E402


def test_doge_attention_converts_after_the_rewrite(tmp_path):
    threads = torch.get_num_threads()
    try:
        src = causal_lm_source(survey_families.build("doge"), "test:doge")
        report = compile(src.module, src.example_args, src.dynamic_shapes,
                         options=CompileOptions(out=str(tmp_path / "a"))).report
    finally:
        torch.set_num_threads(threads)
    rows = report["numerics"]["inputs"]
    assert len(rows) >= 2 and max(float(r["rel_l2"]) for r in rows) <= 1e-4
    assert any(n.startswith("rewrite_strided_views:") for n in report["capture"]["notes"])


def test_a_program_that_converts_is_left_alone(tmp_path):
    from moec import zoo

    src = zoo.handwritten("loop")
    report = compile(src.module, src.example_args, src.dynamic_shapes,
                     options=CompileOptions(out=str(tmp_path / "a"))).report
    assert not any(n.startswith("rewrite_strided_views:") for n in report["capture"]["notes"])

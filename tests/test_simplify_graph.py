"""simplify_graph: fewer nodes, the same numbers bit for bit, no weight copied, custom ops untouched."""

import os
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import moec



@pytest.fixture(scope="module")
def pair(hf_decoder):
    """GPT-OSS's decoder with and without simplify_graph (the first shared with the graph passes' tests).
    The target's graph passes are off in both: they fuse what simplify_graph made matchable, which is not
    simplify_graph's own (bit-identical) effect."""
    fusions = ["fuse_rotary", "fuse_skip_norm"]
    return (hf_decoder("gpt_oss", disabled_passes=fusions),
            hf_decoder("gpt_oss", disabled_passes=["simplify_graph", *fusions]))


def _graph(result):
    return onnx.load(os.path.join(result.out_dir, "model.onnx"))


def test_the_decoder_graph_loses_its_shape_arithmetic(pair):
    on, off = pair
    graph = on.report["graph"]
    assert "nodes_after" not in off.report["graph"]  # rewrite_rsqrt alone ran
    kept, plain = (Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(ir.from_proto(_graph(r)).graph))
                   for r in (on, off))  # If branches (lowered attention) included
    run_kept, run_plain = (sum(c.values()) - c["Constant"] for c in (kept, plain))  # Constants never run
    assert graph["nodes_after"] == run_kept and graph["nodes_before"] >= run_plain
    assert run_kept < 0.6 * run_plain, (kept, plain)
    assert kept["Reshape"] < plain["Reshape"] and kept["Concat"] < plain["Concat"]
    # the fused experts are moec's, not the optimizer's: the same ONNX Runtime MoE nodes either way
    moe = lambda g: sorted(n.name for n in g.graph.node if n.op_type in ("MoE", "QMoE"))  # noqa: E731
    assert moe(_graph(on)) == moe(_graph(off)) and moe(_graph(on))


def test_no_weight_is_copied(pair):
    on, off = pair

    def weights(g):
        return sorted((i.name, onnx.numpy_helper.to_array(i).tobytes()) for i in g.graph.initializer
                      if np.prod(i.dims) > 8192)

    assert weights(_graph(on)) == weights(_graph(off))


def test_outputs_are_bit_identical(pair, decoder_feeds):
    on, off = pair
    a = ort.InferenceSession(os.path.join(on.out_dir, "model.onnx"))
    b = ort.InferenceSession(os.path.join(off.out_dir, "model.onnx"))
    rng = np.random.default_rng(0)
    for batch, past, seq in [(1, 0, 5), (2, 7, 1), (3, 300, 2)]:  # prefill, decode, past the sliding window
        feeds = decoder_feeds(a, batch, past, seq, rng)
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            np.testing.assert_array_equal(x, y)


def test_unknown_pass_names_list_it(tmp_path):
    with pytest.raises(moec.MoecError, match="passes are .*simplify_graph"):
        moec.compile(out=str(tmp_path / "o"), disabled_passes=["simplify_graphs"])

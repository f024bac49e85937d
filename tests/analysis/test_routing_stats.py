"""Routing statistics: equal to a dense recomputation with an independently written MoE; shown as a table,
JSON and a heat map."""

import json
import os
import sys

import numpy as np
import torch

from moec.analysis.routing_stats import LayerRouting, format_table, measure_routing, render_heatmap
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import FuseMoE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "property"))
from reference_moe import MoEConfig, ReferenceMoE, Residual as Model  # noqa: E402

CFG = MoEConfig(experts=8, top_k=3, hidden=32, inter=24, scoring="sigmoid", selection_bias=True, scale=2.5,
                shared=True, shared_gate=True)


def calibration(n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 16, CFG.hidden, generator=g),) for _ in range(n)]


def measured(seed=2):
    calib = calibration()
    module, _ = PassManager([FuseMoE()], validate=False).run(Model(ReferenceMoE(CFG, seed).eval()),
                                                             PassContext(probes=[(torch.randn(2, 5, CFG.hidden),)]))
    return measure_routing(module, calib), calib


def test_contribution_is_weight_times_output_norm_per_token():
    """The statistics against a dense recomputation with the oracle's own routing (no moec code)."""
    cfg = CFG
    ref = ReferenceMoE(cfg, 2).eval()
    (stats,), calib = measured()
    flat = torch.cat([c[0].reshape(-1, cfg.hidden) for c in calib])
    with torch.no_grad():
        combine = ref.routing(flat)  # [T, E]
        u = torch.einsum("th,ehx->etx", flat, ref.w_in)
        gate, up = u.chunk(2, dim=-1)
        y = torch.einsum("eti,eih->eth", torch.nn.functional.silu(gate) * up, ref.w_out)  # [E, T, H]
        contribution = (combine.T.unsqueeze(-1) * y).norm(dim=-1).sum(-1) / flat.shape[0]
    assert stats.tokens == flat.shape[0]
    assert stats.counts == (combine != 0).sum(0).tolist() and sum(stats.counts) == flat.shape[0] * cfg.top_k
    np.testing.assert_allclose(stats.contribution, contribution.numpy(), rtol=1e-4)
    mean_w = combine.sum(0) / (combine != 0).sum(0).clamp(min=1)
    np.testing.assert_allclose(stats.mean_weight, mean_w.numpy(), rtol=1e-4)




def test_round_trip_table_and_heat_map(tmp_path):
    layers, _ = measured()
    back = [LayerRouting.from_dict(json.loads(json.dumps(l.to_dict()))) for l in layers]
    assert back[0].counts == layers[0].counts
    np.testing.assert_allclose(back[0].contribution, layers[0].contribution, rtol=1e-5)
    np.testing.assert_allclose(back[0].mean_weight, layers[0].mean_weight, rtol=1e-5)
    table = format_table(layers)
    lowest = min(range(8), key=lambda e: layers[0].contribution[e])
    assert "moe" in table and f"lowest contribution: e{lowest} " in table
    render_heatmap(layers, str(tmp_path / "h.png"), pruned={"moe": [lowest]})
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_a_layer_never_called_has_no_tokens():
    layers, _ = measured()
    silent = LayerRouting("x", 4, 2)
    assert silent.tokens == 0 and silent.contribution == [0.0] * 4 and silent.unused == [0, 1, 2, 3]
    assert layers[0].tokens == 2 * 4 * 16 and not layers[0].unused

"""prune_experts: a pruned layer is exactly the MoE built from the experts kept (an independent oracle),
the ranking removes what it says, auto meets its budget, and the artifact is verified against the pruned
model on every target."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moec.errors import AccuracyBudgetError
from moec.moe_layer import FusedMoE
from moec.numerics import compare_tensors
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import FuseMoE
from moec.passes.measure_routing import MeasureRouting
from moec.passes.prune_experts import PruneError, PruneExperts, _sliced, layer_plan
from moec.pipeline import CompileOptions, compile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "property"))
from reference_moe import MoEConfig, ReferenceMoE, Residual as Model  # noqa: E402

DYN = ({0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=64)},)


def kept_reference(ref: ReferenceMoE, keep: list[int]) -> ReferenceMoE:
    """The oracle: the same ReferenceMoE with only the experts `keep` (router rows and weights)."""
    cfg = dataclasses.replace(ref.cfg, experts=len(keep))
    out = ReferenceMoE(cfg, 0)
    idx = torch.tensor(keep)
    with torch.no_grad():
        out.router.weight.copy_(ref.router.weight[idx])
        if cfg.router_bias:
            out.router.bias.copy_(ref.router.bias[idx])
        if cfg.selection_bias:
            out.correction.copy_(ref.correction[idx])
        for name in ("w_in", "w_out", "b_in", "b_out"):
            if hasattr(ref, name):
                getattr(out, name).copy_(getattr(ref, name)[idx])
        if cfg.shared:
            out.shared.load_state_dict(ref.shared.state_dict())
            if cfg.shared_gate:
                out.shared_gate.load_state_dict(ref.shared_gate.state_dict())
    return out.eval()


def calibration(hidden, n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 16, hidden, generator=g),) for _ in range(n)]


def prune(model, options, calib, hidden):
    ctx = PassContext(probes=[(torch.randn(2, 5, hidden),)], options=options, calibration=calib)
    module, records = PassManager([FuseMoE(), MeasureRouting(), PruneExperts()], validate=False).run(model, ctx)
    return module, records[-1], ctx


CONFIGS = {
    "softmax-renorm": MoEConfig(experts=8, top_k=2, hidden=32, inter=24),
    "softmax-no-renorm-biases": MoEConfig(experts=8, top_k=2, hidden=32, inter=24, renormalize=False,
                                          router_bias=True, expert_bias=True),
    "sigmoid-selection-bias-scaled": MoEConfig(experts=8, top_k=3, hidden=32, inter=24, scoring="sigmoid",
                                               selection_bias=True, scale=2.5, shared=True, shared_gate=True),
    "grouped": MoEConfig(experts=16, top_k=2, hidden=32, inter=24, scoring="sigmoid", selection_bias=True,
                         n_group=4, topk_group=2),
    "plain-ffn-relu": MoEConfig(experts=8, top_k=2, hidden=32, inter=24, activation="relu", gated=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pruned_layer_is_the_moe_of_the_kept_experts(name):
    cfg = CONFIGS[name]
    ref = ReferenceMoE(cfg, 3).eval()
    calib = calibration(cfg.hidden)
    module, record, _ = prune(Model(ReferenceMoE(cfg, 3).eval()), {"prune_experts": 0.5}, calib, cfg.hidden)
    (outcome,) = record.layers
    removed = set(outcome.removed)
    assert len(removed) == cfg.experts // 2
    if cfg.n_group > 1:  # the same number from every group: the groups stay equal
        per = cfg.experts // cfg.n_group
        assert [sum(1 for e in removed if e // per == g) for g in range(cfg.n_group)] == [per // 2] * cfg.n_group
    fused = next(m for m in module.modules() if isinstance(m, FusedMoE))
    assert fused.spec.experts.num_experts == cfg.experts // 2 and fused.w_gate_up.shape[0] == cfg.experts // 2
    assert fused.router_weight.shape[0] == cfg.experts // 2
    oracle = Model(kept_reference(ref, [e for e in range(cfg.experts) if e not in removed]))
    x = torch.randn(3, 11, cfg.hidden, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert compare_tensors(oracle(x), module(x)).rel_l2 < 1e-5
        assert compare_tensors(Model(ref)(x), module(x)).rel_l2 > 1e-3  # it is another model
    assert outcome.weight_bytes_after * 2 == outcome.weight_bytes_before
    d = record.details["vs_unpruned"]
    assert 0 < d["rel_l2"] and 0 <= d["top1_agreement"] <= 1


def test_ranking_removes_the_lowest_by_each_measure():
    cfg = CONFIGS["softmax-renorm"]
    calib = calibration(cfg.hidden)
    removed = {}
    for by in ("contribution", "count", "random"):
        _, record, ctx = prune(Model(ReferenceMoE(cfg, 1).eval()), {"prune_experts": 0.25, "prune_by": by}, calib,
                               cfg.hidden)
        stats = ctx.routing[0]
        removed[by] = set(record.layers[0].removed)
        if by != "random":
            score = stats.contribution if by == "contribution" else stats.counts
            assert removed[by] == set(sorted(range(cfg.experts), key=lambda e: (score[e], e))[:2])
        assert record.details["by"] == by
    _, again, _ = prune(Model(ReferenceMoE(cfg, 1).eval()), {"prune_experts": 0.25, "prune_by": "random"}, calib,
                        cfg.hidden)
    assert set(again.layers[0].removed) == removed["random"]  # fixed seed


def test_fraction_that_leaves_fewer_experts_than_top_k_names_the_layer():
    cfg = CONFIGS["sigmoid-selection-bias-scaled"]  # 8 experts, top-3: at most 5 may go
    with pytest.raises(PruneError, match=r"moe would keep 2 of its 8 experts.*top-3.*largest fraction this layer "
                                         r"allows is 0\.625") as e:
        prune(Model(ReferenceMoE(cfg, 0).eval()), {"prune_experts": 0.75}, calibration(cfg.hidden), cfg.hidden)
    assert e.value.exit_code == 23


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.25, "most"])
def test_fraction_outside_the_open_interval_is_refused(value):
    cfg = CONFIGS["softmax-renorm"]
    with pytest.raises(PruneError, match="strictly between 0 and 1"):
        prune(Model(ReferenceMoE(cfg, 0).eval()), {"prune_experts": value}, calibration(cfg.hidden), cfg.hidden)


def test_budget_gates_a_fraction():
    cfg = CONFIGS["softmax-renorm"]
    with pytest.raises(AccuracyBudgetError, match=r"pruning 0\.5 of the experts \(by contribution\) moves the "
                                                  r"logits by relative L2"):
        prune(Model(ReferenceMoE(cfg, 0).eval()), {"prune_experts": 0.5, "accuracy_budget": 1e-3},
              calibration(cfg.hidden), cfg.hidden)


class TwoLayers(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.a = ReferenceMoE(cfg, 0)
        self.b = ReferenceMoE(cfg, 1)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_auto_meets_its_budget_and_prunes_at_least_the_uniform_fraction(budget):
    cfg = MoEConfig(experts=16, top_k=2, hidden=32, inter=24)
    calib = calibration(cfg.hidden, n=6)
    module, record, _ = prune(TwoLayers(cfg).eval(), {"prune_experts": "auto", "accuracy_budget": budget}, calib,
                              cfg.hidden)
    auto = record.details["auto"]
    assert record.details["vs_unpruned"]["rel_l2"] <= budget
    assert auto["removed"] == sum(len(o.removed) for o in record.layers) >= auto["uniform_removed"]
    assert auto["uniform_vs_unpruned"]["rel_l2"] <= budget and auto["evaluations"] > 0


def test_auto_without_a_prunable_layer_reports_no_uniform_fraction():
    cfg = MoEConfig(experts=4, top_k=4, hidden=32, inter=24)  # top-4 of 4: nothing may go
    _, record, _ = prune(Model(ReferenceMoE(cfg, 0).eval()), {"prune_experts": "auto", "accuracy_budget": 1.0},
                         calibration(cfg.hidden), cfg.hidden)
    auto = record.details["auto"]
    assert auto["removed"] == auto["uniform_removed"] == 0 and auto["uniform_fraction"] == 0.0


class ReturnsLogits(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        out = self.moe(x)
        return (out[0] if isinstance(out, tuple) else out) + x


def test_a_layer_that_returns_its_router_logits_is_left_whole():
    cfg = CONFIGS["softmax-renorm"]
    calib = calibration(cfg.hidden)
    ctx = PassContext(probes=[(torch.randn(2, 5, cfg.hidden),)], options={"prune_experts": 0.25}, calibration=calib)
    module, _ = PassManager([FuseMoE()], validate=False).run(ReturnsLogits(ReferenceMoE(cfg, 0).eval()), ctx)
    spec = module.moe.spec
    module.moe.spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, aux=("logits",)))
    _, records = PassManager([MeasureRouting(), PruneExperts()], validate=False).run(module, ctx)
    (outcome,) = records[1].layers
    assert outcome.removed == () and "returns its router's logits" in outcome.reason


def test_auto_with_a_zero_budget_removes_nothing():
    cfg = CONFIGS["softmax-renorm"]
    module, record, _ = prune(Model(ReferenceMoE(cfg, 0).eval()), {"prune_experts": "auto", "accuracy_budget": 0.0},
                              calibration(cfg.hidden), cfg.hidden)
    assert not record.modified and record.details["auto"]["removed"] == 0
    assert record.layers[0].reason == "no expert removed at this fraction/budget"


def test_a_layer_the_calibration_never_reaches_is_left_whole_with_a_warning():
    cfg = CONFIGS["softmax-renorm"]
    model = Model(ReferenceMoE(cfg, 0).eval())
    ctx = PassContext(probes=[(torch.randn(2, 5, cfg.hidden),)], options={"prune_experts": 0.25},
                      calibration=calibration(cfg.hidden))
    module, _ = PassManager([FuseMoE()], validate=False).run(model, ctx)
    fused = module.moe
    module.unused = FusedMoE(fused.spec, fused.router_weight, fused.router_bias, fused.selection_bias,
                             fused.w_gate_up, fused.w_down, fused.b_gate_up, fused.b_down)  # never called
    logs = []
    ctx.log = logs.append
    module, records = PassManager([MeasureRouting(), PruneExperts()], validate=False).run(module, ctx)
    assert records[0].details["never_reached"] == ["unused"]
    outcome = {o.path: o for o in records[1].layers}
    assert outcome["unused"].removed == () and "never reached" in outcome["unused"].reason
    assert len(outcome["moe"].removed) == 2
    assert any("warning: unused: the calibration data never reached this layer" in m for m in logs)


def test_slicing_carries_a_checkpoints_codes():
    from moec.passes.quantize_experts import QuantizeExperts

    cfg = MoEConfig(experts=8, top_k=2, hidden=32, inter=32)
    ctx = PassContext(probes=[(torch.randn(2, 5, cfg.hidden),)], options={"quant": "int4", "block_size": 16})
    module, _ = PassManager([FuseMoE(), QuantizeExperts()], validate=False).run(Model(ReferenceMoE(cfg, 0)), ctx)
    fused = module.moe
    keep = [0, 3, 5, 6]
    attrs = _sliced(fused, keep)
    for name in ("gate_up", "down"):
        before, after = getattr(fused.quantized, name), getattr(attrs["quantized"], name)
        assert torch.equal(after.codes, before.codes[keep]) and torch.equal(after.scales, before.scales[keep])
    assert torch.equal(attrs["w_down"], fused.w_down[keep])


def test_layer_plan_units_for_grouped_routing():
    cfg = CONFIGS["grouped"]
    ctx = PassContext(probes=[(torch.randn(2, 5, cfg.hidden),)], calibration=calibration(cfg.hidden))
    module, _ = PassManager([FuseMoE(), MeasureRouting()], validate=False).run(Model(ReferenceMoE(cfg, 0)), ctx)
    plan = layer_plan(module.moe, ctx.routing[0], "contribution", 0)
    # 4 groups of 4: a unit is one expert from every group, lowest contribution first
    assert len(plan.units) == 4 and all(sorted(e // 4 for e in u) == [0, 1, 2, 3] for u in plan.units)
    assert plan.max_units == 2  # groups are ranked by their two best experts: two stay in every group
    c = ctx.routing[0].contribution
    for g in range(4):
        in_group = [u[[e // 4 for e in u].index(g)] for u in plan.units]
        assert [c[e] for e in in_group] == sorted(c[e] for e in in_group)


# ----------------------------------------------------------------------------- whole compiles


@pytest.mark.slow
@pytest.mark.parametrize("target,quant", [("onnxruntime", None), ("onnxruntime", "int4"), ("tensorrt", None)])
def test_compiled_pruned_artifact_is_verified_against_the_pruned_model(target, quant, tmp_path):
    cfg = CONFIGS["sigmoid-selection-bias-scaled"]
    ref = ReferenceMoE(cfg, 4).eval()
    calib = tmp_path / "calib.npy"
    np.save(calib, torch.randn(8, 12, cfg.hidden, generator=torch.Generator().manual_seed(1)).numpy())
    extra = {"calibration": str(calib), "prune_experts": 0.25}
    if quant:
        extra["quant"] = quant
    out = str(tmp_path / "a")
    res = compile(Model(ReferenceMoE(cfg, 4).eval()), (torch.randn(2, 5, cfg.hidden),), DYN,
                  options=CompileOptions(out=out, target=target, extra=extra))
    r = res.report
    key = "vs_pruned_dequantized_reference" if quant else "vs_pruned_reference"
    assert r["numerics"]["passed"] and r["numerics"][key]["passed"]
    assert max(i["rel_l2"] for i in r["numerics"][key]["inputs"]) < 1e-5
    assert r["pruning"]["experts_before"] == 8 and r["pruning"]["experts_after"] == 6
    assert r["routing"][0]["tokens"] == 8 * 12 and len(r["routing"][0]["counts"]) == 8
    assert r["calibration"] == {"data": "calib.npy (8 sequences)", "tokens": 8 * 12}
    model = onnx.load(os.path.join(out, "model.onnx"))
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    expert_dims = [d[0] for d in shapes.values() if len(d) == 3 and d[0] in (6, 8)]
    assert expert_dims and set(expert_dims) == {6}  # every stacked expert tensor has the 6 kept experts
    if target == "onnxruntime" and not quant:  # the artifact against the independent oracle
        removed = r["pruning"]["layers"][0]["removed"]
        oracle = Model(kept_reference(ref, [e for e in range(8) if e not in removed]))
        x = torch.randn(3, 7, cfg.hidden, generator=torch.Generator().manual_seed(2))
        sess = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert compare_tensors(oracle(x), got).rel_l2 < 1e-5


@pytest.mark.slow
def test_deepseek_v3_prunes_evenly_across_groups(tmp_path):
    from moec import zoo
    from moec.sources import causal_lm_source

    src = causal_lm_source(zoo.build_hf_model("deepseek_v3", n_routed_experts=16), "deepseek_v3")
    res = compile(src.module, src.example_args, src.dynamic_shapes,
                  options=CompileOptions(out=str(tmp_path / "a"), extra={"calibration": "random:16",
                                                                          "prune_experts": 0.25}))
    p = res.report["pruning"]
    assert res.report["numerics"]["passed"] and p["experts_after"] == p["experts_before"] * 3 // 4
    for layer in p["layers"]:  # 16 experts in 4 groups of 4: one from each group
        assert sorted(e // 4 for e in layer["removed"]) == [0, 1, 2, 3]


def test_grouped_routing_keeps_two_experts_in_every_group():
    cfg = CONFIGS["grouped"]  # 4 groups of 4: at most 2 per group may go
    with pytest.raises(PruneError, match=r"would keep 4 of its 16 experts.*from 2 groups.*largest fraction this "
                                         r"layer allows is 0\.5"):
        prune(Model(ReferenceMoE(cfg, 0).eval()), {"prune_experts": 0.75}, calibration(cfg.hidden), cfg.hidden)


@pytest.mark.slow
def test_cli_prune_verify_and_inspect_routing(tmp_path):
    env = dict(os.environ)
    run = lambda *a: subprocess.run([sys.executable, "-m", "moec.cli", *a], capture_output=True, text=True,  # noqa
                                    env=env, timeout=600)
    out = str(tmp_path / "demo")
    r = run("compile", "--out", out, "--calibration", "random:16", "--prune-experts", "auto", "--accuracy-budget",
            "0.5")
    assert r.returncode == 0, r.stderr
    assert "numerics vs the pruned reference" in r.stdout and "pruned experts: 32 ->" in r.stdout
    assert run("verify", out).returncode == 0
    j = run("inspect", out, "--routing", "--json")
    assert j.returncode == 0, j.stderr
    import json

    data = json.loads(j.stdout)
    assert len(data["routing"]) == 4 and data["pruning"]["mode"] == "auto"
    assert data["pruning"]["vs_unpruned"]["rel_l2"] <= 0.5
    t = run("inspect", out, "--routing", "--plot", str(tmp_path / "heat.png"))
    assert t.returncode == 0 and "lowest contribution" in t.stdout and "pruned" in t.stdout
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    # an artifact compiled without --calibration: its report's routing is null (its report alone is read)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "report.json").write_text(json.dumps({**json.loads((tmp_path / "demo" / "report.json").read_text()),
                                                   "routing": None}))
    e = run("inspect", str(plain), "--routing")
    assert e.returncode == 2 and "compile with --calibration" in e.stderr

"""fusion_rules + mixture: readings are declared rules, tried one after the other, and every layer's report says
which rules were tried and why each failed."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from moec import zoo
from moec.passes import fusion_rules, mixture
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import JOINT_LIMIT, FuseMoE
from moec.passes.fusion_rules import EXPERT_RULES, ROUTER_RULES, ROUTING_RULES, ExpertSource


def _fuse(model, x):
    _, records = PassManager([FuseMoE()]).run(model, PassContext(probes=[(x,)]))
    return records[0]


def _rules(outcome):
    return [(t.stage, t.rule, t.result) for t in outcome.rules]


def test_every_rule_is_named_once_and_says_what_it_matches():
    for table in (ROUTER_RULES, EXPERT_RULES, ROUTING_RULES):
        names = [r.name for r in table]
        assert len(set(names)) == len(names)
        assert all(len(r.matches) > 20 for r in table)


def test_the_readme_lists_every_rule():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for table in (ROUTER_RULES, EXPERT_RULES, ROUTING_RULES):
        for r in table:
            assert f"`{r.name.replace('|', chr(92) + '|')}`" in readme, r.name


def test_mixture_tells_readings_and_routings_apart_without_running_the_layer():
    """y = sum_e s_e E_e(x): the right reading leaves no residual whatever the routing, a wrong activation does;
    the right routing reproduces y from the experts' outputs, another does not. A ReLU expert whose output is
    zero on a token leaves its weight there unknown, which must not count against the right routing."""
    torch.manual_seed(0)
    e, h, i, t = 6, 32, 12, 20
    w_gu, w_d = torch.randn(e, i, h) / 6, torch.randn(e, h, i) / 4
    w_gu[1, :, :] = 0  # expert 1 is zero everywhere: its weight is never identifiable
    x = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(t)])
    w = torch.rand(t, 2) + 0.1
    basis = mixture.expert_outputs(x, w_gu, w_d, None, None, "relu", False, 1.0, 0.0, math.inf)
    y = torch.einsum("te,teh->th", mixture.dense(ids, w, e).float(), basis)
    mix = mixture.solve([basis], [None], [y])
    assert mix.residual < 1e-6
    assert mixture.routing_error(mix, [(ids, w)], e) < 1e-6
    assert mixture.routing_error(mix, [(ids, w.flip(-1))], e) > 1e-2
    wrong = mixture.expert_outputs(x, w_gu, w_d, None, None, "gelu", False, 1.0, 0.0, math.inf)
    assert mixture.solve([wrong], [None], [y]).residual > 1e-3
    # a shared expert with a per-token gate is solved for alongside
    s = torch.randn(t, h)
    gated = y + torch.sigmoid(torch.randn(t, 1)) * s
    mix = mixture.solve([basis], [s], [gated])
    assert mix.residual < 1e-6 and mixture.routing_error(mix, [(ids, w)], e) < 1e-6
    # too few equations per token: any reading would fit, so the mixture isn't used
    assert mixture.solvable(32, 6, shared=True) and not mixture.solvable(8, 8, shared=False)


def test_a_fused_layer_reports_the_rules_that_read_it():
    src = zoo.hf_family("mixtral")
    record = _fuse(src.module, *src.example_args)
    outcome = record.layers[0]
    assert outcome.fused
    rules = _rules(outcome)
    assert rules[0] == ("router", "child [E, H]", "matched")
    assert ("experts", "stacked gate|up", "matched") in rules
    assert rules[-1] == ("routing", "softmax top-k", "matched")
    assert not any(stage == "joint" for stage, _, _ in rules)
    # readings and routing tried one after the other: a handful of checks, far from the joint bound
    assert outcome.candidates_tried < 50
    assert outcome.to_dict()["rules"][-1]["detail"].startswith("top-2, renormalized")


def test_experts_that_scale_their_input_are_checked_with_the_routing():
    """Llama 4's experts see w * x: the output is not linear in the routing weights, so no reading explains it
    as a mixture and the remaining readings are checked jointly with the routing."""
    src = zoo.hf_family("llama4")
    record = _fuse(src.module, *src.example_args)
    outcome = record.layers[0]
    assert outcome.fused and outcome.spec.experts.weight_on_input
    joint = [t for t in outcome.rules if t.stage == "joint"]
    assert [t.result for t in joint] == ["matched"] and "weights on the input" in joint[0].detail
    assert outcome.candidates_tried < JOINT_LIMIT


class UpGateMoE(nn.Module):
    """Stacked experts whose in-projection holds the up rows first, then the gate rows."""

    def __init__(self, hidden=32, inter=16, num_experts=4):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / 6)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, inter) / 4)

    def forward(self, x):
        w, ids = torch.softmax(self.router(x), -1).topk(2, -1)
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            up, gate = torch.nn.functional.linear(x, self.w13[e]).chunk(2, -1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.w2[e])
            out = out + (w * (ids == e)).sum(-1, keepdim=True) * y
        return out


def test_adding_a_reading_is_one_entry(monkeypatch):
    """Without the up|gate rule the layer's experts read as nothing; the report names each expert rule and
    why it failed. The rule table with that one entry back fuses it."""
    torch.manual_seed(0)
    x = torch.randn(12, 32)
    without = tuple(r for r in EXPERT_RULES if r.name != "stacked up|gate")
    assert len(without) == len(EXPERT_RULES) - 1
    monkeypatch.setattr(fusion_rules, "EXPERT_RULES", without)
    outcome = _fuse(nn.Sequential(UpGateMoE()), x).layers[0]
    assert not outcome.fused
    experts = {t.rule: t for t in outcome.rules if t.stage == "experts"}
    assert set(experts) == {r.name for r in without}
    assert experts["stacked gate|up"].result == "failed" and "residual" in experts["stacked gate|up"].detail
    assert experts["module list"].result == "not applicable"
    monkeypatch.undo()
    outcome = _fuse(nn.Sequential(UpGateMoE()), x).layers[0]
    assert outcome.fused and ("experts", "stacked up|gate", "matched") in _rules(outcome)


@pytest.mark.parametrize("rule", [r for r in EXPERT_RULES if r.name.startswith("stacked")], ids=lambda r: r.name)
def test_stacked_rules_say_why_a_module_list_is_not_theirs(rule):
    experts = nn.ModuleList([nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8)) for _ in range(3)])
    why = rule.applies(ExpertSource(3, expert_list=experts))
    assert why and "ModuleList" in why


class WeightedInputMoE(nn.Module):
    """Softmax top-2 whose weight scales each expert's *input*, experts relu(gate) * up: E(w x) = w^2 E(x), so
    the output still reads as a mixture of the experts, with weights no routing rule gives."""

    def __init__(self, hidden=32, inter=16, num_experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / 6)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, inter) / 4)

    def forward(self, x):
        w, ids = torch.softmax(self.gate(x), -1).topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            scale = (w * (ids == e)).sum(-1, keepdim=True)
            g, u = torch.nn.functional.linear(x * scale, self.w13[e]).chunk(2, -1)
            out = out + torch.nn.functional.linear(torch.relu(g) * u, self.w2[e])
        return out


def test_weights_on_the_input_with_a_homogeneous_activation_fuse():
    torch.manual_seed(0)
    outcome = _fuse(nn.Sequential(WeightedInputMoE()), torch.randn(12, 32)).layers[0]
    assert outcome.fused and outcome.spec.experts.weight_on_input and outcome.spec.experts.activation == "relu"
    # the reading that explained the output is the only one checked with the weight on the input
    assert [t.rule for t in outcome.rules if t.stage == "joint"] == ["stacked gate|up x softmax top-k"]
    assert outcome.candidates_tried < 200


class NarrowMoE(nn.Module):
    """Hidden 8 and 8 experts: too few equations per token to solve for the experts' weights. Interleaved
    gate/up, a router bias, sigmoid top-3 renormalized, and no attribute naming any of it."""

    def __init__(self, hidden=8, inter=6, num_experts=8):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts)
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / 3)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, inter) / 3)

    def forward(self, x):
        s = torch.sigmoid(self.router(x))
        w, ids = s.topk(3, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            h = torch.nn.functional.linear(x, self.w_in[e])
            g, u = h[:, 0::2], h[:, 1::2]
            out = out + (w * (ids == e)).sum(-1, keepdim=True) * torch.nn.functional.linear(
                torch.nn.functional.silu(g) * u, self.w_out[e])
        return out


def test_a_layer_too_narrow_to_solve_is_read_with_routes_screened_from_the_experts_outputs():
    torch.manual_seed(0)
    outcome = _fuse(nn.Sequential(NarrowMoE()), torch.randn(16, 8)).layers[0]
    assert outcome.fused, outcome.reason
    assert outcome.spec.route.scoring == "sigmoid" and outcome.spec.route.top_k == 3
    joint = [t for t in outcome.rules if t.stage == "joint"]
    assert [t.result for t in joint] == ["matched"] and "interleaved" in joint[0].detail
    assert outcome.candidates_tried < 100  # whole-layer checks only for routes that passed the screen

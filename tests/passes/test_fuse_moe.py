"""fuse_moe: every transformers family and hand-written style becomes one FusedMoE per layer."""

import math

import pytest
import torch
from torch import nn

from moec import zoo
from moec.moe_layer import FusedMoE
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import FuseMoE, find_candidates
from moec.passes.fusion_rules import ROUTING_RULES

# family -> (number of MoE layers, expected routing / experts facts)
EXPECTED = {
    "mixtral": (2, dict(scoring="softmax", top_k=2, renormalize=True)),
    "qwen2_moe": (2, dict(scoring="softmax", top_k=2, renormalize=False, shared=True, shared_gate=True)),
    "qwen3_moe": (2, dict(scoring="softmax", top_k=3, renormalize=True)),
    "deepseek_v3": (2, dict(scoring="sigmoid", top_k=2, renormalize=True, n_group=4, topk_group=2, scale=2.5,
                            has_selection_bias=True, shared=True)),
    "olmoe": (2, dict(scoring="softmax", top_k=2, renormalize=False)),
    "gpt_oss": (2, dict(top_k=2, activation="swiglu", alpha=1.702, limit=7.0, has_bias=True)),
    "granitemoe": (2, dict(top_k=2)),
    "phimoe": (2, dict(route=None)),  # sparse mixer: router kept as written
    "llama4": (2, dict(scoring="sigmoid", top_k=1, select_on="logits", weight_on_input=True, shared=True)),
    # router nested in a submodule (gate.wg)
    "hunyuan_v1_moe": (2, dict(scoring="softmax", top_k=2, renormalize=True, shared=True)),
    # selection bias stored [1, E] beside the router (gate.moe_statics)
    "ernie4_5_moe": (2, dict(scoring="softmax", top_k=2, renormalize=True, has_selection_bias=True, shared=True)),
}


def _fuse(src):
    ctx = PassContext(probes=[src.example_args, src.make_inputs(7, seq_len=5, batch=1)])
    module, records = PassManager([FuseMoE()], validate=True).run(src.module, ctx)
    return module, records[0]


def _facts(spec):
    facts = {"route": spec.route, "shared": spec.shared, "shared_gate": spec.shared_gate}
    facts.update(vars(spec.experts))
    if spec.route is not None:
        facts.update(vars(spec.route))
    return facts


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_fuses_every_moe_layer(family):
    src = zoo.hf_family(family)
    module, record = _fuse(src)
    n_layers, expected = EXPECTED[family]
    fused = [m for m in module.modules() if isinstance(m, FusedMoE)]
    assert len(fused) == n_layers, record.details
    assert record.details["unfused"] == 0
    assert record.validation is not None and record.validation.rel_l2 < 1e-5
    facts = _facts(fused[0].spec)
    for key, value in expected.items():
        if key == "route":
            assert facts["route"] is value
        elif isinstance(value, float):
            assert math.isclose(facts[key], value, rel_tol=1e-6), (key, facts[key])
        else:
            assert facts[key] == value, (key, facts[key])


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_fusion_does_not_depend_on_the_experts_implementation(impl):
    src = zoo.hf_family("mixtral")
    src.module.model.set_experts_implementation(impl)
    module, record = _fuse(src)
    assert record.details["fused"] == 2 and record.validation.rel_l2 < 1e-5
    # the fused layers export even where the original implementation could not (eager's loop)
    torch.export.export(module, src.example_args, dynamic_shapes=src.dynamic_shapes, strict=False)


@pytest.mark.parametrize("style", list(zoo.HANDWRITTEN))
def test_handwritten_style_fuses(style):
    src = zoo.handwritten(style)
    module, record = _fuse(src)
    assert [type(m).__name__ for m in module.modules() if isinstance(m, FusedMoE)] == ["FusedMoE"], record.details
    assert record.validation.rel_l2 < 1e-5


def test_handwritten_semantics_read_from_behaviour():
    specs = {}
    for style in ("switch", "soft_mixture", "gshard"):
        module, _ = _fuse(zoo.handwritten(style))
        specs[style] = next(m for m in module.modules() if isinstance(m, FusedMoE)).spec
    assert specs["switch"].route.top_k == 1 and not specs["switch"].route.renormalize
    assert specs["switch"].experts.activation == "relu" and not specs["switch"].experts.gated
    assert specs["soft_mixture"].route.top_k == 4  # every expert: a dense soft mixture
    assert specs["gshard"].experts.activation == "gelu_tanh"


def test_bare_router_and_parallel_lists_are_read():
    """A bare [H, E] router beside separately stacked gate/up/down, and experts as parallel ModuleLists of
    biased Linears (issue #16's unrecognised styles)."""
    module, _ = _fuse(zoo.handwritten("bare_router"))
    spec = next(m for m in module.modules() if isinstance(m, FusedMoE)).spec
    assert spec.route.scoring == "softmax" and spec.route.renormalize and spec.experts.gated
    module, _ = _fuse(zoo.handwritten("parallel_lists"))
    fused = next(m for m in module.modules() if isinstance(m, FusedMoE))
    assert fused.spec.experts.activation == "gelu_tanh" and not fused.spec.experts.gated
    assert fused.spec.experts.has_bias and fused.b_gate_up.shape == (4, 40)


def test_experts_stacked_on_sibling_children_and_an_output_bias_are_read():
    """JetMoE's layout: input_linear / output_linear each hold one [E, out, in] tensor, and the block adds
    its own [H] bias to the output; without reading both, no candidate reproduces the layer."""
    module, record = _fuse(zoo.handwritten("stacked_on_siblings"))
    fused = next(m for m in module.modules() if isinstance(m, FusedMoE))
    assert fused.spec.output_bias and fused.output_bias.shape == (32,)
    assert fused.spec.experts.gated and fused.spec.route.top_k == 2 and fused.spec.route.renormalize
    assert record.validation.rel_l2 < 1e-5


def test_experts_fuse_on_their_own_when_the_routing_is_not_a_rule():
    """The block's routing matches no rule (a learned per-expert scale, tokens routed nowhere), so the block
    stays; its experts module, called with (hidden, ids, weights), becomes a FusedMoE that takes the
    caller's routing as given, exactly, at any routing (probes include random ids and weights)."""
    from moec.moe_layer import ExpertsOnly

    src = zoo.handwritten("routed_by_caller")
    module, record = _fuse(src)
    wrapped = module.moe.experts
    assert isinstance(wrapped, ExpertsOnly) and wrapped.layer.spec.route is None
    [layer] = record.details["layers"]
    assert layer["fused"] and layer["path"] == "moe.experts" and "block not fused" in layer["reason"]
    assert record.validation.rel_l2 < 1e-5
    x = torch.randn(3, 32)
    ids = torch.tensor([[1, 4], [0, 5], [2, 3]])
    w = torch.tensor([[2.5, 0.0], [0.0, 0.0], [0.3, 1.7]])
    original = zoo.handwritten("routed_by_caller").module.moe.experts
    torch.testing.assert_close(wrapped(x, ids, w), original(x, ids, w), rtol=1e-5, atol=1e-6)


def test_dense_model_has_no_moe_layers():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    assert find_candidates(model) == []
    out, records = PassManager([FuseMoE()]).run(model, PassContext(probes=[(torch.randn(3, 8),)]))
    assert records[0].modified is False and records[0].details["layers"] == []


class OddRouterMoE(nn.Module):
    """Looks like a MoE (router + stacked experts) but routes by a rule moec does not know."""

    def __init__(self, hidden=16, inter=8, experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, inter, hidden) * 0.3)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)

    def forward(self, x):
        logits = self.gate(x)
        w = torch.softmax(logits ** 2, dim=-1)  # squared logits: no candidate reproduces it
        h = torch.relu(torch.einsum("th,eih->tei", x, self.w_in))
        y = torch.einsum("tei,ehi->teh", h, self.w_out)
        return (w.unsqueeze(-1) * y).sum(1)


def test_unmatched_layer_stays_unfused_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(OddRouterMoE())
    out, records = PassManager([FuseMoE()]).run(model, PassContext(probes=[(torch.randn(5, 16),)]))
    layer = records[0].details["layers"][0]
    assert layer["path"] == "0" and layer["fused"] is False
    assert "no candidate semantics reproduced the layer" in layer["reason"]
    assert "no routing rule" in layer["reason"]
    assert isinstance(out[0], OddRouterMoE)
    # the report says rule by rule: the experts read, and why each routing rule failed
    rules = [(t["stage"], t["rule"], t["result"]) for t in layer["rules"]]
    assert ("experts", "stacked ungated", "matched") in rules
    routing = [t for t in layer["rules"] if t["stage"] == "routing"]
    assert [t["rule"] for t in routing] == [r.name for r in ROUTING_RULES]
    assert all(t["result"] in ("failed", "not applicable") and t["detail"] for t in routing)


class ScaledLoopMoE(zoo.LoopMoE):
    def forward(self, x, scale):
        return super().forward(x) * scale


def test_layer_taking_extra_inputs_is_refused():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = ScaledLoopMoE(hidden=8, inter=8, num_experts=2, top_k=1)

        def forward(self, x):
            return self.moe(x, 2.0) + x

    _, records = PassManager([FuseMoE()]).run(Wrapper(), PassContext(probes=[(torch.randn(2, 3, 8),)]))
    layer = records[0].details["layers"][0]
    assert layer["fused"] is False and "more than the hidden states" in layer["reason"]


def test_layer_never_executed_is_reported():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = zoo.LoopMoE(hidden=8, inter=8, num_experts=2, top_k=1)

        def forward(self, x):
            return x * 2

    _, records = PassManager([FuseMoE()]).run(Skips(), PassContext(probes=[(torch.randn(2, 3, 8),)]))
    assert records[0].details["layers"][0]["reason"] == "not executed by the example inputs"


class PostNormMoE(nn.Module):
    """A router that returns its decision, squared-ReLU experts, a routed scale the block applies past the
    router (MiniMax-M3), a shared expert, and a norm on the block's output (A.X-K1)."""

    def __init__(self, hidden=16, inter=8, experts=4):
        super().__init__()
        self.router = Router(hidden, experts)
        self.w_in = nn.Parameter(torch.randn(experts, inter, hidden) * 0.3)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)
        self.routed_scaling_factor = 2.5
        self.act_fn = SquaredReLU()  # squared ReLU is tried only when the layer names it
        self.shared = nn.Linear(hidden, hidden, bias=False)  # makes the scale visible through the norm
        self.post_norm = nn.RMSNorm(hidden, eps=1e-6)
        with torch.no_grad():
            self.post_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        ids, w = self.router(flat)
        h = self.act_fn(torch.einsum("th,eih->tei", flat, self.w_in))
        y = torch.einsum("tei,ehi->teh", h, self.w_out)
        routed = (y.gather(1, ids[..., None].expand(-1, -1, y.shape[-1])) * w[..., None]).sum(1)
        return self.post_norm(routed * self.routed_scaling_factor + self.shared(flat)).reshape(x.shape)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x).square()


class Router(nn.Module):
    def __init__(self, hidden, experts, top_k=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.5)
        self.top_k = top_k

    def forward(self, flat):
        probs = torch.softmax(flat @ self.weight.T, dim=-1)
        w, ids = probs.topk(self.top_k, dim=-1)
        return ids, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_post_norm_block_scale_and_squared_relu(target, tmp_path):
    from moec.pipeline import CompileOptions, compile

    torch.manual_seed(0)
    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=32)},)
    res = compile(nn.Sequential(PostNormMoE()).eval(), (torch.randn(2, 5, 16),), dyn,
                  options=CompileOptions(out=str(tmp_path / "a"), target=target))
    layer = res.report["moe_layers"]["layers"][0]
    assert layer["fused"] and layer["spec"]["post_norm"], layer
    assert layer["spec"]["route"]["scale"] == 2.5 and layer["spec"]["experts"]["activation"] == "relu2"
    assert res.report["numerics"]["passed"]
    assert max(i["rel_l2"] for i in res.report["numerics"]["inputs"]) < 1e-5


class Softcap(nn.Module):
    def __init__(self, softcap):
        super().__init__()
        self.softcap = softcap

    def forward(self, x):
        return torch.tanh(x / self.softcap) * self.softcap


class SoftcappedSwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_softcap, self.up_softcap = Softcap(0.8), Softcap(0.6)

    def forward(self, gate, up):
        return self.gate_softcap(gate) * torch.sigmoid(gate) * self.up_softcap(up)


class SoftcappedMoE(nn.Module):
    """Inkling 2's expert activation: the sigmoid sees the raw gate, tanh caps bound the gate and up factors."""

    def __init__(self, hidden=16, inter=8, experts=4):
        super().__init__()
        self.router = Router(hidden, experts)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)
        self.act_fn = SoftcappedSwiGLU()

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        ids, w = self.router(flat)
        gate, up = torch.einsum("th,eih->tei", flat, self.gate_up).chunk(2, dim=-1)
        y = torch.einsum("tei,ehi->teh", self.act_fn(gate, up), self.down)
        return (y.gather(1, ids[..., None].expand(-1, -1, y.shape[-1])) * w[..., None]).sum(1).reshape(x.shape)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_softcapped_swiglu(target, tmp_path):
    from moec.pipeline import CompileOptions, compile

    torch.manual_seed(0)
    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=32)},)
    res = compile(nn.Sequential(SoftcappedMoE()).eval(), (torch.randn(2, 5, 16) * 3,), dyn,
                  options=CompileOptions(out=str(tmp_path / "a"), target=target))
    layer = res.report["moe_layers"]["layers"][0]
    x = layer["spec"]["experts"]
    assert layer["fused"] and (x["activation"], x["alpha"], x["limit"]) == ("swiglu_softcap", 0.8, 0.6), layer
    assert res.report["numerics"]["passed"]
    assert max(i["rel_l2"] for i in res.report["numerics"]["inputs"]) < 1e-5


def _codes(e, n, k, symmetric, seed):
    from moec.quant import QuantizedWeight, QuantSpec

    g = torch.Generator().manual_seed(seed)
    zp = None if symmetric else torch.randint(0, 256, (e, n, 2), dtype=torch.int32, generator=g)
    return QuantizedWeight(torch.randint(0, 256, (e, n, k), dtype=torch.int32, generator=g),
                           torch.rand(e, n, 2, generator=g) + 0.1, zp, QuantSpec(8, k // 2, symmetric))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pre_quantized_codes_follow_transposed_and_reordered_readings(transposed, symmetric):
    """Codes attached to stacked experts (as a checkpoint's loader does; transposed: for the weight's transpose, as
    GPT-OSS stores x @ W) reach every gate|up / up|gate / interleaved reading of the matching orientation, rows
    reordered as the weights were, dequantizing to exactly the weights read, scales and zero points alike."""
    from moec.passes.fuse_moe import expert_codes
    from moec.passes.fusion_rules import EXPERT_RULES, ExpertSource
    from moec.quant import WeightCodes, dequantize

    e, h, i = 3, 64, 32
    q_in, q_out = _codes(e, 2 * i, h, symmetric, 0), _codes(e, h, i, symmetric, 1)
    w_in, w_out = dequantize(q_in), dequantize(q_out)
    if transposed:
        w_in, w_out = w_in.transpose(1, 2).contiguous(), w_out.transpose(1, 2).contiguous()
    table = WeightCodes()
    table.attach(w_in, q_in, transposed)
    table.attach(w_out, q_out, transposed)
    source = ExpertSource(e, {"w_in": w_in, "w_out": w_out})
    for rule in [r for r in EXPERT_RULES if r.name in ("stacked gate|up", "stacked up|gate", "stacked interleaved")]:
        with_codes = []
        for reading in rule.read(source, h):
            codes = expert_codes(table, reading)
            if codes is not None:
                assert torch.equal(dequantize(codes.gate_up), reading.w_gate_up)
                assert torch.equal(dequantize(codes.down), reading.w_down)
                if codes.gate_up.zero_points is not None:
                    assert codes.gate_up.zero_points.shape == codes.gate_up.scales.shape
                with_codes.append(reading.layout)
        # exactly the reading that reads both tensors in the orientation the codes describe
        assert with_codes == [("inᵀ/outᵀ" if transposed else "in/out") + rule.name[len("stacked"):]], rule.name


def test_codes_that_no_longer_give_back_the_weights_are_not_used():
    """A tensor changed after its codes were attached: the fused layer must not carry codes of another model."""
    from moec.passes.fuse_moe import expert_codes
    from moec.passes.fusion_rules import EXPERT_RULES, ExpertSource
    from moec.quant import WeightCodes, dequantize

    q_in, q_out = _codes(2, 64, 32, True, 2), _codes(2, 32, 32, True, 3)
    w_in, w_out = dequantize(q_in), dequantize(q_out)
    table = WeightCodes()
    table.attach(w_in, q_in)
    table.attach(w_out, q_out)
    rule = next(r for r in EXPERT_RULES if r.name == "stacked gate|up")
    reading = next(r for r in rule.read(ExpertSource(2, {"w_in": w_in, "w_out": w_out}), 32) if r.layout.startswith("in/out"))
    assert expert_codes(table, reading) is not None
    with torch.no_grad():
        w_out[0, 0, 0] += 1.0
    assert expert_codes(table, reading) is None

"""--quant auto: each MoE layer at the cheapest precision the accuracy budget allows."""

import json
import math

import pytest

import moec
from moec import cli
from moec.mixed_precision import FULL, PRECISIONS, choose, choose_batched

# two layers; layer "b" is four times as sensitive as "a"
SENSITIVITY = {"a": {"int2": 0.4, "int4": 0.1, "int8": 0.005}, "b": {"int2": 1.6, "int4": 0.4, "int8": 0.02}}
BYTES = {p: {"int2": 25, "int4": 50, "int8": 100, FULL: 400} for p in ("a", "b")}


def _additive(choice):
    return math.sqrt(sum(SENSITIVITY[p][c] ** 2 for p, c in choice.items() if c != FULL))


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.05, 0.2, 0.45, 2.0])
def test_the_choice_is_within_the_budget_and_never_dearer_than_a_uniform_precision_within_it(budget):
    plan = choose(["a", "b"], BYTES, _additive, budget)
    assert plan.measured <= budget
    chosen = sum(BYTES[p][c] for p, c in plan.choice.items())
    for u in plan.uniform:
        if u["within_budget"]:
            assert chosen <= u["weight_bytes"]
    assert dict(plan.steps[-1].choice) == plan.choice  # the curve ends at the choice


def test_a_greedy_overshoot_steps_back_down_and_a_cheaper_uniform_precision_wins():
    """Layer a's int4 and int8 both stay high, so the climb takes it to full precision; uniform int8 (200 bytes,
    error 0.30) is within the budget and cheaper than the climb's (fp32, int4) at 450."""
    sensitivity = {"a": {"int2": 1.0, "int4": 0.5, "int8": 0.3}, "b": {"int2": 1.0, "int4": 0.1, "int8": 0.0}}

    def additive(choice):
        return math.sqrt(sum(sensitivity[p][c] ** 2 for p, c in choice.items() if c != FULL))

    plan = choose(["a", "b"], BYTES, additive, 0.31)
    assert sum(BYTES[p][c] for p, c in plan.choice.items()) <= 200 and plan.measured <= 0.31


def test_a_layer_whose_error_is_not_finite_goes_up_first():
    sensitivity = {"a": {"int2": math.nan, "int4": math.nan, "int8": 0.01}, "b": {"int2": 0.01, "int4": 0.01,
                                                                                 "int8": 0.001}}

    def additive(choice):
        return math.sqrt(sum(sensitivity[p][c] ** 2 for p, c in choice.items() if c != FULL))

    plan = choose(["a", "b"], BYTES, additive, 0.05)
    assert plan.choice == {"a": "int8", "b": "int2"} and plan.measured <= 0.05


def test_the_more_sensitive_layer_gets_more_bits():
    plan = choose(["a", "b"], BYTES, _additive, 0.2)
    assert PRECISIONS.index(plan.choice["b"]) > PRECISIONS.index(plan.choice["a"])
    assert plan.choice == {"a": "int4", "b": "int8"}


def test_a_real_error_over_the_prediction_takes_more_steps():
    """Errors that add up worse than their squares predict: the measured check keeps stepping up."""
    def correlated(choice):
        return sum(SENSITIVITY[p][c] for p, c in choice.items() if c != FULL)

    plan = choose(["a", "b"], BYTES, correlated, 0.11)  # predicted 0.102 at (int4, int8), measured 0.12
    assert plan.measured <= 0.11 and plan.choice == {"a": "int8", "b": "int8"}
    assert any(s.measured is not None and s.measured > 0.11 for s in plan.steps)


def test_measurements_come_in_batches_a_streamed_pass_can_take_together():
    """The sensitivities and the uniform precisions are one batch, each climb measurement one, and each round
    down one batch of every layer one step down: out of core a batch is one pass over the checkpoint."""
    sensitivity = {"a": {"int2": 1.0, "int4": 0.5, "int8": 0.3}, "b": {"int2": 1.0, "int4": 0.1, "int8": 0.0}}
    batches = []

    def errors_of(choices):
        batches.append(choices)
        return [math.sqrt(sum(sensitivity[p][c] ** 2 for p, c in ch.items() if c != FULL)) for ch in choices]

    plan = choose_batched(["a", "b"], BYTES, errors_of, 0.31)
    assert len(batches[0]) == 2 * 3 + 3 and all(len(ch) == 1 for ch in batches[0][:6])
    downs = [b for b in batches[1:] if len(b) > 1]
    assert downs and all(len(set(map(str, b))) == len(b) for b in downs)  # every layer one step down, each once
    assert sum(BYTES[p][c] for p, c in plan.choice.items()) <= 200 and plan.measured <= 0.31


def test_a_round_down_takes_the_steps_adding_least_error_first():
    """Layers of equal bytes (int4 -> int2 saves as much on each): the steps that fit are combined in order of the
    error each adds alone, so the round takes the two cheapest together (c and d), where path order would have
    combined a and b, found them over, and taken a alone (175 bytes instead of 150)."""
    sensitivity = {p: {"int2": e, "int4": 0.01, "int8": 0.001} for p, e in zip("abcd", (0.09, 0.08, 0.07, 0.06))}
    sizes = {p: {"int2": 25, "int4": 50, "int8": 100, FULL: 400} for p in "abcd"}
    batches = []

    def errors_of(choices):  # errors that partly cancel once two layers are quantized: the climb overshoots
        batches.append(choices)
        out = []
        for ch in choices:
            quantized = [sensitivity[p][c] for p, c in ch.items() if c != FULL]
            rss = math.sqrt(sum(e * e for e in quantized))
            out.append(rss if len(quantized) <= 1 else 0.5 * rss)
        return out

    plan = choose_batched(list("abcd"), sizes, errors_of, 0.05)
    assert plan.choice == {"a": "int4", "b": "int4", "c": "int2", "d": "int2"} and plan.measured <= 0.05
    downs = next(i for i, b in enumerate(batches[1:], 1) if len(b) == 4)  # the first round: every layer down
    assert batches[downs + 1][0] == {"a": "int4", "b": "int4", "c": "int2", "d": "int2"}  # d, then c: first pair


def _compile(tmp_path, name, **extra):
    return moec.compile(source="moec.zoo:qwen3_moe", out=str(tmp_path / name), extra=extra).report


def test_quant_auto_writes_fewer_bytes_than_uniform_int8_within_a_budget_int4_misses(tmp_path, capsys):
    """Between uniform int8's error and uniform int4's: one layer int4, one int8; the artifact is exact against
    its dequantized reference, and within the budget against fp32."""
    report = _compile(tmp_path, "auto", quant="auto", accuracy_budget=0.1)
    q = report["quantization"]
    auto = q["auto"]
    uniform = {u["precision"]: u for u in auto["uniform"]}
    assert uniform["int8"]["within_budget"] and not uniform["int4"]["within_budget"]
    assert sorted(auto["choice"].values()) == ["int4", "int8"]
    assert q["weight_bytes_quantized"] < uniform["int8"]["weight_bytes"]
    assert q["logits_vs_fp32"]["rel_l2"] <= 0.1 and auto["measured_rel_l2"] <= 0.1
    assert report["numerics"]["passed"]
    assert q["onnxruntime_quantizes_activations"] is False  # int4 and int8 per row: exact on ORT's CPU kernels
    assert sorted(l["quantization"].split()[0] for l in q["layers"]) == ["int4", "int8"]
    assert sorted(l["lowered_to"].split(" (")[0] for l in report["moe_layers"]["layers"]) == ["com.microsoft.QMoE"] * 2
    # moec inspect --quant shows the choice and the curve; --plot draws it
    assert cli.main(["inspect", str(tmp_path / "auto"), "--quant", "--plot", str(tmp_path / "q.png")]) == 0
    out = capsys.readouterr().out
    assert "--quant auto, budget 0.1" in out and "uniform, for comparison" in out
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["inspect", str(tmp_path / "auto"), "--quant", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["choice"] == auto["choice"]


def test_a_budget_tighter_than_int8_keeps_every_layer_at_full_precision(tmp_path):
    report = _compile(tmp_path, "fp", quant="auto", accuracy_budget=1e-4)  # int8 alone moves it by ~5e-3
    q = report["quantization"]
    assert set(q["auto"]["choice"].values()) == {FULL}
    assert all(l["method"] == "kept at full precision" for l in q["layers"])
    assert q["logits_vs_fp32"]["rel_l2"] < 1e-5 and report["numerics"]["passed"]
    assert all(l["lowered_to"].startswith("com.microsoft.MoE") for l in report["moe_layers"]["layers"])


def test_after_pruning_the_budget_is_against_the_pruned_model(tmp_path):
    """Pruning runs first; auto measures against the pruned full-precision model, as the budget check does, so
    its own measurement and the report's agree."""
    report = _compile(tmp_path, "pruned", quant="auto", accuracy_budget=0.3, prune_experts=0.25,  # bounds both
                      calibration="random:8")
    q = report["quantization"]
    assert q["logits_vs_fp32_against"] == "the pruned full-precision model"
    assert q["logits_vs_fp32"]["rel_l2"] == pytest.approx(q["auto"]["measured_rel_l2"], rel=1e-6)
    assert q["auto"]["measured_rel_l2"] <= 0.3 and report["pruning"]["experts_after"] < report["pruning"]["experts_before"]


@pytest.mark.parametrize("budget,label", [(1e-4, "dense ONNX ops (all experts)"),
                                          (10.0, "dense ONNX ops (all experts) (dequantized)")])
def test_a_layer_without_an_ort_op_says_whether_its_dense_ops_run_dequantized_weights(budget, label, tmp_path):
    """Squared-ReLU experts have no MoE/QMoE form: the layer runs as dense ops, over its own fp32 weights when auto
    keeps it at full precision, over the dequantized ones when quantized."""
    report = moec.compile(source="moec.zoo:squared_relu_top1_moe", out=str(tmp_path / "out"),
                          extra=dict(quant="auto", accuracy_budget=budget)).report
    assert [l["lowered_to"] for l in report["moe_layers"]["layers"]] == [label]
    assert report["numerics"]["passed"]

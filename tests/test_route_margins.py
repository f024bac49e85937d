"""Route margins: the smallest top-k gap of a forward pass, and verification inputs redrawn when it is a tie."""

import math

import torch
from torch import nn

from moec import zoo
from moec.pipeline import CompileOptions, Loaded, eager_reference
from moec.route_margins import MIN_MARGIN, VERIFY_SEEDS, watch_route_margins
from moec.sources import LoadedSource


def test_the_gap_at_the_selection_boundary_relative_to_the_row():
    with watch_route_margins() as watch:
        torch.topk(torch.tensor([[3.0, 2.0, 1.0, 0.0], [4.0, 0.0, 3.0, -1.0]]), 1)  # gaps 1/3 and 1/4
        torch.tensor([[0.0, 1.0, 5.0]]).topk(1, largest=False)  # 0 then 1: gap 1 of max |score| 5
        torch.topk(torch.randn(3, 4), 4)  # everything selected: no boundary
    assert watch.margins.selections == 3
    assert math.isclose(watch.margins.smallest, 0.2, rel_tol=1e-6)

    with watch_route_margins() as watch:  # masked groups (-inf) are not a tie with each other
        torch.topk(torch.tensor([[2.0, 1.0, -math.inf, -math.inf]]), 2, dim=-1)
        torch.topk(torch.tensor([[0.5, 0.5, 0.1]]), 1)
    assert watch.margins.smallest == 0.0 and not watch.margins.well_conditioned


def test_a_transformers_moe_is_watched_at_every_token_of_every_layer():
    model = zoo.build_hf_model("mixtral")
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), watch_route_margins() as watch:
        model(ids)
    assert watch.margins.selections == 2 * 7 * model.config.num_hidden_layers
    assert 0 < watch.margins.smallest < 1


class TiedFirst(nn.Module):
    """Routes x's first four features top-2; the first `tied_calls` forward passes see two equal scores."""

    def __init__(self, tied_calls: int):
        super().__init__()
        self.calls, self.tied_calls = 0, tied_calls

    def forward(self, x):
        scores = x[..., :4].sort(-1, descending=True).values.clone()
        if self.calls < self.tied_calls:
            scores[..., 2] = scores[..., 1]  # the 2nd and 3rd best: a tie at the top-2 boundary
        self.calls += 1
        values, _ = torch.topk(scores, 2)
        return x * values.sum(-1, keepdim=True)


def _loaded(module):
    src = LoadedSource(module, (torch.randn(2, 5, 8),), ({0: torch.export.Dim("batch", max=8)},), "test")
    return Loaded(src, None, {}, [], src.dim_ranges())


def test_inputs_on_a_tie_are_redrawn_and_the_report_says_which_ran():
    logged = []
    ref = eager_reference(_loaded(TiedFirst(tied_calls=2)), CompileOptions(out="unused", log=logged.append))
    m = ref.route_margins
    assert m["seed"] == VERIFY_SEEDS[1] and m["draws"] == 2 and m["well_conditioned"]
    assert m["smallest_relative"] >= MIN_MARGIN and m["selections"] == 2 * 5 + 3 * 5  # batch 2 and batch 3
    assert any(f"seed {VERIFY_SEEDS[0]}" in line and "tie" in line for line in logged)
    fresh = LoadedSource(nn.Identity(), (torch.randn(2, 5, 8),), ({0: torch.export.Dim("batch", max=8)},))
    expected = fresh.verification_inputs(None, seed=VERIFY_SEEDS[1])
    assert all(torch.equal(a, b) for got, want in zip(ref.inputs, expected) for a, b in zip(got, want))


def test_when_every_draw_ties_the_best_is_kept_and_flagged():
    ref = eager_reference(_loaded(TiedFirst(tied_calls=10 ** 6)), CompileOptions(out="unused"))
    m = ref.route_margins
    assert m["draws"] == len(VERIFY_SEEDS) and not m["well_conditioned"] and m["smallest_relative"] == 0.0
    assert m["seed"] == VERIFY_SEEDS[0]


def test_fused_routing_and_masked_scores_are_watched():
    from moec import ops  # noqa: F401  (torch.ops.moec.route)

    with watch_route_margins() as watch:  # a fused layer's routing op: its top-k is seen
        torch.ops.moec.route(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), None, "softmax", 1, True, 1, 1, 1.0, True)
    assert watch.margins.selections == 1 and math.isclose(watch.margins.smallest, 1 / 3, rel_tol=1e-6)

    lowest = torch.finfo(torch.float32).min  # a mask added as the dtype's lowest value, not -inf
    with watch_route_margins() as watch:
        torch.topk(input=torch.tensor([[1.0, 0.5, lowest, lowest]]), k=2)
        torch.topk(torch.tensor([[3, 3, 1]]), 1)  # integer scores: not routing
    assert watch.margins.selections == 0


FACTORY = '''
import torch
from moec.sources import LoadedSource


class TiedFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        scores = x[..., :4].sort(-1, descending=True).values.clone()
        if self.calls == 0:
            scores[..., 2] = scores[..., 1]
        self.calls += 1
        return x * torch.topk(scores, 2).values.sum(-1, keepdim=True)


def factory():
    return LoadedSource(TiedFirst().eval(), (torch.randn(2, 5, 8),), ({0: torch.export.Dim("batch", max=8)},), "tied")
'''


def test_golden_record_redraws_inputs_on_a_tie(tmp_path, monkeypatch, capsys):
    import numpy as np

    from moec.cli import main

    (tmp_path / "tied_source.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["golden", "record", "tied_source:factory", "--out", str(tmp_path / "g")]) == 0
    assert f"seed {VERIFY_SEEDS[0]}" in capsys.readouterr().err
    fresh = LoadedSource(nn.Identity(), (torch.randn(2, 5, 8),), ({0: torch.export.Dim("batch", max=8)},))
    want = fresh.make_inputs(seed=VERIFY_SEEDS[1])[0].numpy()
    got = [np.load(p) for p in (tmp_path / "g").glob("probe0*input*.npy")]
    assert len(got) == 1 and np.array_equal(got[0], want), sorted(p.name for p in (tmp_path / "g").iterdir())

"""moec.passes.layers: capturing what layers are given."""

import torch
from torch import nn

from moec.passes.layers import capture_inputs


class _Counted(nn.Linear):
    def __init__(self, n):
        super().__init__(n, n)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_capture_stops_once_every_layer_was_seen_and_runs_whole_when_one_never_is():
    """The run stops at the last layer asked for (calibration captures inputs per batch and group; the layers
    after it would run for nothing); the inputs are each layer's, in call order. A path the model never calls
    leaves the whole model run, and is simply absent."""
    torch.manual_seed(0)
    model = nn.Sequential(_Counted(4), _Counted(4), _Counted(4), _Counted(4))
    x = torch.randn(3, 4)
    got = capture_inputs(model, ["2", "1"], (x,))
    assert list(got) == ["1", "2"] and [m.calls for m in model] == [1, 1, 0, 0]  # stopped as 2 was called
    assert torch.equal(got["1"][1], model[0](x)) and torch.equal(got["2"][1], model[1](model[0](x)))
    for m in model:
        m.calls = 0
    spare = _Spare(model)
    got = capture_inputs(spare, ["body.1", "spare"], (x,))
    assert list(got) == ["body.1"] and [m.calls for m in model] == [1, 1, 1, 1] and spare.spare.calls == 0


class _Spare(nn.Module):
    """A model with a layer its forward never calls."""

    def __init__(self, body):
        super().__init__()
        self.body, self.spare = body, _Counted(4)

    def forward(self, x):
        return self.body(x)

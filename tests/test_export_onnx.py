"""capture: a model torch.export can't capture is refused naming the module and the line that stopped it."""

import pytest
import torch
from torch import nn

from moec.errors import CaptureError
from moec.export_onnx import capture


class SortedDispatch(nn.Module):
    """Tokens sorted by expert, a loop over per-expert slices of data-dependent size (no fixed-size form)."""

    def __init__(self, hidden=8, experts=3):
        super().__init__()
        self.score = nn.Parameter(torch.randn(hidden, experts))
        self.w = nn.Parameter(torch.randn(experts, hidden, hidden) * 0.1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = (flat @ self.score).argmax(-1)
        order = choice.argsort()
        counts = torch.bincount(choice, minlength=self.w.shape[0]).tolist()
        out, start = torch.zeros_like(flat), 0
        for e, n in enumerate(counts):
            idx = order[start:start + n]
            out[idx] = flat[idx] @ self.w[e]
            start += n
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.moe = SortedDispatch()

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_data_dependent_layer_is_named_with_its_line():
    with pytest.raises(CaptureError) as e:
        capture(Model().eval(), (torch.randn(2, 5, 8),), None)
    msg = str(e.value)
    assert "in module 'layers.0.moe' (SortedDispatch), test_export_onnx.py:" in msg
    assert "tolist()" in msg  # the line that made it data-dependent
    assert "depend on tensor values" in msg and e.value.exit_code == 4


def test_a_specialized_dynamic_dim_suggests_static():
    class FixedSeq(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 2, 3).sum(-1)

    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=64)},)
    with pytest.raises(CaptureError, match=r"specializes a dimension given as dynamic; compile with --static"):
        capture(FixedSeq(), (torch.randn(2, 6),), dyn)

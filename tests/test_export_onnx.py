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


class ChunkedScan(nn.Module):
    """Pads seq to a multiple of 4 and scans each chunk, as chunked linear attention (Qwen3-Next, MiniMax,
    Kimi-Linear) does: correct at every seq, but torch.export can't prove its guard over the range."""

    def forward(self, x):
        s = x.shape[1]
        y = nn.functional.pad(x, (0, 0, 0, (4 - s % 4) % 4))
        n = y.shape[1] // 4
        if n == y.shape[1]:
            return x
        return y.view(x.shape[0], n, 4, -1).cumsum(2).reshape(x.shape[0], n * 4, -1)[:, :s] * 2


def test_guards_torch_export_cannot_prove_are_captured_as_runtime_checks():
    import numpy as np
    import onnxruntime as ort

    from moec.export_onnx import to_onnx

    dyn = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=64)},)
    with pytest.raises(Exception, match="Constraints violated"):  # what a plain named-Dim export says
        torch.export.export(ChunkedScan(), (torch.randn(2, 6, 8),), dynamic_shapes=dyn, strict=False)
    captured = capture(ChunkedScan(), (torch.randn(2, 6, 8),), dyn)
    assert len(captured.notes) == 1 and "Dim.DYNAMIC" in captured.notes[0] and "seq" in captured.notes[0]
    program = to_onnx(captured, ["x"], ["y"], dyn)
    assert [str(d) for d in program.model.graph.inputs[0].shape.dims][:2] == ["batch", "seq"]
    sess = ort.InferenceSession(program.model_proto.SerializeToString())
    for shape in [(3, 9, 8), (1, 2, 8), (2, 64, 8)]:  # seq not a multiple of 4, the range's ends
        x = torch.randn(*shape)
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ChunkedScan()(x).numpy(), rtol=1e-6,
                                   atol=1e-6)


def test_doge_attention_converts_under_no_grad(tmp_path):
    """With autograd on, torch.onnx's decomposition re-traced Doge's (and Inkling's) reshape of transposed
    attention output as a view of non-contiguous memory and refused it ("Cannot view a tensor with shape
    ..."); conversion runs under no_grad, as capture does, and the whole model matches eager."""
    import os
    import sys

    from moec.pipeline import CompileOptions, compile
    from moec.sources import causal_lm_source

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import survey_families

    threads = torch.get_num_threads()
    try:
        src = causal_lm_source(survey_families.build("doge"), "test:doge")
        report = compile(src.module, src.example_args, src.dynamic_shapes,
                         options=CompileOptions(out=str(tmp_path / "a"))).report
    finally:
        torch.set_num_threads(threads)
    rows = report["numerics"]["inputs"]
    assert len(rows) >= 2 and max(float(r["rel_l2"]) for r in rows) <= 1e-4

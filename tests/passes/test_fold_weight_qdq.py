"""fold_weight_qdq: PT2E-style quantize/dequantize on expert weights folds into QMoE, codes unchanged."""

import os

import numpy as np
import onnx
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (torch.ops.quantized_decomposed)
import torch.nn.functional as F
from onnx import helper, numpy_helper

from moec.pipeline import CompileOptions, compile
from moec.quant import QuantError, QuantizedWeight, QuantSpec, pack
from moec.zoo import LoopMoE

pytestmark = pytest.mark.slow
QD = torch.ops.quantized_decomposed
DYN = ({0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=32)},)


class QDQLinear(torch.nn.Module):
    """A Linear in PyTorch's decomposed quantized form: signed integer codes, scales, zero points, and
    a dequantize op in forward (what PT2E's convert / torchao's decomposed weight-only layers emit).
    `pair=True` keeps the float weight and a quantize -> dequantize pair instead (unfolded PT2E)."""

    def __init__(self, linear, bits=8, group=None, asymmetric=False, pair=False, qrange=None):
        super().__init__()
        w = linear.weight.detach()
        n, k = w.shape
        self.qmin, self.qmax = qrange or (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        self.group = group
        blocks = w.reshape(n, -1, group) if group else w.reshape(n, 1, k)
        if asymmetric:
            lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
            scale = (hi - lo) / (self.qmax - self.qmin)
            zp = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        else:
            scale = blocks.abs().amax(-1) / self.qmax
            zp = torch.zeros_like(scale)
        scale, zp = (scale, zp.to(torch.int32)) if group else (scale[:, 0], zp[:, 0].to(torch.int32))
        self.register_buffer("scales", scale.contiguous())
        self.register_buffer("zero_points", zp.contiguous())
        self.pair = pair
        if pair:
            self.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        else:
            self.register_buffer("qweight", self._quantize(w))
        self.bias = linear.bias

    def _quantize(self, w):
        if self.group:
            return QD.quantize_per_channel_group(w, self.scales, self.zero_points, self.qmin, self.qmax, torch.int8,
                                                 self.group)
        return QD.quantize_per_channel(w, self.scales, self.zero_points, 0, self.qmin, self.qmax, torch.int8)

    def forward(self, x):
        q = QD.quantize_per_channel_group(self.weight, self.scales, self.zero_points, self.qmin, self.qmax,
                                          torch.int8, self.group) if self.pair and self.group else (
            QD.quantize_per_channel(self.weight, self.scales, self.zero_points, 0, self.qmin, self.qmax, torch.int8)
            if self.pair else self.qweight)
        if self.group:
            w = QD.dequantize_per_channel_group(q, self.scales, self.zero_points, self.qmin, self.qmax, torch.int8,
                                                self.group, torch.float32)
        else:
            w = QD.dequantize_per_channel(q, self.scales, self.zero_points, 0, self.qmin, self.qmax, torch.int8)
        return F.linear(x, w, self.bias)


class Model(torch.nn.Module):
    def __init__(self, **qdq):
        super().__init__()
        torch.manual_seed(0)
        self.moe = LoopMoE(hidden=64, inter=64, num_experts=4, top_k=2)
        for expert in self.moe.experts:
            for name in ("w1", "w2", "w3"):
                setattr(expert, name, QDQLinear(getattr(expert, name), **qdq))

    def forward(self, x):
        return self.moe(x) + x


def _expected_codes(model, name, spec):
    """The QDQ modules' own codes, in moec's unsigned convention, packed like QMoE packs them."""
    mods = [getattr(e, name) for e in model.moe.experts]
    rows = []
    for m in mods:
        q = m._quantize(m.weight) if m.pair else m.qweight
        rows.append((q.to(torch.int32) - m.qmin).unsqueeze(0))
    g = mods[0].scales.reshape(mods[0].scales.shape[0], -1).shape[1]
    scales = torch.cat([m.scales.reshape(1, -1, g) for m in mods])
    return QuantizedWeight(torch.cat(rows), scales.float(), None, spec)


@pytest.mark.parametrize("qdq,spec", [
    (dict(bits=8), QuantSpec(8, None, True)),
    (dict(bits=4, group=32), QuantSpec(4, 32, True)),
    (dict(bits=4, group=16, asymmetric=True), QuantSpec(4, 16, False)),
    (dict(bits=8, pair=True), QuantSpec(8, None, True)),
    # PT2E's restricted symmetric range [-127, 127]: zero point 127 after the shift, so QMoE gets zero points
    (dict(bits=8, qrange=(-127, 127)), QuantSpec(8, None, False)),
])
def test_qdq_experts_fold_into_qmoe_with_their_codes(qdq, spec, tmp_path):
    model = Model(**qdq).eval()
    res = compile(model, (torch.randn(2, 5, 64),), DYN, options=CompileOptions(out=str(tmp_path / "a")))
    r = res.report
    assert r["moe_layers"]["fused"] == 1
    q = r["quantization"]
    assert q["spec"] == spec.name and len(q["folded_qdq"]["layers"]) == 12
    # the eager reference is the Q/DQ model itself, so the artifact is exact against "fp32" too
    assert r["numerics"]["vs_dequantized_reference"]["passed"]
    assert max(i["rel_l2"] for i in r["numerics"]["vs_fp32"]["inputs"]) < 1e-5
    m = onnx.load(os.path.join(res.out_dir, "model.onnx"))
    node = next(n for n in m.graph.node if n.op_type == "QMoE")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["expert_weight_bits"] == spec.bits and attrs.get("block_size", 0) == (spec.block_size or 0)
    fresh = Model(**qdq).eval()  # same seed: the same codes, before compile rewrote the model
    down = _expected_codes(fresh, "w2", spec)
    np.testing.assert_array_equal(inits[node.input[5]], pack(down).weight)  # fc2: byte for byte
    np.testing.assert_array_equal(inits[node.input[6]], pack(down).scales)


def test_unsupported_code_ranges_and_groups_are_refused(tmp_path):
    with pytest.raises(QuantError, match="2-bit"):
        compile(Model(bits=2).eval(), (torch.randn(2, 5, 64),), DYN, options=CompileOptions(out=str(tmp_path / "a")))
    with pytest.raises(QuantError, match="groups of 8"):
        compile(Model(bits=4, group=8).eval(), (torch.randn(2, 5, 64),), DYN,
                options=CompileOptions(out=str(tmp_path / "b")))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_requantizing_flags_conflict_with_folded_codes(tmp_path):
    from moec.errors import MoecError

    with pytest.raises(MoecError, match="already quantized"):
        compile(Model(bits=8).eval(), (torch.randn(2, 5, 64),), DYN,
                options=CompileOptions(out=str(tmp_path / "a"), extra={"quant": "int4", "block_size": 32}))

"""lower_attention: a decoder's attention as ONNX Runtime's GroupQueryAttention, exact where it applies,
the model's own ops (with the reason) where it does not."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import moec
from moec import zoo
from moec.targets.onnxruntime.ops import group_query_attention_reference
from moec.targets.onnxruntime.translations import translations

GQA = "com.microsoft.GroupQueryAttention"


class _Op(torch.nn.Module):
    def __init__(self, heads, kv_heads, scale, sink):
        super().__init__()
        self.heads, self.kv_heads, self.scale, self.sink = heads, kv_heads, scale, sink

    def forward(self, q, k, v, pk, pv, bias, sink=None):
        total = pk.shape[2] + q.shape[1]  # every position valid: the bias masks
        seqlens = torch.full((q.shape[0],), total - 1, dtype=torch.int32)
        return torch.ops.moec.ort_group_query_attention(q, k, v, pk, pv, seqlens, torch.full((), total, dtype=torch.int32),
                                                        bias, sink, self.heads, self.kv_heads, self.scale)


def _export(tmp_path, heads, kv_heads, head, sink):
    """The op alone through moec's translation, with dynamic batch, seq and past."""
    b, s, p, t = (torch.export.Dim(n, min=lo, max=64) for n, lo in (("b", 1), ("s", 1), ("p", 0), ("t", 1)))
    args = _inputs(2, 3, 2, heads, kv_heads, head, pad=0, sink=sink)
    dyn = ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}, {0: b, 2: p}, {0: b, 2: p}, {0: b, 2: s, 3: t}) + \
        ((None,) if sink else ())
    ep = torch.export.export(_Op(heads, kv_heads, 0.3, sink), args, dynamic_shapes=dyn)
    program = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=translations())
    path = str(tmp_path / "gqa.onnx")
    program.save(path)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _inputs(batch, seq, past, heads, kv_heads, head, pad, sink, window=None, seed=0):
    """Random q/k/v and cache, and transformers' additive mask: causal, `pad` left-padded positions in
    row 0 (fully masked query rows among them), an optional sliding window."""
    g = torch.Generator().manual_seed(seed)
    total = past + seq
    q = torch.randn(batch, seq, heads * head, generator=g)
    k, v = (torch.randn(batch, seq, kv_heads * head, generator=g) for _ in range(2))
    pk, pv = (torch.randn(batch, kv_heads, past, head, generator=g) for _ in range(2))
    rows = torch.arange(seq).view(-1, 1) + past
    cols = torch.arange(total).view(1, -1)
    allowed = (cols <= rows).expand(batch, seq, total).clone()
    if window is not None:
        allowed &= cols > rows - window
    allowed[0, :, :pad] = False
    bias = torch.zeros(batch, 1, seq, total).masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    out = (q, k, v, pk, pv, bias)
    return out + ((torch.randn(heads, generator=g),) if sink else ())


@pytest.mark.parametrize("sink", [False, True])
def test_reference_is_onnx_runtimes_kernel(tmp_path, sink):
    """The op's reference (what translation validation and the eager model compute) equals ORT's
    GroupQueryAttention as moec emits it: prompts with left padding (fully masked rows included), one-token
    steps after a cache, a sliding window, head sinks; the cache concatenated exactly."""
    heads, kv_heads, head = 4, 2, 8
    session = _export(tmp_path, heads, kv_heads, head, sink)
    names = [i.name for i in session.get_inputs()]
    for batch, seq, past, pad, window in [(1, 6, 0, 0, None), (2, 5, 0, 3, None), (3, 1, 9, 2, None),
                                          (3, 1, 9, 2, 4), (1, 4, 5, 0, 3)]:
        args = _inputs(batch, seq, past, heads, kv_heads, head, pad, sink, window, seed=batch * 10 + seq)
        want = group_query_attention_reference(*args[:5], None, None, args[5], args[6] if sink else None, heads,
                                               kv_heads, 0.3)
        got = session.run(None, dict(zip(names, (a.numpy() for a in args))))
        np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[1], want[1].numpy())
        np.testing.assert_array_equal(got[2], want[2].numpy())


def _hf_dir(tmp_path, family, **overrides):
    model = zoo.build_hf_model(family, **overrides)
    model.save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


def _gqa_nodes(path):
    """GroupQueryAttention nodes anywhere in the model (they sit in If branches)."""
    model = onnx.load(path, load_external_data=False)
    found = []

    def walk(graph):
        for node in graph.node:
            if node.op_type == "GroupQueryAttention":
                found.append(node)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(model.graph)
    return found


def _attention_record(report):
    return next(p for p in report["passes"] if p["name"] == "lower_attention")


@pytest.mark.slow
def test_decoder_attention_becomes_group_query_attention(hf_decoder):
    """Qwen3-MoE (GQA heads 4/2, q/k norms before rotary): every layer lowered, validated, one GQA node a
    layer with causal=0 (the mask travels as attention_bias), and the artifact verified against eager on a
    batch-2 prompt after a cached prefix (the If's plain branch) and a batch-3 one-token step (the fused op)."""
    result = hf_decoder("qwen3_moe")  # head size 16, shared with the graph passes' tests
    report = result.report
    record = _attention_record(report)
    assert record["modified"] and record["validation"]["rel_l2"] < 1e-6
    assert [l["lowered_to"] for l in record["details"]["layers"]] == [GQA] * 2
    nodes = _gqa_nodes(os.path.join(result.out_dir, "model.onnx"))
    assert len(nodes) == 2
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["causal"] == 0 and attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
        assert node.input[10]  # attention_bias
    assert report["numerics"]["passed"] and report["numerics"]["generation"]["passed"]


@pytest.mark.slow
def test_layers_it_cannot_express_keep_their_ops_and_say_why(tmp_path):
    """A head size ORT's kernel refuses (12) keeps the model's attention, named per layer; so does a compile
    with --no-pass lower_attention and --task logits (no cache)."""
    src = _hf_dir(tmp_path, "mixtral", head_dim=12)
    report = moec.compile(source=src, out=str(tmp_path / "a")).report
    record = _attention_record(report)
    assert not record["modified"]
    assert all("head size 12" in l["reason"] for l in record["details"]["layers"]), record
    assert not _gqa_nodes(str(tmp_path / "a" / "model.onnx")) and report["numerics"]["passed"]

    src16 = _hf_dir(tmp_path / "m16", "mixtral", head_dim=16)
    moec.compile(source=src16, out=str(tmp_path / "b"), disabled_passes=["lower_attention"])
    assert not _gqa_nodes(str(tmp_path / "b" / "model.onnx"))
    report = moec.compile(source=src16, out=str(tmp_path / "c"), extra={"task": "logits"}).report
    assert "not a KV-cache decoder" in _attention_record(report)["details"]["reason"]
    assert json.loads((tmp_path / "c" / "report.json").read_text())["numerics"]["passed"]


def test_a_layer_it_refuses_runs_the_models_own_attention_beside_lowered_ones(monkeypatch):
    """Mixed: layer 0 refused (as a layer of another head size would be), layer 1 lowered; the decoder's
    outputs (logits and every present tensor) equal the unlowered decoder's on a left-padded prompt after a
    cached prefix and on a one-token step."""
    from moec.generation import decoder_source
    from moec.passes.base import PassContext
    from moec.targets.onnxruntime import lower_attention

    model = zoo.build_hf_model("qwen3_moe", head_dim=16)
    src = decoder_source(model, "zoo:qwen3_moe")
    inputs = [src.example_args, src.step_inputs(5, 3, 1, 6, pad=2)]
    with torch.no_grad():
        want = [src.module(*x) for x in inputs]
    refuse = lower_attention.why_not
    monkeypatch.setattr(lower_attention, "why_not",
                        lambda module, *a: "refused here" if module.layer_idx == 0 else refuse(module, *a))
    result = lower_attention.LowerAttentionForGQA()(src.module, PassContext(probes=[src.example_args]))
    assert result.modified and [l.lowered_to for l in result.layers] == [lower_attention.KEPT, GQA]
    with torch.no_grad():
        got = [result.module(*x) for x in inputs]
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

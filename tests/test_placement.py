"""moec.placement: every expert placed once, every device within its memory, and no fewer devices would do."""

from hypothesis import given, settings
from hypothesis import strategies as st

from moec.placement import ExpertMatrix, MoELayerWeights, _split, place, weight_bytes


def _layers(counts, h=64, i=32):
    return [MoELayerWeights(f"l{j}", e, (ExpertMatrix(e, 2 * i, h), ExpertMatrix(e, h, i))) for j, e in enumerate(counts)]


def test_quantized_bytes_are_packed_codes_and_one_fp32_scale_per_row():
    m = ExpertMatrix(4, 10, 33)
    assert m.bytes_at("fp32") == 4 * 10 * 33 * 4 and m.bytes_at("bf16") == 4 * 10 * 33 * 2
    assert m.bytes_at("int8") == 4 * 10 * (33 + 4)
    assert m.bytes_at("int4") == 4 * 10 * (17 + 4)  # 33 codes of 4 bits round up to 17 bytes
    assert m.bytes_at("int2") == 4 * 10 * (9 + 4)
    w = {x.precision: x for x in weight_bytes(_layers([8]), other_params=1000)}
    assert w["fp32"].other == 4000 and w["int4"].other == 2000
    assert w["int4"].experts == _layers([8])[0].bytes_at("int4")


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.sampled_from([4, 8, 16, 60]), min_size=1, max_size=4),
       other=st.integers(0, 10**6), fixed=st.integers(0, 10**6), memory=st.integers(10**5, 10**7),
       precision=st.sampled_from(["fp32", "bf16", "int4", "int2"]))
def test_placement_is_complete_within_budget_and_minimal(counts, other, fixed, memory, precision):
    layers = _layers(counts)
    w = next(x for x in weight_bytes(layers, other) if x.precision == precision)
    p = place(w, layers, fixed, memory)
    most = max(counts)
    if p.devices is None:  # the replicated part alone, or the finest split, is too big for one device
        assert p.why
        assert w.other + fixed > memory or max(s.bytes for s in _split(layers, most, precision, w.other + fixed)) > memory
        return
    assert all(s.bytes <= memory for s in p.shares)
    assert [e for s in p.shares for e in range(s.first_expert, s.last_expert + 1)] == list(range(most))
    assert sum(s.bytes for s in p.shares) == w.experts + p.devices * (w.other + fixed)
    if p.devices > 1:  # one device fewer would not fit
        assert max(s.bytes for s in _split(layers, p.devices - 1, precision, w.other + fixed)) > memory

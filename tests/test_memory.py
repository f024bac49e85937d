"""Memory budgets from the command line and the Python API: parsing, unbounded dims, fit failures."""

import os
import re

import pytest

from moec.errors import DeviceMemoryError
from moec.memory import parse_size, profiles_for
from moec.analysis.plan_memory import MemoryPlanError
from moec.pipeline import CompileOptions, compile


@pytest.mark.parametrize("text,value", [("80GiB", 80 * 2**30), ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
                                        ("1048576", 1048576), ("64 kib", 64 * 1024)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "80 gigs", "", "-1GB", "1e9"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(MemoryPlanError, match="cannot parse memory size"):
        parse_size(text)


def test_unbounded_dims_need_a_max():
    with pytest.raises(MemoryPlanError, match="'seq' is unbounded"):
        profiles_for({"batch": (1, 8), "seq": (1, None)}, {"batch": 2, "seq": 16})
    p = profiles_for({"batch": (1, 8), "seq": (1, None)}, {"batch": 2, "seq": 16}, {"seq": 1024})
    assert p["max"] == {"batch": 8, "seq": 1024} and p["opt"] == {"batch": 2, "seq": 16}


@pytest.mark.slow
def test_device_memory_too_small_fails_before_writing(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(DeviceMemoryError) as err:
        compile(source=None, options=CompileOptions(out=str(out), extra={"device_memory": "40MB"}))
    msg = str(err.value)
    assert "does not fit in" in msg and "too much" in msg and "max seq =" in msg and "Nothing was written" in msg
    # every dim advice changes the dim: never "max batch = 64 (instead of 64)"
    assert not re.search(r"= (\d+) \(instead of \1\)", msg), msg
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".moec-tmp")]


@pytest.mark.slow
def test_device_memory_sizes_the_triton_deployment(tmp_path):
    from moec.triton_repo import validate_config

    res = compile(source=None, options=CompileOptions(
        out=str(tmp_path / "a"), triton_repo=str(tmp_path / "repo"), model_name="demo",
        extra={"device_memory": "400MiB", "max_shape": {"seq": 256}}))
    derived = res.report["memory"]["derived"]
    assert res.report["memory"]["device_memory"]["fits"]
    cfg = validate_config(open(os.path.join(res.triton_model_dir, "config.pbtxt")).read())
    assert cfg.instance_group[0].count == derived["triton_instances"] >= 1
    assert cfg.max_batch_size == derived["triton_max_batch_size"] >= 1


@pytest.mark.parametrize("value_bytes,int4_share", [(4, 0.14), (2, 0.28)])
def test_quant_advice_counts_the_experts_at_the_artifacts_own_width(value_bytes, int4_share):
    """--device-memory's --quant advice: the experts' bytes shrink by int4's share of fp32 (codes and scales) from
    fp32, by twice that share from an fp16 / bf16 artifact's 2-byte values; what the advice says fits does."""
    from moec.analysis.plan_memory import MemoryPlan, ProfilePlan
    from moec.memory import fit_check

    experts, other = 800_000, 100_000
    plan = MemoryPlan(["batch"], [], {"float": experts + other}, 0)
    plan.profiles["max"] = ProfilePlan({"batch": 8}, 50_000, 50_000, 0, experts + other, {}, {})
    needed = experts * int4_share + other + 50_000
    fit = fit_check(plan, int(needed) + 1000, "max", experts, value_bytes)
    assert not fit.fits and any(t.startswith("--quant int4 ") for t in fit.suggestions), fit.suggestions
    assert not any(t.startswith("--quant int2 ") for t in fit.suggestions)  # the first that fits, no more
    # just short of it: int4 does not fit, so int2 is the advice
    fit = fit_check(plan, int(needed) - 1000, "max", experts, value_bytes)
    assert any(t.startswith("--quant int2 ") for t in fit.suggestions) and not any(
        t.startswith("--quant int4 ") for t in fit.suggestions)

"""The decode kernels as the compiler makes them for Hopper and Blackwell, checked without a GPU.

The interpreter tests check what the kernels compute; these check the code a GPU would run: it
compiles for sm_90 and sm_100, spills no registers, and streams bf16 weights in 16-byte loads that
cover each loop trip's whole weight tile. A layout or masking change that breaks vectorization, or
a tile that overflows the register file, passes the interpreter and fails here.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compiling(*argv) -> subprocess.CompletedProcess:
    """Run Python `argv` with Triton's compiler (this suite's TRITON_INTERPRET=1 removed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)


def _inspect(*args) -> list[dict]:
    out = _compiling(os.path.join(ROOT, "tools", "inspect_kernels.py"), "--json", "-", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def bf16_facts():
    return _inspect("--weights", "float", "--sm", "90", "100")


def test_every_decode_config_compiles_for_hopper_and_blackwell_without_spills(bf16_facts):
    from moec.plugins.moe_experts_triton import DECODE_CONFIGS

    assert {(r["sm"], r["config"], r["kernel"]) for r in bf16_facts} == {
        (sm, i, k) for sm in (90, 100) for i in range(len(DECODE_CONFIGS)) for k in ("_gate_up_rows", "_down_rows")}
    spilled = [(r["sm"], r["config"], r["kernel"], r["spilled_bytes"]) for r in bf16_facts if r["spilled_bytes"]]
    assert not spilled


def test_a_tile_too_big_for_the_registers_is_reported_as_spilling():
    """The spill figure is real: a [8, 256, 64] fp32 down tile cannot live in 255 registers."""
    code = ("from moec.plugins.inspect_kernels import inspect_decode\n"
            "from moec.plugins.moe_experts_triton import DecodeConfig\n"
            "facts = inspect_decode('float', 1, DecodeConfig(16, 256, 64, 256), 90)\n"
            "print(facts[1].kernel, facts[1].spilled_bytes)\n")
    out = _compiling("-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    kernel, spilled = out.stdout.split()[-2:]
    assert kernel == "_down_rows" and int(spilled) > 0


def test_bf16_weights_stream_in_16_byte_loads(bf16_facts):
    """Each loop trip's weight tile (gate + up rows, or all k slots' down rows) is covered by 16-byte
    loads (a static count: for these tiles the activations' loads are narrower, so the 16-byte ones
    are the weights')."""
    short = [(r["sm"], r["config"], r["kernel"], r["loads_by_bytes"], r["weight_bytes_per_iteration"])
             for r in bf16_facts if r["vector_load_bytes"] < r["weight_bytes_per_iteration"]]
    assert not short
    default = [r for r in bf16_facts if r["config"] == 0]
    assert all(r["vector_load_bytes"] == r["weight_bytes_per_iteration"] for r in default)


def test_default_decode_config_leaves_room_for_several_programs_per_sm(bf16_facts):
    """<= 128 registers per thread: 4+ programs of 128 threads fit an SM, so weight loads overlap."""
    default = [r for r in bf16_facts if r["config"] == 0]
    assert default and all(r["registers"] <= 128 for r in default), [(r["kernel"], r["registers"]) for r in default]


def test_quantized_decode_kernels_compile_without_spills_int8_in_16_byte_loads():
    facts = _inspect("--weights", "int8", "int4", "--sm", "90", "--configs", "0")
    assert len(facts) == 4 and not [r for r in facts if r["spilled_bytes"]]
    int8 = [r for r in facts if r["weights"] == "int8"]
    assert all(r["vector_load_bytes"] >= r["weight_bytes_per_iteration"] for r in int8)

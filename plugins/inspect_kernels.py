"""Cross-compile the decode kernels for an NVIDIA GPU on any machine, and report what the compiler made.

Matches: the launches `plan_decode` makes for a layer, planned on meta tensors (no memory, no GPU).
Produces: one `KernelFacts` per launch: registers per thread, spilled bytes (stack + local memory),
  shared memory, the global loads in the PTX by bytes per load, and the weight bytes one loop
  iteration of one program requests.
Refuses: running under TRITON_INTERPRET=1 (no compiler runs then).

Why: the interpreter checks what the kernels compute, not the code the compiler makes. A kernel
whose weight loads stop being 16-byte vectors, or that spills registers, is still right under the
interpreter and slow on a GPU. Arguments are specialized as Triton's JIT does (its own
`native_specialize_impl`: 16-byte-aligned pointers and multiples of 16 marked divisible, 1 made a
constant), so the code is what a launch of these shapes compiles to. The toolchain (ptxas,
cuobjdump) ships inside the triton wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from moec.plugins.moe_experts_decode import Launch

_ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class KernelFacts:
    kernel: str
    sm: int
    grid: tuple[int, ...]
    threads: int
    registers: int
    spilled_bytes: int  # stack + local memory: ptxas puts spilled registers there (0 for these kernels)
    shared_bytes: int
    loads_by_bytes: dict  # bytes per global load instruction -> how many in the PTX
    weight_bytes_per_iteration: int  # one program, one trip of its K loop

    @property
    def vector_load_bytes_per_iteration(self) -> int:
        """What the 16-byte loads fetch for one program, if each runs once per loop trip."""
        return self.loads_by_bytes.get(16, 0) * 16 * self.threads


def _load_bytes(instruction: str) -> int:
    vec = re.search(r"\.v(\d)", instruction)
    bits = re.search(r"\.[bsuf](\d+)$", instruction)
    return (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 0)


def _weight_bytes(launch: Launch, values: dict) -> int:
    """Weight bytes one trip of the K loop reads: gate (+ up) tiles, or the k real slots' down tiles."""
    c = launch.constexprs
    per_column = ({4: c["BLOCK_K"] // 2, 8: c["BLOCK_K"]}.get(c["BITS"])
                  or c["BLOCK_K"] * _ELEMENT_BYTES[values["w_ptr"].dtype])
    tiles = (2 if c["GATED"] else 1) if "GATED" in c else values["TOPK"]
    return tiles * c["BLOCK_N"] * per_column


def cross_compile(launch: Launch, sm: int = 90) -> KernelFacts:
    """Compile `launch` for an SM `sm` GPU (90: Hopper, 100: Blackwell) and read back its resources."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("cross_compile needs Triton's compiler; unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import native_specialize_impl

    fn = launch.kernel
    runtime_names = [n for n in fn.arg_names if n not in launch.constexprs]
    values = dict(zip(runtime_names, launch.args))
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        kind, spec = native_specialize_impl(BaseBackend, values[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                        attrs=attrs),
                              target=GPUTarget("cuda", sm, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    loads: dict[int, int] = {}
    for instruction in re.findall(r"ld\.global\S*", compiled.asm["ptx"]):
        n = _load_bytes(instruction.rstrip(";"))
        loads[n] = loads.get(n, 0) + 1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return KernelFacts(fn.__name__, sm, tuple(launch.grid), launch.num_warps * 32, res["REG"],
                       res["STACK"] + res["LOCAL"], max(res["SHARED"], compiled.metadata.shared),
                       dict(sorted(loads.items())), _weight_bytes(launch, values))


def meta_layer(weights: str, tokens: int, experts: int = 128, k: int = 8, hidden: int = 2048, inter: int = 768,
               group: int = 128, dtype: torch.dtype = torch.bfloat16):
    """(hidden, topk_ids, topk_weights, w_gate_up, w_down) on the meta device, Qwen3-30B-A3B's layer by
    default; weights: "float" (in `dtype`), "int8" or "int4" (symmetric, `group` columns per scale)."""
    from moec.plugins.moe_experts_triton import PackedExpertWeight

    def weight(rows: int, cols: int):
        if weights == "float":
            return torch.empty(experts, rows, cols, dtype=dtype, device="meta")
        bits = int(weights.removeprefix("int"))
        codes = torch.empty(experts, rows, cols * bits // 8, dtype=torch.uint8, device="meta")
        scales = torch.empty(experts, rows, cols // group, dtype=torch.float32, device="meta")
        return PackedExpertWeight(codes, scales, None, bits, cols)

    return (torch.empty(tokens, hidden, dtype=dtype, device="meta"),
            torch.empty(tokens, k, dtype=torch.int32, device="meta"),  # TensorRT's TopK index type
            torch.empty(tokens, k, dtype=dtype, device="meta"), weight(2 * inter, hidden), weight(hidden, inter))


def inspect_decode(weights: str, tokens: int, config, sm: int = 90, **layer) -> list[KernelFacts]:
    """Both decode launches for `tokens` tokens of the layer, compiled for SM `sm`."""
    from moec.plugins.moe_experts_decode import plan_decode

    _, launches = plan_decode(*meta_layer(weights, tokens, **layer), config=config)
    return [cross_compile(launch, sm) for launch in launches]

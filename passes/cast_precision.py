"""cast_precision: the lowered model's floating-point weights and arithmetic in fp16 or bf16 (`--dtype`).

Matches: the whole model, once every structural pass has run and been validated in fp32 (fusion, lowering);
it is the last pass, so the graph torch.export captures is the fp16 one.
Produces: every floating-point parameter and buffer cast to fp16 or bf16 (round to nearest even, as torch's
`.half()` / `.bfloat16()`), and the model wrapped so that its inputs and outputs keep their own dtypes: floating
inputs are cast to fp16 / bf16 on
the way in and floating outputs back to their original dtype on the way out (exact), so the artifact is a drop-in
for the fp32 one — same feeds, same goldens' inputs, same Triton configuration — while its weights are half the
bytes and ONNX Runtime computes in that precision (its CPU provider has fp16 MatMul and MoE kernels; bf16 runs on
GPU providers only, so a bf16 artifact is verified here through moec.widen_bf16). It changes numerics: the eager
fp16 / bf16 model is the artifact's exact reference, and the report gives the error against fp32.
Refuses nothing itself; the compile refuses what fp16 and bf16 are not built for (moec.pipeline.check_dtype).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from moec.passes.base import Pass, PassContext, PassResult

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class KeepFloatIO(nn.Module):
    """`model` in another float dtype behind the original inputs' and outputs' dtypes."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, *args):
        inner = [a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        dtypes = {a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()}
        out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return _cast_out(self.model(*inner), self.dtype, out_dtype)


@contextmanager
def in_fp32(module: nn.Module) -> Iterator[nn.Module]:
    """The cast model (a KeepFloatIO) computing in fp32 on its own fp16 / bf16 weights, for the duration: those
    widen to fp32 exactly and narrow back exactly, so the module is unchanged after."""
    assert isinstance(module, KeepFloatIO), type(module)
    narrow = module.dtype
    module.model.float()
    module.dtype = torch.float32
    try:
        yield module
    finally:
        module.model.to(narrow)
        module.dtype = narrow


def _cast_out(out: Any, inner: torch.dtype, outer: torch.dtype) -> Any:
    if torch.is_tensor(out):
        return out.to(outer) if out.dtype == inner else out
    if isinstance(out, (tuple, list)):
        return type(out)(_cast_out(o, inner, outer) for o in out)
    if isinstance(out, dict):
        return {k: _cast_out(v, inner, outer) for k, v in out.items()}
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        return _cast_out(out.to_tuple(), inner, outer)
    return out


class CastPrecision(Pass):
    name = "cast_precision"
    changes_numerics = True

    def __init__(self, dtype: str = "fp16"):
        self.dtype = DTYPES[dtype]
        self.label = dtype

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        values, before = _floats(module)
        module.to(self.dtype)
        wrapped = KeepFloatIO(module, self.dtype)
        _, after = _floats(wrapped)
        ctx.log(f"  {values / 1e6:.2f}M floating-point values cast to {self.label}: {before / 2**20:.1f} MiB -> "
                f"{after / 2**20:.1f} MiB")
        return PassResult(wrapped, True, {"dtype": self.label, "values": values, "bytes_before": before,
                                          "bytes_after": after})


def _floats(module: nn.Module) -> tuple[int, int]:
    """(how many floating-point values, their bytes) in the module's parameters and buffers."""
    floats = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return sum(t.numel() for t in floats), sum(t.numel() * t.element_size() for t in floats)

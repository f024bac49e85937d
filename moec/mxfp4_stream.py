"""GPT-OSS's MXFP4 experts in an out-of-core compile: the checkpoint's own codes, read one expert at a time.

Matches: a safetensors checkpoint whose config.json says `quant_method: mxfp4`, its experts stored as
moec.mxfp4_checkpoint describes (`<experts>.<proj>_blocks` uint8 [E, N, K/32, 16], `<experts>.<proj>_scales`
uint8 [E, N, K/32]).
Produces:
  - `Mxfp4Stream(ck)` finds every `_blocks` / `_scales` pair from the headers; `check_model` checks them against
    the model of config.json; `scan()` reads them one expert at a time, checked as the in-memory fold checks them (dtypes, shapes, NaN exponents, overflowing scales),
    deciding the codes' spec the in-memory fold would: int8 per row when every row of every expert spans few
    enough exponents, else int8 blocks of 32. The LazyCheckpoint then lists each pair as one decoded tensor
    `<experts>.<proj>` [E, K, N] (the model's layout, transformers' dequantization transposes) whose value,
    whole or one expert's slice, is the exact dequantization: the rest of the out-of-core compile reads it as
    it reads a float checkpoint's stacked experts.
  - `CheckpointCodes`: moec.quantize_streamed's coder for such layers. Expert e's codes and scales are the
    checkpoint's, carried through the same reading the fused layer applies to the weights (GPT-OSS's interleaved
    gate/up de-interleaved, transposed), and checked to dequantize to exactly the weights the layer was fused
    and validated with.
Peak memory: the layer's packed int8 codes, and of one expert its two projections unpacked (int32 [N, K]) and
its fp32 weights as the reader holds them.
Refuses (QuantError, naming the file and the tensor): a `_blocks` without its `_scales` (or the reverse), what
mxfp4_checkpoint.decode refuses, a projection the model of config.json lacks or wants in another shape, a model
with some experts stored unquantized, a projection in an unfused layer, fp16 scales beyond fp16's exact range,
and codes the fused layer's reading can't carry exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moec.lazy_checkpoint import Encoded, LazyCheckpoint
from moec.errors import SourceError
from moec.mxfp4_checkpoint import BLOCK, FORMAT, PARTS, Mxfp4Tensor, check_against_model, decode, folded_spec
from moec.quant import QuantError, QuantizedWeight
from moec.quantize_streamed import Coder

SUFFIXES = ("_blocks", "_scales")
FP16_EXPONENTS = (104, 143)  # 2^(e - 128) from 2^-24 (fp16's smallest subnormal) to 2^15


@dataclass
class Projection:
    """One MXFP4 projection of the checkpoint: where its two parts are and its [E, N, K] weights' shape."""

    name: str  # the model parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    blocks_file: str
    scales_file: str
    shape: tuple[int, int, int]  # experts, rows (N), columns (K)


class Mxfp4Stream:
    fp16_checked = True  # scan() checks --dtype fp16's scale range
    against = "the checkpoint's weights (its MXFP4 experts dequantized exactly)"

    def __init__(self, ck: LazyCheckpoint):
        """The checkpoint's MXFP4 projections, from its headers (nothing read yet: `scan` reads them)."""
        self.ck, self.projections = ck, _pairs(ck)
        if not self.projections:
            raise QuantError(f"'{ck.path}': config.json says mxfp4, but the checkpoint has no '*_blocks' / "
                             "'*_scales' expert tensors.")
        self.per_row, self.spec, self.note, self.format = True, None, "", FORMAT
        # per projection, the expert read last: a layer reads an expert's weights, then its codes
        self._last: dict[str, tuple[int, Mxfp4Tensor]] = {}

    def scan(self, log: Callable[[str], None] = lambda msg: None, fp16_scales: bool = False) -> None:
        """Read every expert once: checked, the codes' spec chosen; then the index lists the decoded tensors.
        `fp16_scales`: the artifact keeps its scales in fp16, exact for exponents 104-143 only (refused beyond)."""
        per_row, done, total = True, 0, sum(p.shape[0] for p in self.projections.values())
        low, high = 255, 0
        for p in self.projections.values():
            for e in range(p.shape[0]):
                t = _read(p, e)
                per_row &= t.row_span_fits()  # read and checked whatever the answer so far
                low, high = min(low, int(t.exponents.min())), max(high, int(t.exponents.max()))
                done += 1
                if total >= 64 and done % (total // 8) == 0:
                    log(f"  MXFP4 experts checked: {done}/{total}")
        if fp16_scales and not FP16_EXPONENTS[0] <= low <= high <= FP16_EXPONENTS[1]:
            raise QuantError(f"'{self.ck.path}': --dtype fp16 keeps QMoE's scales in fp16, which holds 2^(e - 128) "
                             f"exactly for E8M0 exponents {FP16_EXPONENTS[0]}-{FP16_EXPONENTS[1]}; this checkpoint's "
                             f"span {low}-{high}. Compile it in fp32. Nothing was written.")
        self.per_row = per_row
        self.spec, self.note = folded_spec(per_row, len(self.projections))
        self._decode_in(self.ck)

    def check_model(self, model: torch.nn.Module) -> None:
        """As the in-memory fold checks them (mxfp4_checkpoint.check_against_model), from the headers."""
        check_against_model(self.ck.path, model, {p.name: (p.blocks_file, p.shape) for p in self.projections.values()})

    @property
    def notes(self) -> list[str]:
        return [self.note]

    def coder(self) -> "CheckpointCodes":
        return CheckpointCodes(self)

    def expert_names(self) -> list[str]:
        """The MXFP4 projections, as the index lists them."""
        return list(self.projections)

    def codes(self, name: str, e: int) -> QuantizedWeight:
        """Expert e's codes of projection `name`, [1, N, K], as the in-memory fold makes them."""
        return self._expert(self.projections[name], e).codes(self.per_row)

    def _decode_in(self, ck: LazyCheckpoint) -> None:
        """The pairs become one decoded tensor each in the checkpoint's index (LazyCheckpoint.decode_as)."""
        ck.decode_as([Encoded(p.name, [p.name + s for s in SUFFIXES], p.blocks_file,
                              (p.shape[0], p.shape[2], p.shape[1]), lambda expert, p=p: self._value(p, expert))
                      for p in self.projections.values()])

    def _value(self, p: Projection, expert: Optional[int]) -> torch.Tensor:
        if expert is not None:
            return self._expert(p, expert).dequantized().transpose(1, 2)
        return torch.cat([self._expert(p, e).dequantized().transpose(1, 2) for e in range(p.shape[0])])

    def forget(self) -> None:
        """The experts read last are not kept."""
        self._last.clear()

    def _expert(self, p: Projection, e: int) -> Mxfp4Tensor:
        last = self._last.get(p.name)
        if last is None or last[0] != e:
            self._last = {n: v for n, v in self._last.items() if _key(n) == _key(p.name) and n != p.name}
            self._last[p.name] = (e, _read(p, e))  # another layer's experts are not kept
        return self._last[p.name][1]


def mxfp4_parameters(ck: LazyCheckpoint) -> int:
    """The checkpoint's parameter count with each MXFP4 projection counted as the weights it stores (from the
    headers: two FP4 values a byte of `_blocks`, its `_scales` not counted)."""
    numel = ck.numel
    for name, shape in ck.shapes.items():
        if name.endswith("_blocks"):
            numel += math.prod(shape)  # stored as half as many bytes as values
        elif name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in ck.shapes:
            numel -= math.prod(shape)
    return numel


class CheckpointCodes(Coder):
    """moec.quantize_streamed's coder: the checkpoint's MXFP4 codes, in the fused layer's layout (the base of
    moec.packed_stream.PackedCodes too: `stream` is what found the checkpoint's quantized experts)."""

    method = "the checkpoint's codes"  # as the in-memory fold says it
    # codes() checks each expert's codes dequantize to exactly its weights, and dequantized() is those weights:
    # the layer's error against fp32 is 0 by construction, not measured (a coder whose dequantized() differs
    # from the fp32 weights must say False)
    exact = True
    reference = "the checkpoint's weights (every expert's codes checked to dequantize to them exactly), layer by layer"

    def __init__(self, stream: Mxfp4Stream):
        self.stream = stream

    def codes(self, reader, path: str, e: int, stacked: dict[str, torch.Tensor], w) -> tuple:
        """(gate/up codes, down codes) of expert e of the layer at `path`: `stacked` is the expert's tensors as
        the layer holds them (reading name -> [1, ...]), `w` the fused layer's fp32 weights for it."""
        from moec.quantize_streamed import checked_codes

        layer = reader.layers[path]
        as_codes, as_scales = dict(stacked), dict(stacked)
        for key, dotted in layer.stacked.items():
            name = f"{path}.{dotted}"
            if name not in self.stream.projections:
                continue
            q = self.stream.codes(name, e)  # [1, N, K]; the layer holds [1, K, N]
            k, g = q.codes.shape[-1], q.scales.shape[-1]
            as_codes[key] = q.codes.float().transpose(1, 2)
            as_scales[key] = q.scales.repeat_interleave(k // g, -1).transpose(1, 2)
        return checked_codes(path, e, self.stream.spec, w, reader.read_as_fused(path, as_codes, e),
                             reader.read_as_fused(path, as_scales, e), None, "MXFP4 codes")

    def check_folded(self, fused_paths: list[str]) -> None:
        """Every MXFP4 projection is in a fused layer (an unfused one would be written as its fp32 stack)."""
        for name in self.stream.expert_names():
            if not any(name.startswith(path + ".") for path in fused_paths):
                raise QuantError(f"'{name}': its MoE layer is not fused, so its {self.stream.format} codes can't be "
                                 "folded into QMoE; see the fusion report of an in-memory compile (--out-of-core off). "
                                 "Nothing was written.")

    def done(self) -> None:
        """A layer (or the verification) finished: the experts read last are not kept."""
        self.stream.forget()

    def dequantized(self, path: str, e: int, w):
        """The artifact's exact reference: the checkpoint's weights themselves (codes() checked each expert's
        codes give them back exactly)."""
        return w


def _pairs(ck: LazyCheckpoint) -> dict[str, Projection]:
    found: dict[str, Projection] = {}
    for name in sorted(ck.shapes):
        if name.rpartition(".")[2] not in PARTS:  # what the in-memory fold reads, no other `*_scales`
            continue
        base = next(name[: -len(s)] for s in SUFFIXES if name.endswith(s))
        if base in found:
            continue
        blocks, scales = base + "_blocks", base + "_scales"
        if blocks not in ck.shapes or scales not in ck.shapes:
            have, lack = ("_blocks", "_scales") if scales not in ck.shapes else ("_scales", "_blocks")
            raise QuantError(f"{ck.files[base + have]}: '{base}{have}' has no '{base}{lack}' in the checkpoint; an "
                             "MXFP4 tensor needs both.")
        b, s = ck.shapes[blocks], ck.shapes[scales]
        if len(b) != 4 or b[-1] != BLOCK // 2 or tuple(b[:-1]) != tuple(s):
            raise QuantError(f"{ck.files[blocks]}: '{blocks}' has shape {tuple(b)} and '{scales}' {tuple(s)}; MXFP4 "
                             "needs [E, N, G, 16] blocks and [E, N, G] scales.")
        found[base] = Projection(base, ck.files[blocks], ck.files[scales], (b[0], b[1], b[2] * BLOCK))
    return found


def _read(p: Projection, e: int) -> Mxfp4Tensor:
    """Expert e of projection p, unpacked and checked (mxfp4_checkpoint.decode on its [e:e + 1] slices)."""
    from safetensors import safe_open

    try:
        with safe_open(p.blocks_file, "pt") as fb, safe_open(p.scales_file, "pt") as fs:
            blocks = fb.get_slice(p.name + "_blocks")[e:e + 1]
            scales = fs.get_slice(p.name + "_scales")[e:e + 1]
    except Exception as exc:
        raise SourceError(f"'{p.blocks_file}': cannot read expert {e} of '{p.name}_blocks' / '_scales' "
                          f"({type(exc).__name__}: {exc}). Nothing was written.") from exc
    return decode(p.name, p.blocks_file, p.scales_file, blocks, scales)


def _key(name: str) -> str:
    from moec.external_data import layer_key

    return layer_key(name)

"""Per-Linear pre-quantized checkpoints (compressed-tensors pack-quantized, GPTQ, AWQ) in an out-of-core compile:
the checkpoint's own codes, read one Linear at a time.

Matches: a safetensors checkpoint whose config.json's quantization_config names a per-Linear format moec folds
(moec.fold_checkpoint.READERS), every quantized Linear stored as `<prefix>.<part>` (qweight / qzeros / scales,
weight_packed / weight_scale / weight_shape ...).
Produces:
  - `PackedStream(ck, fmt)` finds every quantized Linear from the headers and takes its [N, K] and scheme from the
    format's `layout` (headers, and compressed-tensors' two-value weight_shape tensors): the experts' one scheme
    (the artifact's QMoE spec) is known before anything is captured. Where the config allows act-order, every
    g_idx (small) is read and checked up front (`check_act_order`), so a permuted one is refused before any
    layer is written.
    `decode_in` then lists each Linear in the LazyCheckpoint index as one decoded tensor `<prefix>.weight`
    [N, K] whose value is the format's exact dequantization, read when asked for: the rest of the out-of-core
    compile reads it as it reads a float checkpoint's weight (experts one at a time, attention with its layer).
  - `PackedCodes`: moec.quantize_streamed's coder. Expert e's codes, scales and zero points (per element) are
    carried through the same one-expert checkpoint conversion as its weights (moec.stream_experts.ExpertReader
    .convert: gate/up concatenated, renamed, transposed as the family's loading does) and the fused layer's
    reading, and checked to dequantize to exactly the weights the layer was fused and validated with.
Other quantized Linears (attention) are written as their dequantized fp32 weights, with the in-memory fold's note;
with --quant-dense their own codes go into MatMulNBits (`dense_codes`, for moec.quantize_dense_streamed).
Peak memory: one expert's (or one layer's attention) Linears unpacked (int32 codes, fp32 weights), and while
its codes are laid out, one fp32 [N, K] map (codes, scales or zero points) per Linear at a time through the
conversion: a few times one expert's fp32 weights, never a layer's.
Refuses (QuantError, naming the file and the tensor): a Linear whose parts are incomplete or mis-shaped, experts
with different schemes, act-order, an expert weight stored unquantized beside quantized ones, an expert in an
unfused layer, and everything the format's own reading refuses (when that Linear is read: the compile stops and
writes nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moec.errors import SourceError
from moec.external_data import layer_key
from moec.fold_checkpoint import LinearFormat, PackedLinear, dense_note, groups_in_order
from moec.lazy_checkpoint import Encoded, LazyCheckpoint
from moec.mxfp4_stream import CheckpointCodes
from moec.quant import QuantError, QuantizedWeight, QuantSpec
from moec.safetensors_check import TensorFiles
from moec.stream_experts import expert_index


@dataclass
class QuantizedLinear:
    """One quantized Linear of the checkpoint, from its headers: where its parts are, its shape and scheme."""

    prefix: str  # the module, e.g. model.layers.0.mlp.experts.3.gate_proj
    files: dict[str, str]  # part -> the file holding it
    shape: tuple[int, int]  # [N, K], as the model's weight
    spec: QuantSpec

    @property
    def expert(self) -> Optional[int]:
        return expert_index(self.prefix + ".weight")


class PackedStream:
    fp16_checked = False  # --dtype fp16 with pre-quantized experts: refused, as in memory

    def __init__(self, ck: LazyCheckpoint, fmt: LinearFormat):
        """The checkpoint's quantized Linears, from its headers (their codes are read when a layer asks)."""
        self.ck, self.fmt, self.format = ck, fmt, fmt.name
        self.linears = _find(ck, fmt)
        if not self.linears:
            raise QuantError(f"'{ck.path}': config.json says {fmt.name}, but no tensor of the checkpoint is quantized "
                             "that way.")
        experts = [l for l in self.linears.values() if l.expert is not None]
        schemes: dict[QuantSpec, QuantizedLinear] = {}
        for l in experts:
            schemes.setdefault(l.spec, l)  # each scheme's first Linear
        if len(schemes) > 1:
            a, b = list(schemes.values())[:2]
            raise QuantError(f"'{b.files[fmt.parts[0]]}': experts are quantized with different schemes ('{a.prefix}' "
                             f"{a.spec.name}, '{b.prefix}' {b.spec.name}); one expert precision per model is "
                             "supported.")
        self.spec = experts[0].spec if experts else None
        dense = [l.prefix for l in self.linears.values() if l.expert is None]
        self.notes = ([f"{fmt.name} expert weights ({self.spec.name}) folded without re-quantizing"] if experts else [])
        self.notes += [dense_note(dense)] if dense else []
        self.against = f"the checkpoint's weights (its {fmt.name} Linears dequantized exactly)"
        self._files = TensorFiles()
        self._last: dict[str, PackedLinear] = {}  # one expert's (or one group's dense) Linears, read last
        self._stored = sum(math.prod(ck.shapes[f"{l.prefix}.{part}"]) for l in self.linears.values() for part in l.files)
        self._decoded = False

    def parameters(self) -> int:
        """The checkpoint's parameter count with each quantized Linear counted as the weights it stands for."""
        if self._decoded:
            return self.ck.numel
        return self.ck.numel - self._stored + sum(l.shape[0] * l.shape[1] for l in self.linears.values())

    def decode_in(self) -> None:
        """Each Linear's parts become one decoded `<prefix>.weight` in the checkpoint's index
        (LazyCheckpoint.decode_as)."""
        self._decoded = True
        self.ck.decode_as([Encoded(l.prefix + ".weight", [f"{l.prefix}.{part}" for part in l.files],
                                   l.files[self.fmt.parts[0]], l.shape, lambda expert, l=l: self._value(l, expert))
                           for l in self.linears.values()])

    def expert_names(self) -> list[str]:
        """The quantized expert weights, as the index lists them."""
        return [l.prefix + ".weight" for l in self.linears.values() if l.expert is not None]

    def linear(self, prefix: str) -> PackedLinear:
        """The Linear at `prefix`, read and checked by the format; kept while its expert (or layer) is at work."""
        if prefix in self._last:
            return self._last[prefix]
        l = self.linears[prefix]
        owner = (layer_key(prefix + "."), l.expert)
        self._last = {p: v for p, v in self._last.items() if (layer_key(p + "."), self.linears[p].expert) == owner}
        parts = _read_parts(self._files, l)
        got = self.fmt.read(prefix, parts, l.files[self.fmt.parts[0]])
        if got.spec != l.spec or tuple(got.codes.shape) != l.shape:
            raise QuantError(f"'{l.files[self.fmt.parts[0]]}': '{prefix}' reads as {got.spec.name} "
                             f"{tuple(got.codes.shape)}, its headers and the config say {l.spec.name} {l.shape}; the "
                             "quantization config and the tensors disagree. Nothing was written.")
        self._last[prefix] = got
        return got

    def dense_codes(self, prefix: str) -> Optional[QuantizedWeight]:
        """A quantized Linear outside the experts (attention): its own codes ([1, N, K]) for --quant-dense's
        MatMulNBits, or None when the checkpoint has none at `prefix` (the model's name for it)."""
        l = self.linears.get(prefix)
        if l is None or l.expert is not None:
            return None
        p = self.linear(prefix)
        return QuantizedWeight(p.codes[None], p.scales[None], None if p.zero_points is None else p.zero_points[None],
                               p.spec)

    def forget(self) -> None:
        """The Linears read last are not kept."""
        self._last.clear()

    def coder(self) -> "PackedCodes":
        return PackedCodes(self)

    def _value(self, l: QuantizedLinear, expert: Optional[int]) -> torch.Tensor:
        if expert is not None:
            raise SourceError(f"'{l.files[self.fmt.parts[0]]}': '{l.prefix}' is one Linear, read as a stack of "
                              f"experts (expert {expert}); compile with --out-of-core off.")
        return self.linear(l.prefix).dequantized()

    def check_act_order(self) -> None:
        """Where the config allows act-order, every g_idx (small), checked before anything is written: a permuted
        one is read whole so that the format's own reading names it."""
        part = self.fmt.act_order
        for l in self.linears.values():
            if not part or part not in l.files:
                continue
            g_idx = _read_parts(self._files, l, (part,))[part]
            if not groups_in_order(g_idx, l.shape[1], l.spec.block_size):
                self.linear(l.prefix)  # raises the format's own error
                raise QuantError(f"'{l.files[part]}': tensor '{l.prefix}.{part}' assigns input columns to groups "
                                 "out of order (act-order); QMoE's blocks are contiguous columns.")


class PackedCodes(CheckpointCodes):
    """moec.quantize_streamed's coder: the checkpoint's per-Linear codes, in the fused layer's layout."""

    def codes(self, reader, path: str, e: int, stacked: dict[str, torch.Tensor], w) -> tuple:
        """(gate/up codes, down codes) of expert e of the layer at `path` (`stacked`: the expert's weights as the
        layer holds them; `w`: the fused layer's fp32 weights for it)."""
        from moec.quantize_streamed import checked_codes

        stream, spec = self.stream, self.stream.spec
        fields = ("codes", "scales") + (() if spec.symmetric else ("zero_points",))
        fused = {f: reader.read_as_fused(path, reader.convert(path, e, self._values(path, e, f), stacked), e)
                 for f in fields}
        return checked_codes(path, e, spec, w, fused["codes"], fused["scales"], fused.get("zero_points"),
                             f"{stream.format} codes")

    def _values(self, path: str, e: int, field: str) -> Callable[[str], Optional[torch.Tensor]]:
        """Checkpoint name -> expert e's `field` laid out like its weight, element by element; None for what is
        not a weight (biases, read as stored)."""
        stream = self.stream

        def value(name: str) -> Optional[torch.Tensor]:
            if not name.endswith(".weight"):
                return None
            prefix = name[: -len(".weight")]
            if prefix not in stream.linears:
                raise QuantError(f"'{stream.ck.files.get(name, stream.ck.path)}': '{name}' of {path}'s expert {e} is "
                                 "stored unquantized beside quantized experts; QMoE takes one precision per layer. "
                                 "Nothing was written.")
            return stream.linear(prefix).per_element(field)  # every expert has the spec asked for (checked)

        return value

    def check_folded(self, fused_paths: list[str]) -> None:
        """Every quantized expert is in a decoder layer with a fused MoE layer (an unfused one would be written as
        its dequantized fp32 weights). By layer: the checkpoint names experts as stored (Mixtral's
        block_sparse_moe.experts.N.w1), not as the model does."""
        fused = {layer_key(path + ".") for path in fused_paths}
        for name in self.stream.expert_names():
            if layer_key(name) not in fused:
                raise QuantError(f"'{name}': its MoE layer is not fused, so its {self.stream.format} codes can't be "
                                 "folded into QMoE; see the fusion report of an in-memory compile (--out-of-core off). "
                                 "Nothing was written.")


def _find(ck: LazyCheckpoint, fmt: LinearFormat) -> dict[str, QuantizedLinear]:
    """Every `<prefix>.<part>` of the format in the headers, with its [N, K] and scheme (fmt.layout)."""
    parts: dict[str, dict[str, str]] = {}
    for name in ck.shapes:
        prefix, _, part = name.rpartition(".")
        if part in fmt.parts:
            parts.setdefault(prefix, {})[part] = ck.files[name]
    found, files = {}, TensorFiles()
    for prefix, where in parts.items():
        main = where.get(fmt.parts[0]) or next(iter(where.values()))
        shapes = {part: ck.shapes[f"{prefix}.{part}"] for part in where}
        shape, spec = fmt.layout(prefix, shapes, main,
                                 lambda part, prefix=prefix: files.read(parts[prefix][part], f"{prefix}.{part}"))
        found[prefix] = QuantizedLinear(prefix, where, shape, spec)
    return found


def _read_parts(files: TensorFiles, l: QuantizedLinear, which: Optional[tuple] = None) -> dict[str, torch.Tensor]:
    return {part: files.read(file, f"{l.prefix}.{part}") for part, file in l.files.items()
            if which is None or part in which}

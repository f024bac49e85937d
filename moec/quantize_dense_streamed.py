"""--quant-dense in an out-of-core compile: each non-expert Linear quantized when its layer group is read.

Matches: the Linears quantize_dense turned into MatMulNBits on the meta model whose graph was captured
  (moec.plan_model.build_on_meta keeps that pass's result): attention projections, shared experts, dense MLPs and
  the output head; routers and what the block does not divide were kept fp32 there and stay so.
Produces, per layer group as it streams:
  - `quantize(model, key)`: the group's Linears as the in-memory pass makes them
    (moec.targets.onnxruntime.quantize_dense.quantize_linear: round-to-nearest at the dense spec, or a
    pre-quantized checkpoint's own block-wise codes when they dequantize to exactly the weight, or with
    --calibration the codes moec.calibrate_streamed chose, GPTQ's or nearest, before the group is written: each
    decoder layer's as the data reaches it, the output head's once it went through them all), swapped into a
    decoder layer; for the embeddings-and-head group, whose tensors are read one at a time into the same
    modules, their MatMulNBits tensors are returned by name instead (the head stays a Linear to be read again).
    Each Linear's error against full precision is measured on a seeded random input of its width (the
    streamed experts' probes are random too: no layer's real inputs exist before the model runs).
  - `dequantize(model, key)`: the reference for verification: each Linear's weight overwritten, a chunk of rows
    at a time, by the one MatMulNBits computes with (a head tied to the input embeddings gets a new parameter
    instead: the embeddings keep their weight).
Peak memory: the group's weights as read, plus a chunk of rows' rounding (moec.quant.quantize_nbits) and the
codes; a large-vocabulary head is never held twice in fp32 (151936 x 2048 in Qwen3-30B: 1.2 GiB), nor its codes
unpacked whole.
Refuses nothing of its own: a Linear the graph holds as MatMulNBits whose weight the group did not read is left
to the writer, which names the missing tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from moec.external_data import layer_key
from moec.quant import NBitsWeight, QuantizedWeight, QuantSpec, dequantize_nbits_into, nbits

# a checkpoint's own codes for the Linear at this path, if it has them ([1, N, K]; checked before use)
GivenCodes = Callable[[str], Optional[QuantizedWeight]]


@dataclass
class StreamedDense:
    paths: list[str]  # the Linears the graph holds as MatMulNBits (the transformers model's names)
    spec: QuantSpec
    accuracy_level: int
    kept: list[dict]  # quantize_dense's Linears kept fp32, with the reason
    given: GivenCodes = lambda path: None
    method: str = ""  # how round-to-nearest's codes are reported (with --calibration: why they are not calibrated)
    reasons: dict[str, str] = field(default_factory=dict)  # ... for a Linear of its own, by path
    # --calibration: each decoder layer's and the head's GPTQ-or-nearest codes, by path, with how they were chosen
    # (moec.calibrate_streamed); kept to the end for the verification's reference, in MatMulNBits' layout (int4:
    # 1/8 of fp32; never unpacked whole: int32 codes are as large as the fp32 weight)
    calibrated: dict[str, tuple[NBitsWeight, str]] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)  # each Linear's outcome, as it was quantized
    _done: set = field(default_factory=set)
    _read_as: dict = field(default_factory=dict)  # id(weight) -> the Linear's path as read, before fusion moved it

    @classmethod
    def from_meta(cls, result, options: dict, given: Optional[GivenCodes] = None) -> "StreamedDense":
        """From quantize_dense's result on the meta model (its outcomes' paths, its kept Linears)."""
        from moec.targets.onnxruntime.quantize_dense import dense_spec

        return cls([o.path for o in result.layers], dense_spec(options), int(options.get("accuracy_level", 0) or 0),
                   list(result.details["kept_fp32"]), given or (lambda path: None))

    def in_group(self, key: str) -> list[str]:
        return [p for p in self.paths if layer_key(p + ".") == key]

    def _read(self, model: nn.Module, key: str) -> list[tuple[str, nn.Linear]]:
        """The group's Linears whose weights are in memory now."""
        out = []
        for path in self.in_group(key):
            linear = model.get_submodule(path)
            if type(linear) is nn.Linear and not linear.weight.is_meta:
                out.append((path, linear))
        return out

    def remember(self, model: nn.Module, key: str) -> None:
        """The group's Linears as read, before fusion moves them (a shared expert becomes `<mlp>.shared`): the
        checkpoint names their codes by these paths."""
        self._read_as = {id(m.weight): path for path, m in model.named_modules()
                         if type(m) is nn.Linear and layer_key(path + ".") == key and not m.weight.is_meta}

    def own_codes(self, path: str, linear: nn.Linear) -> Optional[QuantizedWeight]:
        """The checkpoint's own codes for the Linear, when they dequantize to its weight and have the spec the
        graph was captured with (the meta model had no codes to look at: other bits, blocks or symmetry are
        rounded again at the graph's)."""
        from moec.targets.onnxruntime.quantize_dense import usable_codes

        given = usable_codes(self.given(self._read_as.get(id(linear.weight), path)), linear)
        return given if given is not None and given.spec == self.spec else None

    def calibrate(self, codes: dict[str, tuple[QuantizedWeight | NBitsWeight, str]]) -> None:
        """Codes chosen on the calibration data (moec.calibrate_streamed), by path: a decoder layer's, or the
        head's, already in MatMulNBits' layout."""
        self.calibrated.update({path: (q if isinstance(q, NBitsWeight) else nbits(q), method)
                                for path, (q, method) in codes.items()})

    def quantize(self, model: nn.Module, key: str, swap: bool) -> dict[str, torch.Tensor]:
        """The group's Linears in memory as MatMulNBits: swapped into `model` (`swap`), else their tensors by name
        ("<path>.packed" ...; the bias is the Linear's own)."""
        from moec.passes.layers import set_submodule
        from moec.targets.onnxruntime.quantize_dense import quantize_linear

        tensors: dict[str, torch.Tensor] = {}
        for path, linear in self._read(model, key):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, 16, linear.in_features, generator=gen)
            with torch.no_grad():
                q, outcome = quantize_linear(path, linear, self.spec, self.accuracy_level, self.own_codes(path, linear), x,
                                             self.calibrated.get(path), method=self.reasons.get(path, self.method))
            if path not in self._done:  # a tied head is read with each of the group's tensors
                self._done.add(path)
                self.layers.append(outcome.to_dict())
            if swap:
                set_submodule(model, path, q)
            else:
                tensors.update({f"{path}.{n}": b for n, b in q.named_buffers()})
        return tensors

    def dequantize(self, model: nn.Module, key: str) -> None:
        """The group's Linears in memory computing with the weights MatMulNBits computes with."""
        from moec.targets.onnxruntime.quantize_dense import dense_reference

        shared = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
        for path, linear in self._read(model, key):
            codes, calibrated = self.own_codes(path, linear), self.calibrated.get(path)
            if codes is None and calibrated is not None:  # a chunk of rows at a time, as a large head needs
                tied = shared[id(linear.weight)] > 1  # to the embeddings: they keep their weight
                weight = dequantize_nbits_into(calibrated[0], torch.empty_like(linear.weight) if tied
                                               else linear.weight.detach())
                if tied:
                    linear.weight = nn.Parameter(weight, requires_grad=False)
            elif shared[id(linear.weight)] > 1:  # a head tied to the embeddings: they keep their weight
                weight = dense_reference(linear, self.spec, codes, f"{path}.weight")
                linear.weight = nn.Parameter(weight, requires_grad=False)
            else:  # overwritten: a large head is not held twice
                dense_reference(linear, self.spec, codes, f"{path}.weight", in_place=True)

    def report(self) -> dict:
        """As the in-memory report's quantization.dense."""
        return {"spec": self.spec.name, "kept_fp32": self.kept, "layers": self.layers,
                "error_measured_on": "a seeded random input of each Linear's width (out of core)"}

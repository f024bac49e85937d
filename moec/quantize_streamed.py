"""Quantize an out-of-core compile's MoE layers one expert at a time: the layer's fp32 experts are never all in
memory, only one expert's weights and the layer's packed codes (an int4 OLMoE layer: 25 MiB and 0.2 GiB, where
its fp32 experts are 1.5 GiB).

Matches: a fused layer of an out-of-core `--quant` compile whose experts the model stacks ([E, ...] parameters)
  and whose reading the miniature's fusion recorded, lowered to QMoE (moec.targets.onnxruntime.plan_layer).
  Other layers (experts as a ModuleList of modules, routing kept as written, activations QMoE can't run) are
  read whole, as before: `streams(path)` says which.
Produces, per layer and use:
  - "codes" (writing the artifact): the FusedMoE over the layer's own router and shared expert, its experts
    checked against the layer as written on a probe (translation validation on the real weights, both sides one
    expert at a time), then given codes expert by expert by its coder (RoundToNearest: separable per expert, so
    the codes are the whole-layer quantization's byte for byte; or a pre-quantized checkpoint's own codes,
    moec.mxfp4_stream.CheckpointCodes, moec.packed_stream.PackedCodes, each checked by `checked_codes`) and
    packed as QMoE reads them; `fill_lowered` gives the lowered layer those bytes.
  - "dequantized" / "fp32" (verification): the FusedMoE computing its experts one at a time from the
    dequantized codes (the artifact's exact reference) or from the fp32 weights (the error against full
    precision).
Refuses (PassValidationError): a layer whose experts read alone do not reproduce the layer as written.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from moec.errors import PassValidationError, SourceError
from moec.lazy_checkpoint import LazyCheckpoint
from moec.passes.fusion_rules import ExpertWeights
from moec.stream_experts import (ExpertReader, StreamedExperts, StreamedLayer, beside_experts, lazy_experts,
                                 stacked_names)


class Coder:
    """What StreamedQuantizer asks of a coder, with the defaults of one that needs nothing more: `codes` and
    `dequantized` per expert (each coder's own), and the hooks below."""

    method: str  # how the codes were chosen, for the report
    exact = False  # True: the codes are a checkpoint's, checked to dequantize to exactly the fp32 weights
    calibrated = False  # True: given each layer's calibration inputs (`use`), its codes read back as written
    reference: str  # what the verification's reference is

    def attach(self, packed: dict) -> None:
        """StreamedQuantizer.packed: each layer's arrays while it is written."""

    def use(self, path: str, fused, x: Optional[torch.Tensor]) -> None:
        """A layer's calibration inputs [T, H] before its experts are coded (None: none reached it)."""

    def describe(self, path: str) -> str:
        """How the layer's codes were chosen, once all its experts were coded."""
        return self.method

    def keep(self, path: str, experts: list[int]) -> None:
        """The layer as written holds these experts (checkpoint indices, in order; fewer when pruned): `codes` and
        `dequantized` are asked for them by those indices."""

    def read_back(self, model_path: str) -> None:
        """The artifact is written: codes that must be read back come from `model_path` from now on."""

    def check_folded(self, fused_paths: list[str]) -> None:
        """Every expert the coder has codes for is in a fused layer."""

    def done(self) -> None:
        """Nothing kept between experts."""


class RoundToNearest(Coder):
    """The default coder: each expert quantized round-to-nearest at `spec` (separable per expert)."""

    method = "round-to-nearest"
    exact = False  # its dequantized weights differ from the fp32 ones: the layer's error is measured
    reference = "the dequantized model (each layer's experts quantized and dequantized), layer by layer"

    def __init__(self, spec):
        self.spec = spec

    def codes(self, reader, path: str, e: int, stacked: dict, w: ExpertWeights) -> tuple:
        from moec.mixed_precision import spec_at
        from moec.quant import quantize

        spec = spec_at(self.spec, path)  # --quant auto: the layer's own
        return (quantize(w.w_gate_up, spec, f"{path}.w_gate_up"), quantize(w.w_down, spec, f"{path}.w_down"))

    def dequantized(self, path: str, e: int, w: ExpertWeights) -> ExpertWeights:
        from moec.quant import dequantize

        q1, q2 = self.codes(None, path, e, {}, w)
        return replace(w, w_gate_up=dequantize(q1), w_down=dequantize(q2))


def checked_codes(path: str, e: int, spec, w: ExpertWeights, codes: ExpertWeights, scales: ExpertWeights,
                  zero_points: Optional[ExpertWeights], what: str) -> tuple:
    """A pre-quantized checkpoint's codes, scales and zero points for expert e (each laid out per element as the
    fused layer reads its weights) as QMoE's (gate/up, down) codes at `spec`, checked to dequantize to exactly the
    fused layer's fp32 weights `w`: the artifact's experts are then the checkpoint's to the bit."""
    from moec.fold_checkpoint import exact_codes
    from moec.quant import QuantError

    out = []
    for field in ("w_gate_up", "w_down"):
        z = None if zero_points is None else getattr(zero_points, field)
        q = exact_codes(getattr(codes, field), getattr(scales, field), z, spec, getattr(w, field))
        if q is None:
            raise QuantError(f"{path}: expert {e}'s {what}, laid out as the fused layer reads the weights, do not "
                             f"dequantize to its {field} (a layout the codes can't follow); compile with "
                             "--out-of-core off. Nothing was written.")
        out.append(q)
    return tuple(out)


class StreamedQuantizer:
    def __init__(self, ck: LazyCheckpoint, config, model: nn.Module, planned: list, kinds: dict, spec,
                 log: Callable[[str], None], coder=None):
        """`coder` chooses each expert's codes (RoundToNearest by default; a pre-quantized checkpoint's own,
        moec.mxfp4_stream.CheckpointCodes or moec.packed_stream.PackedCodes)."""
        self.spec, self.kinds, self.log = spec, kinds, log
        self.coder = coder or RoundToNearest(spec)
        self.planned = {p.path: p for p in planned if p.fused}
        layers = [l for l in (self._streamable(model, p) for p in self.planned.values()) if l is not None]
        self.reader = ExpertReader(ck, config, layers, log) if layers else None
        self.packed: dict[str, dict[str, np.ndarray]] = {}  # per layer being written: the lowered layer's buffers
        self.coder.attach(self.packed)

    def streams(self, path: str) -> bool:
        return self.reader is not None and path in self.reader.layers

    def done(self) -> None:
        """A layer (or the verification) finished: the last expert read is not kept."""
        if self.reader is not None:
            self.reader.clear()
        self.coder.done()

    def _streamable(self, model: nn.Module, planned) -> Optional[StreamedLayer]:
        from moec.external_data import layer_key
        from moec.passes.fuse_moe import Anatomy, analyze
        from moec.plan_model import layer_kind
        from moec.targets.onnxruntime.lower_moe_onnxruntime import plan_layer

        sub = model.get_submodule(planned.path)
        mini = self.kinds.get(layer_kind(sub))
        anatomy = analyze(sub)
        from moec.mixed_precision import spec_at

        if spec_at(self.spec, planned.path) is None:  # --quant auto kept it at full precision: read whole, as fp32
            return None
        route = planned.spec.route
        why = ("its expert reading was not recorded" if mini is None or mini.layout is None else
               "its experts are not stacked tensors" if not isinstance(anatomy, Anatomy) or anatomy.source.stacked is None
               else "it uses its stacked experts whole, not one at a time" if not mini.expert_by_expert
               else "its routing is kept as written" if route is None else
               "QMoE does not run it" if isinstance(plan_layer(planned.spec, route.top_k), str) else "")
        stacked = None if why else stacked_names(sub, anatomy.source.stacked)
        if not why and stacked is None:
            why = "its expert tensors are not all its own"
        if why:
            self.log(f"  {planned.path}: experts read whole ({why})")
            return None
        return StreamedLayer(planned.path, layer_key(planned.path + "."), anatomy.num_experts, anatomy.hidden,
                             mini.layout, stacked)

    def materialise(self, model: nn.Module, key: str) -> None:
        """The group's tensors but the streamed layers' experts (read expert by expert when asked for)."""
        self.reader.ck.materialise(model, key, skip=self.reader.is_expert_tensor, may_stay_meta=self.reader.meta_names())

    def fuse(self, model: nn.Module, path: str, use: str, probe: torch.Tensor,
             calibration: Optional[torch.Tensor] = None,
             prune: Optional[Callable[[nn.Module], list[int]]] = None) -> Optional[dict]:
        """Replace the layer at `path` by its FusedMoE for `use` ("codes", "dequantized" or "fp32"); with "codes",
        returns the layer's quantization outcome (bytes, error on `probe`); `calibration`: the layer's calibration
        inputs [T, H], for a calibrated coder (moec.calibrate_streamed.CalibratedCodes). `prune(fused)` (pruning,
        moec.prune_streamed) slices the fused layer, once validated whole, to the experts it keeps and returns their
        original indices: only those are read and coded."""
        from moec.moe_layer import QuantizedExperts
        from moec.numerics import compare_tensors
        from moec.passes.fuse_moe import MATCH_TOL, CalledLike, analyze
        from moec.passes.layers import LayerCall, set_submodule
        from moec.mixed_precision import spec_at
        from moec.plan_model import fuse_as_miniature, layer_kind
        from moec.quant import quantized_shape

        sub = model.get_submodule(path)
        layer, planned = self.reader.layers[path], self.planned[path]
        mini = self.kinds[layer_kind(sub)]
        anatomy = analyze(sub)
        if anatomy.router_weight is not None and anatomy.router_weight.is_meta:
            raise SourceError(f"{path}: its router's weight is not in the checkpoint's tensors of {layer.group}.")
        e, rows, h = layer.num_experts, planned.spec.experts.intermediate * (2 if planned.spec.experts.gated else 1), \
            planned.spec.experts.hidden
        i = planned.spec.experts.intermediate
        fused = fuse_as_miniature(anatomy, mini, planned.spec, torch.empty(e, rows, h, device="meta"),
                                  torch.empty(e, h, i, device="meta"), torch.empty(e, rows, device="meta"),
                                  torch.empty(e, h, device="meta"))

        beside = beside_experts(sub, layer)  # not `sub` itself: the fused layer must not keep the layer as written

        def fp32(index: int) -> ExpertWeights:  # by the checkpoint's expert index
            return self.reader.canonical(beside, path, index)

        keep = list(range(e))
        outcome = None
        if use == "codes":
            call = LayerCall(mini.tensor_index or 0)
            with torch.no_grad(), lazy_experts(sub, layer.stacked,
                                               lambda key, index: self.reader.hf(beside, path, index)[key][0]):
                expected = sub(*call.args(probe))
            fused.stream = StreamedExperts(fused, fp32)
            with torch.no_grad():  # as fuse_moe checks a reading, errors of the streaming itself not swallowed
                out, ids, weights, logits = fused.compute(probe.reshape(-1, h))
                main = expected[0] if isinstance(expected, (tuple, list)) else expected
                got = fused.finish(probe, out, ids, weights, logits)
                err = compare_tensors(main, got[0] if isinstance(got, (tuple, list)) else got).rel_l2
            if err > MATCH_TOL:
                raise PassValidationError(f"{path}: its experts read one at a time do not reproduce the layer as "
                                          f"written on its real weights (relative L2 {err:.3g}); compile with "
                                          "--out-of-core off.")
            self.log(f"  {path}: fused on its real weights, experts read one at a time (validated)")
            if prune is not None:  # it re-points the stream at the experts kept
                keep = prune(fused)
            self.coder.keep(path, keep)
            self.coder.use(path, fused, calibration)
            outcome = self._quantize(fused, path, fp32, probe, beside, keep)
            spec = spec_at(self.spec, path)
            fused.quantized = QuantizedExperts(quantized_shape(fused.w_gate_up, spec, f"{path}.w_gate_up"),
                                               quantized_shape(fused.w_down, spec, f"{path}.w_down"))
        elif use == "dequantized":
            if prune is not None:
                keep = prune(fused)
            self.coder.keep(path, keep)
            fused.stream = StreamedExperts(fused, lambda index: self.coder.dequantized(path, keep[index],
                                                                                      fp32(keep[index])))
        else:
            fused.stream = StreamedExperts(fused, fp32)
        set_submodule(model, path, fused if mini.tensor_index is None else CalledLike(fused, LayerCall(mini.tensor_index)))
        return outcome

    def _quantize(self, fused, path: str, fp32: Callable[[int], ExpertWeights], probe: torch.Tensor,
                  beside: dict, keep: list[int]) -> dict:
        """Every expert kept (`keep`: checkpoint indices) coded by the coder and packed in turn (QMoE's layout: fc1 rows
        interleaved gate/up for SwiGLU); the layer's biases gathered; the layer's error on `probe` against fp32."""
        from moec.numerics import compare_tensors
        from moec.ops import interleave_gate_up
        from moec.passes.outcomes import QuantizationOutcome
        from moec.passes.quantize_experts import _hidden_out
        from moec.quant import QuantizedWeight, pack
        from moec.targets.onnxruntime.lower_moe_onnxruntime import plan_layer

        from moec.mixed_precision import spec_at

        spec = spec_at(self.spec, path)  # --quant auto: the layer's own
        swiglu = plan_layer(fused.spec, fused.spec.route.top_k).activation_type == "swiglu"
        packed: dict[str, np.ndarray] = {}  # each [E, ...], filled expert by expert: the layer's codes held once
        biases: dict[str, list] = {"b_gate_up": [], "b_down": []}
        for j, e in enumerate(keep):
            w = fp32(e)
            q1, q2 = self.coder.codes(self.reader, path, e, self.reader.hf(beside, path, e), w)
            if swiglu:
                z = None if q1.zero_points is None else interleave_gate_up(q1.zero_points)
                q1 = QuantizedWeight(interleave_gate_up(q1.codes), interleave_gate_up(q1.scales), z, spec)
            for prefix, q in (("fc1", q1), ("fc2", q2)):
                p = pack(q)
                arrays = {prefix: p.weight, f"{prefix}_scales": p.scales, f"{prefix}_zero_points": p.zero_points}
                for name, a in arrays.items():
                    if a is None:
                        continue
                    if name not in packed:
                        packed[name] = np.empty((len(keep),) + a.shape[1:], dtype=a.dtype)
                    packed[name][j] = a[0]
            for name in biases:
                if getattr(w, name) is not None:
                    biases[name].append(getattr(w, name))
            if len(keep) >= 32 and (j + 1) % (len(keep) // 4) == 0:
                self.log(f"  {path}: {j + 1}/{len(keep)} experts quantized")
        self.packed[path] = packed
        for name, values in biases.items():
            if values and getattr(fused, name) is not None:
                setattr(fused, name, nn.Parameter(torch.cat(values), requires_grad=False))
        if self.coder.exact:  # every expert's codes were checked to dequantize to its weights bit for bit
            rel_l2, cosine = 0.0, 1.0
        else:
            with torch.no_grad():
                before = _hidden_out(fused(probe))
                stream = fused.stream
                fused.stream = StreamedExperts(fused, lambda index: self.coder.dequantized(path, keep[index],
                                                                                          fp32(keep[index])))
                s = compare_tensors(before, _hidden_out(fused(probe)))
                fused.stream = stream
            rel_l2, cosine = s.rel_l2, s.cosine
        fp_bytes = len(keep) * (fused.w_gate_up[0].numel() + fused.w_down[0].numel()) * 4
        quantized = sum(a.nbytes for name, a in self.packed[path].items())
        return QuantizationOutcome(path, spec.name, fp_bytes, quantized, rel_l2, cosine,
                                   method=self.coder.describe(path)).to_dict()

    def fill_lowered(self, model: nn.Module, path: str) -> None:
        """Give the lowered QMoE layer at `path` its packed codes."""
        from moec.targets.onnxruntime.lower_moe_qmoe import OrtQMoE

        packed = self.packed.pop(path)
        target = next((m for m in model.get_submodule(path).modules() if isinstance(m, OrtQMoE)), None)
        if target is None:
            raise PassValidationError(f"{path}: lowered without its QMoE node; compile with --out-of-core off.")
        for name, array in packed.items():
            want = tuple(getattr(target, name).shape)
            if tuple(array.shape) != want:
                raise PassValidationError(f"{path}: streamed {name} is {tuple(array.shape)}, the graph has {want}.")
            setattr(target, name, torch.from_numpy(array))

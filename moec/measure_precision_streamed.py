"""--quant auto in an out-of-core compile: the logits' error of many per-layer precision choices, measured together
in one pass over the checkpoint, one decoder layer in memory at a time.

Matches: an out-of-core compile given --quant auto; it is moec.mixed_precision.choose_batched's `errors_of`.
Produces: for each choice (fused layer path -> int2|int4|int8|fp32; a layer not named stays at fp32) the worst
  relative L2, over the compile's verification inputs, of the logits against the full-precision model's: what the
  in-memory search measures on the whole model, and what the compile's budget check measures on the artifact
  afterwards. The experts at a precision are round-to-nearest's codes dequantized: the codes the artifact gets
  (int2's kept between passes by moec.precision_codes: its clipping search costs more than reading them back;
  with --calibration, GPTQ's, solved beforehand by moec.calibrate_precisions_streamed and handed in).
How: the verification inputs go through the model one decoder layer at a time, as calibration's batches do
  (moec.calibrate_streamed.LayerInputs: the layers before the one running replay what it returned, the model's own
  forward runs around it). A choice's hidden states after layer i depend only on its precisions up to layer i, so
  choices that agree that far share one state: layer i runs once for each distinct such prefix, from its parent's
  state. The sensitivity batch (every layer alone at each precision, and each precision everywhere) is then about
  3 i + 4 states of layer i rather than a whole model per choice; the states run at one precision go through the
  layer together, concatenated along the batch dimension (the inputs repeated alike), a run of a few thousand
  tokens at most. Each layer is read once a pass, at full precision
  with its MoE layers fused (experts read one at a time where they stream, up to KEPT_BYTES of them kept between
  runs), and set to each precision in turn: a streamed layer dequantizes each expert as it is read, a layer read
  whole gets dequantized copies of its stacked experts, its own put back after. After the last layer each final
  state runs the final norm and the head; its logits are compared with the full-precision ones at once and
  dropped (a large vocabulary's logits are not held for every choice).
Holds: one decoder layer as the compile reads it, a dequantized copy of a whole-read layer's experts while that
  precision runs (of a streamed layer's, up to KEPT_BYTES of them, beside up to KEPT_BYTES of its fp32 ones), and the hidden states of each distinct prefix on the verification inputs (a few thousand tokens
  at most).
Refuses: nothing of its own; a model the layer-by-layer run cannot carry fails as calibration does
  (CalibrationError naming the layer).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from moec.calibrate_streamed import KEPT_BYTES, LayerInputs
from moec.external_data import layer_key
from moec.lazy_checkpoint import LazyCheckpoint, decoder_layers
from moec.mixed_precision import FULL
from moec.numerics import compare_tensors
from moec.stream_experts import KeptExperts, StreamedExperts

# a run of layer i from several states at once takes at most this many tokens (states x an input's tokens): the
# layer's activations for them, [tokens, hidden] and the experts' [tokens, intermediate], stay small
BATCH_TOKENS = 1 << 13
Prefix = tuple  # one variant (a tuple of precisions, one per fused layer of the decoder layer) per layer so far


class StreamedErrors:
    def __init__(self, skeleton: Callable[[], nn.Module], inputs: list[tuple], ck: LazyCheckpoint,
                 prepare: Callable[[nn.Module, str], None], fused_paths: list[str], extra: dict,
                 log: Callable[[str], None], dequantized: Callable):
        """`skeleton()`: the task's wrapper around a fresh skeleton of the checkpoint's model (one a pass: a pass
        leaves its layers fused); `prepare(model, key)` reads a decoder layer at full precision with its MoE layers
        fused; `extra`: the compile's options (block size, asymmetric: the codes' settings but the bit width);
        `dequantized(path, precision, e, w)`: a streamed expert at a precision (moec.precision_codes.PrecisionCodes:
        round-to-nearest's codes, or --calibration's GPTQ codes). Layers read whole are rounded to nearest here
        (--calibration refuses them before)."""
        self.skeleton, self.inputs, self.ck, self.prepare, self.fused_paths = skeleton, inputs, ck, prepare, fused_paths
        self.extra, self.log, self.dequantized = extra, log, dequantized
        self.per_layer: list[list[str]] = []  # per decoder layer, its fused layers' paths (known once a pass began)
        self.passes = 0

    def __call__(self, choices: list[dict[str, str]]) -> list[float]:
        """Each choice's worst relative L2 of the logits over the inputs, against the full-precision model."""
        t = time.perf_counter()
        self.passes += 1
        self.module = self.skeleton()
        self.model = self.module.model
        self.layers = LayerInputs(self.module, self.inputs, self.ck, self.prepare, self.fused_paths, lambda msg: None)
        _, layers = decoder_layers(self.model)  # what a prefix's variant at each layer names
        self.per_layer = [[p for p in self.fused_paths if layer_key(p + ".") == f"layers.{i}"]
                          for i in range(len(layers))]
        every = [self._prefix(c) for c in choices]
        full = self._prefix({})
        states: dict[Prefix, list] = {(): []}
        for i, paths in enumerate(self.per_layer):
            want = {p[:i + 1] for p in every + [full]}
            states = self._layer(i, paths, want, states)
            self.log(f"  quant auto: pass {self.passes}, layers.{i} run from {len(want)} state(s) "
                     f"({time.perf_counter() - t:.0f} s)")
        errors = self._logits_errors(states, full, set(every))
        self.module = self.model = self.layers = None
        self.log(f"  quant auto: pass {self.passes} over the checkpoint, {len(choices)} choice(s), "
                 f"{len(states)} final state(s) ({time.perf_counter() - t:.1f} s)")
        return [errors[p] for p in every]

    def _prefix(self, choice: dict[str, str]) -> Prefix:
        return tuple(tuple(choice.get(path, FULL) for path in paths) for paths in self.per_layer)

    def _layer(self, i: int, paths: list[str], want: set, states: dict) -> dict:
        """Decoder layer i run from each wanted prefix's parent state, at the prefix's variant: the new states."""
        key, runner = f"layers.{i}", self.layers
        layers, _, embeddings, before = runner._read_layer(key, i)  # run once per state and input
        out: dict[Prefix, list] = {}
        try:
            for variant in sorted({p[-1] for p in want}):
                with self._at(paths, variant):
                    group = sorted(p for p in want if p[-1] == variant)
                    for chunk in self._chunks(group, states) if i > 0 else [[p] for p in group]:
                        if len(chunk) == 1:  # (layer 0: every prefix starts from the embeddings, looked up by ids)
                            out[chunk[0]], _ = runner._run(key, i, layers, before, states[chunk[0][:-1]], {})
                            continue
                        for prefix, got in zip(chunk, self._run_together(key, i, layers, before,
                                                                         [states[p[:-1]] for p in chunk])):
                            out[prefix] = got
        finally:
            runner._drop_layer(i, layers, before, embeddings)
        return out

    def _chunks(self, group: list, states: dict) -> list[list]:
        """The prefixes run at one variant, in runs of at most BATCH_TOKENS tokens an input (states that are not
        plain tensors, as a layer returning a tuple, run one at a time)."""
        if not all(isinstance(t, torch.Tensor) for p in group for t in states[p[:-1]]):
            return [[p] for p in group]
        tokens = max(max(int(a[0].numel()) for a in self.inputs), 1)
        size = max(1, BATCH_TOKENS // tokens)
        return [group[j:j + size] for j in range(0, len(group), size)]

    def _run_together(self, key: str, i: int, layers, before: list, parents: list[list]) -> list[list]:
        """Layer i run once from several parent states at once: each input repeated along its batch dimension
        (every input tensor is batch-first: ids, masks, positions, caches) and the parents' states concatenated
        there; the layer's output split back per parent. The layer's weights and the Python around it are then
        paid once a run, not once a state: the verification inputs are a few dozen tokens, and a run was mostly
        overhead (the sensitivity batch runs layer i from ~3i+4 states)."""
        runner, k = self.layers, len(parents)
        batches = runner.batches
        runner.batches = [tuple(torch.cat([a] * k) if isinstance(a, torch.Tensor) else a for a in args)
                          for args in batches]
        try:
            got, _ = runner._run(key, i, layers, before, [torch.cat([p[b] for p in parents])
                                                          for b in range(len(batches))], {})
        finally:
            runner.batches = batches
        return [[g.chunk(k)[j] for g in got] for j in range(k)]

    @contextmanager
    def _at(self, paths: list[str], variant: tuple):
        """The decoder layer's fused layers computing with their experts dequantized at `variant`'s precisions
        (streamed: `self.dequantized`'s codes; read whole: round-to-nearest's; fp32: as read); put back after."""
        from moec.moe_layer import FusedMoE
        from moec.passes.quantize_experts import spec_from_options
        from moec.quant import dequantize, quantize

        undo = []
        try:
            for path, precision in zip(paths, variant):
                if precision == FULL:
                    continue
                fused = next(m for m in self.model.get_submodule(path).modules() if isinstance(m, FusedMoE))
                stream = getattr(fused, "stream", None)
                if isinstance(stream, StreamedExperts):  # each expert dequantized as it is read (separable)
                    fetch = stream.fetch
                    stream.fetch = lambda e, fetch=fetch, path=path, p=precision: self.dequantized(path, p, e, fetch(e))
                    # and kept while this precision runs: its every state and input (reading codes back costs
                    # a few ms an expert at granite-1b's size, making int2's ~0.1 s)
                    KeptExperts(KEPT_BYTES).wrap(stream)
                    undo.append(lambda stream=stream, fetch=fetch: setattr(stream, "fetch", fetch))
                    continue
                spec = spec_from_options({**self.extra, "quant": precision})  # a layer read whole: rounded
                w1, w2 = fused.w_gate_up, fused.w_down
                fused.w_gate_up = nn.Parameter(dequantize(quantize(w1, spec, f"{path}.w_gate_up")), requires_grad=False)
                fused.w_down = nn.Parameter(dequantize(quantize(w2, spec, f"{path}.w_down")), requires_grad=False)
                undo.append(lambda fused=fused, w1=w1, w2=w2: (setattr(fused, "w_gate_up", w1),
                                                               setattr(fused, "w_down", w2)))
            yield
        finally:
            for u in reversed(undo):
                u()

    def _logits_errors(self, states: dict, full: Prefix, wanted: set) -> dict[Prefix, float]:
        """Each final state through the final norm and the head (LayerInputs.final_outputs): its worst relative L2
        against the full-precision state's logits, the logits not kept."""
        with self.layers.final_outputs("--quant auto: verification input") as logits:
            reference = list(logits(states[full]))
            return {prefix: 0.0 if prefix == full else max(float(compare_tensors(r, g).rel_l2)
                                                          for r, g in zip(reference, logits(states[prefix])))
                    for prefix in wanted}

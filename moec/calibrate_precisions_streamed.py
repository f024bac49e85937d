"""--quant auto with --calibration in an out-of-core compile: every fused layer's experts GPTQ-solved at each
precision the search may give them, before the search, and kept for its passes.

Matches: an out-of-core compile given --quant auto and --calibration (moec.compile_out_of_core.choose_streamed).
  The in-memory search measures each layer at int2, int4 and int8 with GPTQ's codes, solved on the full-precision
  model's calibration inputs (passes/quantize_experts.py, `auto`). Out of core the calibration batches are carried
  through the model a decoder layer at a time (moec.calibrate_streamed.LayerInputs, as the writer carries them);
  while each layer is read, its experts are solved at every precision with the writer's own coder
  (moec.calibrate_streamed.CalibratedCodes: GPTQ per expert on the tokens its router sends it, held-out choice
  against round-to-nearest, too-few-token experts rounded to nearest).
Produces: the codes, put in a moec.precision_codes.PrecisionCodes (packed on disk beside the artifact), whose
  `dequantized` moec.measure_precision_streamed.StreamedErrors computes with, and each layer's routing statistics
  (the report's `routing`). The writer then writes the chosen precision's codes from there
  (moec.precision_codes.KeptCodes), neither solving them again nor carrying the calibration data a second time
  (tested byte for byte against the in-memory compile), and the budget is checked on the artifact as written.
  With --prune-experts FRACTION the same run chooses each layer's pruning (moec.prune_streamed, on the unpruned
  model's routing) and carries the pruned model's states beside the unpruned ones: the codes are the pruned
  model's, as in memory, and afterwards the two models' logits on the calibration data give the pruning's
  distance from the unpruned model (LayerInputs.pruning_distance), the in-memory pass's measure.
Holds: what the writer's calibration holds (moec.calibrate_streamed: the calibration states, a layer's inputs,
  up to KEPT_BYTES of its fp32 experts; twice the states when pruned) and one expert's codes at a time.
Refuses: (CalibrationError) a layer the data reaches with fewer tokens than it has experts, as the writer does.
  Layers whose experts are read whole are refused before this runs (choose_streamed, as the writer refuses them).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from moec.calibrate_streamed import CalibratedCodes, LayerInputs
from moec.lazy_checkpoint import decoder_layers
from moec.precision_codes import PrecisionCodes


class CalibratedPrecisions:
    def __init__(self, codes: PrecisionCodes, calibration: str, log: Callable[[str], None]):
        """`codes`: where the solved codes go (its specs: the precisions solved); `calibration`: the --calibration
        value, for errors."""
        self.codes, self.calibration, self.log = codes, calibration, log

    def solve(self, inputs: LayerInputs, prune: Optional[Callable[[str], Callable]] = None) -> None:
        """Carry the calibration data through every decoder layer, solving each fused layer's experts at every
        precision while the layer is read. `prune(key)`: LayerInputs.advance's `prune` for decoder layer `key`
        (--prune-experts: the layer ranked on its unpruned routing and pruned; `inputs.pruned_states` set, so the
        codes are solved on the pruned model's inputs, the kept experts by their index among those kept)."""
        _, layers = decoder_layers(inputs.model)
        for i in range(len(layers)):
            t = time.perf_counter()
            inputs.advance(f"layers.{i}", None if prune is None else prune(f"layers.{i}"), held=self._held)
            self.log(f"  quant auto: layers.{i}'s experts calibrated at {', '.join(self.codes.specs)} "
                     f"({time.perf_counter() - t:.1f} s)")

    def _held(self, fused: dict, inputs: dict) -> None:
        """LayerInputs.advance's `held`: the decoder layer's fused layers, their experts streaming at fp32."""
        with torch.no_grad():
            for path, layer in fused.items():
                n = layer.spec.experts.num_experts
                for precision, spec in self.codes.specs.items():
                    coder = CalibratedCodes(spec, self.calibration)
                    coder.keep(path, list(range(n)))
                    coder.use(path, layer, inputs.get(path))
                    for e in range(n):
                        self.codes.put(path, precision, e, coder.codes(None, path, e, {}, layer.stream.fetch(e)))
                    self.codes.methods[(path, precision)] = coder.describe(path)  # the writer's report says it

"""--quant auto with --calibration in an out-of-core compile: every fused layer's experts GPTQ-solved at each
precision the search may give them, before the search, and kept on disk for its passes.

Matches: an out-of-core compile given --quant auto and --calibration (moec.compile_out_of_core.choose_streamed).
  The in-memory search measures each layer at int2, int4 and int8 with GPTQ's codes, solved on the full-precision
  model's calibration inputs (passes/quantize_experts.py, `auto`). Out of core the calibration batches are carried
  through the model a decoder layer at a time (moec.calibrate_streamed.LayerInputs, as the writer carries them);
  while each layer is read, its experts are solved at every precision with the writer's own coder
  (moec.calibrate_streamed.CalibratedCodes: GPTQ per expert on the tokens its router sends it, held-out choice
  against round-to-nearest, too-few-token experts rounded to nearest).
Produces: `dequantized(path, precision, e, w)`, expert e of the layer at `path` as those codes dequantize it,
  which moec.measure_precision_streamed.StreamedErrors computes with instead of round-to-nearest's; and
  `methods`, how each (layer, precision) was coded (the in-memory report's words). The codes are packed as the
  artifact packs them (one file per expert and precision, about 0.44x the experts' fp32 bytes for all three) in
  a work directory beside the artifact's (moec.fsutil: locked while it lives, removed after; a killed compile's
  is removed by the next compile there). The writer then solves the chosen precision again as it streams, as a
  calibrated compile does: the same inputs give the same codes (tested byte for byte against the in-memory
  compile), and the budget is checked on the artifact as written.
Holds: what the writer's calibration holds (moec.calibrate_streamed: the calibration states, a layer's inputs,
  up to KEPT_BYTES of its fp32 experts) and one expert's codes at a time.
Refuses: (CalibrationError) a layer the data reaches with fewer tokens than it has experts, as the writer does.
  Layers whose experts are read whole are refused before this runs (choose_streamed, as the writer refuses them).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from moec.calibrate_streamed import CalibratedCodes, LayerInputs
from moec.fsutil import make_workdir, release_workdir
from moec.lazy_checkpoint import decoder_layers
from moec.quant import PackedWeight, dequantize, pack, unpack

FIELDS = (("fc1", "w_gate_up"), ("fc2", "w_down"))


class CalibratedPrecisions:
    def __init__(self, specs: dict, calibration: str, parent: str, log: Callable[[str], None]):
        """`specs`: precision -> QuantSpec (int2, int4, int8); `calibration`: the --calibration value (errors);
        `parent`: where the work directory goes (beside the artifact: the same disk)."""
        self.specs, self.calibration, self.log = specs, calibration, log
        self.directory = make_workdir(parent)
        self.index: dict[str, int] = {}  # layer path -> its number in the files' names
        self.methods: dict[tuple[str, str], str] = {}  # (path, precision) -> how it was coded

    def solve(self, inputs: LayerInputs) -> None:
        """Carry the calibration data through every decoder layer, solving each fused layer's experts at every
        precision while the layer is read."""
        _, layers = decoder_layers(inputs.model)
        for i in range(len(layers)):
            t = time.perf_counter()
            inputs.advance(f"layers.{i}", held=self._held)
            self.log(f"  quant auto: layers.{i}'s experts calibrated at {', '.join(self.specs)} "
                     f"({time.perf_counter() - t:.1f} s)")
        inputs.done()

    def _held(self, fused: dict, inputs: dict) -> None:
        """LayerInputs.advance's `held`: the decoder layer's fused layers, their experts streaming at fp32."""
        with torch.no_grad():
            for path, layer in fused.items():
                self.index[path] = len(self.index)
                n = layer.spec.experts.num_experts
                for precision, spec in self.specs.items():
                    coder = CalibratedCodes(spec, self.calibration)
                    coder.keep(path, list(range(n)))
                    coder.use(path, layer, inputs.get(path))
                    for e in range(n):
                        q = coder.codes(None, path, e, {}, layer.stream.fetch(e))
                        arrays = {}
                        for (prefix, _), code in zip(FIELDS, q):
                            p = pack(code)
                            arrays.update({prefix: p.weight, f"{prefix}_scales": p.scales})
                            if p.zero_points is not None:
                                arrays[f"{prefix}_zero_points"] = p.zero_points
                        np.savez(self._file(path, precision, e), **arrays)
                    self.methods[(path, precision)] = coder.describe(path)

    def _file(self, path: str, precision: str, e: int) -> str:
        return os.path.join(self.directory, f"{self.index[path]}.{precision}.{e}.npz")

    def dequantized(self, path: str, precision: str, e: int, w):
        """Expert e's weights `w` (fp32, as read) replaced by its calibrated codes at `precision`, dequantized."""
        spec = self.specs[precision]
        with np.load(self._file(path, precision, e)) as arrays:
            out = {}
            for prefix, field in FIELDS:
                packed = PackedWeight(arrays[prefix], arrays[f"{prefix}_scales"],
                                      arrays[f"{prefix}_zero_points"] if f"{prefix}_zero_points" in arrays else None,
                                      spec, getattr(w, field).shape[-1])
                out[field] = dequantize(unpack(packed, f"{path}.{prefix}"))
        return replace(w, **out)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        release_workdir(self.directory)

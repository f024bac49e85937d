"""The expert codes --quant auto's out-of-core search measures, kept on disk between its passes.

Matches: an out-of-core --quant auto compile (moec.compile_out_of_core.choose_streamed). Each pass over the
  checkpoint (moec.measure_precision_streamed) reads a layer's experts at fp32 and sets them to each precision it
  measures; making int2's round-to-nearest codes (their clipping search) costs several times reading them back,
  and a search makes several passes (9 at granite-1b's size), each asking again for most layers at int2.
Produces: `dequantized(path, precision, e, w)`: expert e of the fused layer at `path` (its fp32 weights `w`, as
  read) with its weights replaced by its codes at `precision`, dequantized; `codes(...)`, the codes themselves.
  Once the search chose (`keep_only`), the chosen precision's codes stay for the writer (KeptCodes below), which
  writes what the search measured instead of solving or rounding again. Codes are either put beforehand
  (`put`: --calibration's GPTQ codes, moec.calibrate_precisions_streamed, which can't be made again without the
  calibration data) or made when first asked for by `make` (round-to-nearest) and kept where that precision is in
  `kept`. Kept codes are packed as the artifact packs them (moec.quant.pack), one `.npz` per expert and precision,
  in a work directory beside the artifact (moec.fsutil: locked while it lives, removed by `close`; a killed
  compile's is removed by the next compile there).
Holds: one expert's codes at a time; on disk, the packed codes kept (int2 round-to-nearest: about a 14th of the
  experts' fp32 bytes; all three calibrated precisions: about 0.44x), and while the artifact is written only the
  chosen precision's (at most the artifact's own expert bytes again).
Refuses: (MoecError) codes put that the disk can't hold, naming the directory; codes asked for that were neither
  put nor can be made. Round-to-nearest codes the disk can't hold are made again each time instead (logged once).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from moec.errors import MoecError
from moec.fsutil import DISK_ERRNOS, make_workdir, release_workdir
from moec.quant import PackedWeight, dequantize, pack, unpack
from moec.quantize_streamed import Coder

FIELDS = (("fc1", "w_gate_up"), ("fc2", "w_down"))


class PrecisionCodes:
    def __init__(self, specs: dict, parent: str, log: Callable[[str], None],
                 make: Optional[Callable] = None, kept: tuple = ()):
        """`specs`: precision -> QuantSpec; `parent`: where the work directory goes (beside the artifact: the same
        disk); `make(path, precision, e, w)` -> (gate/up codes, down codes), for codes not put; `kept`: the
        precisions whose made codes are kept."""
        self.specs, self.log, self.make, self.kept = specs, log, make, set(kept)
        self.directory: Optional[str] = make_workdir(parent)
        self.index: dict[str, int] = {}  # layer path -> its number in the files' names
        self.made = 0  # codes made (not read back): what keeping saves
        self.methods: dict[tuple[str, str], str] = {}  # (path, precision) -> how codes put were chosen (the report's)

    def put(self, path: str, precision: str, e: int, codes: tuple) -> None:
        """Keep expert e's codes (gate/up, down) at `precision`."""
        if not self._save(path, precision, e, codes):
            raise MoecError(f"--quant auto: no room in {self.directory} for the experts' codes at each precision "
                            "(about 0.44x the experts' fp32 bytes with --calibration, kept while the search runs). "
                            "Free space beside the output directory. Nothing was written.")

    def dequantized(self, path: str, precision: str, e: int, w):
        """Expert e's weights `w` with its codes at `precision` dequantized in place of its fp32 ones."""
        return replace(w, **{field: dequantize(q) for (_, field), q in zip(FIELDS, self.codes(path, precision, e, w))})

    def codes(self, path: str, precision: str, e: int, w) -> tuple:
        """Expert e's codes at `precision` (gate/up, down): read back where kept (unpacked: the same codes and
        scales), else made (and kept where the precision is)."""
        spec, file = self.specs[precision], self._file(path, precision, e)
        if file is not None and os.path.exists(file):
            with np.load(file) as arrays:
                out = []
                for prefix, field in FIELDS:
                    z = f"{prefix}_zero_points"
                    packed = PackedWeight(arrays[prefix], arrays[f"{prefix}_scales"], arrays[z] if z in arrays else None,
                                          spec, getattr(w, field).shape[-1])
                    out.append(unpack(packed, f"{path}.{prefix}"))
            return tuple(out)
        if self.make is None:
            raise RuntimeError(f"{path}: expert {e}'s codes at {precision} were never put")
        codes = self.make(path, precision, e, w)
        self.made += 1
        if precision in self.kept and self.directory is not None and not self._save(path, precision, e, codes):
            self.log(f"  quant auto: no room left in {self.directory}; round-to-nearest codes are made again each "
                     "pass from here on")
            self.kept = set()
        return codes

    def keep_only(self, choice: dict[str, str]) -> None:
        """The search is done: the codes of each layer's chosen precision (`choice`: path -> precision) stay for
        the writer and the verification's reference; the others are removed (the disk they took is the artifact's
        next)."""
        if self.directory is None:
            return
        number = {n: path for path, n in self.index.items()}
        for name in os.listdir(self.directory):
            parts = name.split(".")
            if len(parts) == 4 and parts[-1] == "npz" and parts[0].isdigit():
                path = number.get(int(parts[0]))
                if choice.get(path) != parts[1]:
                    os.remove(os.path.join(self.directory, name))

    def _file(self, path: str, precision: str, e: int) -> Optional[str]:
        if self.directory is None:
            return None
        number = self.index.setdefault(path, len(self.index))
        return os.path.join(self.directory, f"{number}.{precision}.{e}.npz")

    def _save(self, path: str, precision: str, e: int, codes: tuple) -> bool:
        """Write the packed codes (whole or not at all); False when the disk is full."""
        arrays = {}
        for (prefix, _), q in zip(FIELDS, codes):
            p = pack(q)
            arrays.update({prefix: p.weight, f"{prefix}_scales": p.scales})
            if p.zero_points is not None:
                arrays[f"{prefix}_zero_points"] = p.zero_points
        file = self._file(path, precision, e)
        try:
            with open(file + ".part", "wb") as f:
                np.savez(f, **arrays)
            os.replace(file + ".part", file)
        except OSError as exc:
            try:
                os.remove(file + ".part")
            except OSError:
                pass
            if exc.errno in DISK_ERRNOS:
                return False
            raise
        return True

    def close(self) -> None:
        """Remove the codes kept; made codes are not kept from here on."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            release_workdir(self.directory)
            self.directory = None


class KeptCodes(Coder):
    """moec.quantize_streamed's coder after an out-of-core --quant auto search: each layer's experts written with the
    codes the search measured at the precision it chose (`store`, after keep_only), read back rather than solved
    (GPTQ) or rounded (int2's clipping search) again; the verification's reference dequantizes the same codes.
    `choice`: path -> precision (layers kept at full precision are not quantized, so never asked for)."""

    def __init__(self, store: PrecisionCodes, choice: dict[str, str], method: str, reference: str):
        self.store, self.choice, self.method, self.reference = store, choice, method, reference
        self.position: dict[str, dict[int, int]] = {}  # path -> checkpoint index -> index as written (`keep`)

    def keep(self, path: str, experts: list[int]) -> None:
        # the store's codes are numbered as the search's layer had them: the experts kept, in order (pruned)
        self.position[path] = {e: i for i, e in enumerate(experts)}

    def codes(self, reader, path: str, e: int, stacked: dict, w) -> tuple:
        return self.store.codes(path, self.choice[path], self.position[path][e], w)

    def dequantized(self, path: str, e: int, w):
        return self.store.dequantized(path, self.choice[path], self.position[path][e], w)

    def describe(self, path: str) -> str:
        return self.store.methods.get((path, self.choice[path]), self.method)

"""--calibration in an out-of-core compile: the calibration data carried through the model one decoder layer at a
time, and each streamed layer's experts calibrated (GPTQ) on the tokens its router sends them.

Matches: an out-of-core compile given --calibration; its fused MoE layers whose experts stream one at a time
  (moec.quantize_streamed). The in-memory compile captures every fused layer's inputs by running the whole
  full-precision model on the calibration batches; here only one layer is in memory, so the batches advance
  layer by layer (`LayerInputs.advance`): the layers before the one running are stood in for by what the last
  of them returned for each batch (`_Replay`), the one running is read at full precision with its MoE layers
  fused, and the model's own forward (masks, rotary embeddings, caches, its task wrapper) runs around it, stopped
  once that layer returned. The batches are the in-memory compile's (at most 8 sequences each: attention's
  intermediates grow with the batch); each run reads the layer's streamed experts once.
Produces, per decoder layer: each fused layer's inputs [T, H] (the full-precision model's, as in memory), its
  routing statistics (moec.analysis.routing_stats, the report's `routing`), and, with --quant, the layer's codes
  from `CalibratedCodes`, a moec.quantize_streamed coder: moec.gptq.quantize_expert per expert (the in-memory
  solver, expert by expert), experts that receive too few tokens rounded to nearest and named.
  The codes are solved once, on inputs not kept past their layer; the reference for verification
  (`dequantized`) reads them back as written: from the layer's packed arrays while it is written, then from the
  artifact's external data (`read_back`).
  With --quant-dense, the layer's dense Linears are calibrated too (`_calibrate_dense`: the in-memory solver,
  moec.targets.onnxruntime.quantize_dense.calibrated_codes, in call order on the layer as read, each group's GPTQ
  codes kept where they move the layer's output on held-out batches less than round-to-nearest's; in memory the
  check is on the model's output) and handed to moec.quantize_dense_streamed.StreamedDense, which writes them
  and keeps them for the verification's reference. The output head is calibrated once the data went through
  every layer (`calibrate_head`; its group is written last), on its own held-out tokens' output: the logits.
  With --prune-experts (moec.prune_streamed) the routing statistics are the unpruned model's, as in memory, and
  the layer is then pruned and run again from the pruned model's states (carried alongside once a layer lost
  experts): its fused layers' inputs for GPTQ are the pruned model's, as in memory.
Holds: the calibration tokens' hidden states twice (a layer's inputs and outputs; four times when pruned) and one
  layer's inputs per fused layer, [T, H] each, besides the one layer's weights the compile holds anyway; with
  --quant-dense, at most CALIBRATION_BYTES of a layer's dense Linears' inputs at a time; and up to KEPT_BYTES of
  the layer's streamed experts at fp32 (`KeptExperts`): the layer runs once per batch and, with --quant-dense,
  several times more per group of Linears, and reading every expert from the checkpoint on each run was most of
  the time (granite-1b-sized, 512 sequences: 64 carrying runs and ~100 held-out runs a layer).
Refuses (MoecError, naming the layer): --calibration with --quant on a fused layer whose experts are read whole
  (its calibrated codes could not be read back for verification); a layer whose batches fail (CalibrationError,
  as in memory).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from moec.analysis.routing_stats import LayerRouting, _accumulate
from moec.errors import MoecError
from moec.external_data import layer_key
from moec.lazy_checkpoint import LazyCheckpoint, decoder_layers, release
from moec.quantize_streamed import Coder
from moec.stream_experts import KeptExperts, StreamedExperts

KEPT_BYTES = 512 << 20  # a streamed layer's fp32 experts kept while its calibration runs (granite-1b's: 201 MiB)
# the head's weights GPTQ solves at a time (rows of them; their codes packed as they are solved): its working
# copies are a few times these bytes, beside the fp32 head (Qwen3-30B's 1.2 GiB head: 2048 rows, 16 MiB)
HEAD_BLOCK_ELEMENTS = 1 << 22


class _Stop(Exception):
    """Raised once the layer being calibrated returned: the rest of the model is not run."""


class _Replay(nn.Module):
    """Stands in for a decoder layer before the one running: returns what the last of them returned for the batch
    running. Keeps the layer's plain attributes (attention_type, layer_idx ...), which a model's loop may read."""

    def __init__(self, like: nn.Module, outputs: list, batch: list):
        super().__init__()
        for name, value in vars(like).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool)):
                setattr(self, name, value)
        self.outputs, self.batch = outputs, batch

    def forward(self, *args, **kwargs):
        return self.outputs[self.batch[0]]


class _LayerRun(nn.Module):
    """A calibration batch through the model up to decoder layer `index`, the layers before it replaying what they
    returned for that batch: the layer's output. The model's modules are under PREFIX (the task wrapper's `model`
    is the transformers model whose paths the compile names)."""

    PREFIX = "lm.model."

    def __init__(self, module: nn.Module, index: int, layers, before: list, replayed: list, batches: list):
        super().__init__()
        self.lm, self.batches, self.batch = module, batches, [0]
        self._stop_at = (layers[index],)  # a tuple: not registered as a submodule of its own
        for j in range(index):
            layers[j] = _Replay(before[j], replayed, self.batch)

    def forward(self, *args):
        # calibrated_codes hands back the batches' own tuples: which batch this is, for the replays
        return self.through(next(b for b, batch in enumerate(self.batches) if batch[0] is args[0]), args)

    def through(self, b: int, args: tuple):
        """Batch b (its arguments `args`) up to the layer: what the layer returned."""
        self.batch[0] = b
        out: list = []

        def stop(mod, a, o):
            out.append(o)
            raise _Stop

        handle = self._stop_at[0].register_forward_hook(stop)
        try:
            self.lm(*args)
        except _Stop:
            return out[0]
        finally:
            handle.remove()
        raise RuntimeError(f"calibration: decoder layer never ran on batch {b}")


class _Zeros(nn.Module):
    """Stands in for the input embeddings once the first layer ran: their values are replayed over."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.hidden)


class _Looked(nn.Module):
    """Stands in for the input embeddings during the first layer's runs: what they returned for each batch's ids."""

    def __init__(self, looked: dict):
        super().__init__()
        self.looked = looked

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.looked.get(_ids_key(ids))
        if out is None:
            raise RuntimeError("calibration: the input embeddings were asked for ids no calibration batch gave them")
        return out


def _ids_key(ids: torch.Tensor) -> tuple:
    return tuple(ids.shape), ids.detach().cpu().numpy().tobytes()


class LayerInputs:
    def __init__(self, module: nn.Module, batches: list[tuple], ck: LazyCheckpoint,
                 prepare: Callable[[nn.Module, str], None], fused_paths: list[str], log: Callable[[str], None]):
        """`module`: the task's wrapper around a skeleton of the checkpoint's model (`.model`); `prepare(model, key)`
        reads a decoder layer at full precision with its MoE layers fused."""
        self.module, self.model = module, module.model
        self.batches, self.ck, self.prepare, self.log = batches, ck, prepare, log
        self.fused_paths = fused_paths
        self.outputs: list = []  # per batch: what the last layer run returned
        self.pruned_outputs: list = []  # with pruning: the same from the pruned model (moec.prune_streamed)
        self.pruned_differ = False  # a layer lost experts: the pruned model's states are no longer the unpruned ones
        self.pruned_states = False  # carry the pruned model's states (GPTQ solves on them, the pruning's distance)
        self.next = 0  # the decoder layer whose turn it is
        self.dense = None  # --quant-dense: moec.quantize_dense_streamed.StreamedDense, each layer's Linears calibrated
        self.routing: list[LayerRouting] = []

    def advance(self, key: str, prune: Optional[Callable[[nn.Module, dict], None]] = None,
                held: Optional[Callable[[dict, dict], None]] = None) -> dict[str, torch.Tensor]:
        """Run the calibration batches through decoder layer `key` (layers come in order); each of its fused
        layers' inputs [T, H]. `held(fused, inputs)` (path -> FusedMoE, path -> inputs) runs while the layer is
        still read (its streamed experts kept as read). With `prune(model, routing)` (--prune-experts): the layer's routing statistics,
        measured on the unpruned model's states as in memory, are handed to `prune`, which slices the layer's
        fused layers; with `pruned_states` the batches then also run through the pruned layer from the pruned
        model's states (a second set, carried alongside once a layer lost experts), and the inputs returned are
        the pruned model's, as GPTQ has them in memory."""
        from moec.moe_layer import FusedMoE

        index = int(key.split(".")[1])
        if index != self.next:
            raise RuntimeError(f"calibration: layer {key} asked for before layers.{self.next}")
        layers, kept, embeddings, before = self._read_layer(key, index)
        fused: dict[str, FusedMoE] = {}
        for path in (p for p in self.fused_paths if layer_key(p + ".") == key):
            fused[path] = next(m for m in self.model.get_submodule(path).modules() if isinstance(m, FusedMoE))
        stats: dict[str, LayerRouting] = {}
        for path, f in fused.items():
            r = f.spec.route
            stats[path] = LayerRouting(path, f.spec.experts.num_experts, r.top_k if r is not None else 0,
                                       r.n_group if r is not None else 1)
        try:
            outputs, inputs = self._run(key, index, layers, before, self.outputs, fused)
            if self.dense is not None:  # on the layer as read, unpruned (its experts at full precision)
                self._calibrate_dense(key, index, layers, before)
            with torch.no_grad():
                for path, x in inputs.items():  # once over all the tokens: each expert read once more
                    _accumulate(stats[path], fused[path], x)
            if prune is not None:
                self.pruned_differ = prune(self.model, stats) or self.pruned_differ
                if not self.pruned_states:  # nothing reads the pruned model's activations
                    pass
                elif self.pruned_differ:  # until a layer loses an expert, the pruned model's states are these
                    del inputs
                    self.pruned_outputs, inputs = self._run(key, index, layers, before,
                                                            self.pruned_outputs or self.outputs, fused)
                else:
                    self.pruned_outputs = outputs
            if held is not None:
                held(fused, inputs)
        finally:
            self._drop_layer(index, layers, before, embeddings)
        self.outputs, self.next = outputs, index + 1
        self.routing += list(stats.values())
        read = kept.describe()
        self.log(f"  {key}: calibration data carried through ({sum(int(a[0].shape[0]) for a in self.batches)} "
                 f"sequences in {len(self.batches)} run(s)"
                 + (", and through the pruned model's layer" if self.pruned_states and self.pruned_differ else "")
                 + (f"; {read})" if read else ")"))
        return inputs

    def _read_layer(self, key: str, index: int) -> tuple:
        """Decoder layer `index` read at full precision with its MoE layers fused, its streamed experts kept as
        read (it runs once per batch and more: read once if they fit), the input embeddings stood in for
        (`_embeddings`): (the decoder's layers, the KeptExperts, the embeddings to put back, the layers before)."""
        _, layers = decoder_layers(self.model)
        self.prepare(self.model, key)
        kept = KeptExperts(KEPT_BYTES)
        for m in layers[index].modules():
            if isinstance(getattr(m, "stream", None), StreamedExperts):
                kept.wrap(m.stream)
        return layers, kept, self._embeddings(index), [layers[j] for j in range(index)]

    def _drop_layer(self, index: int, layers, before: list, embeddings: nn.Module) -> None:
        """After layer `index` ran: the layers before it and the embeddings put back, its weights dropped."""
        for j in range(index):
            layers[j] = before[j]
        self.model.set_input_embeddings(embeddings)
        release(self.model, buffers=False)
        release(layers[index], buffers=True)
        for m in layers[index].modules():  # a layer reading its experts one at a time: its reader goes too
            if getattr(m, "stream", None) is not None:
                m.stream = None

    def _run(self, key: str, index: int, layers, before: list, replayed: list, fused: dict) -> tuple[list, dict]:
        """The batches through layer `index`, the layers `before` it replaying `replayed` (what the last of them
        returned per batch): (what the layer returned per batch, each fused layer's inputs [T, H])."""
        from moec.calibration import CalibrationError

        inputs: dict[str, list] = {}
        handles = []
        for path, f in fused.items():
            def seen(mod, args, path=path):
                x = next(a for a in args if isinstance(a, torch.Tensor))
                inputs.setdefault(path, []).append(x.detach().reshape(-1, x.shape[-1]).clone())

            handles.append(f.register_forward_pre_hook(seen))
        outputs: list = []
        run = _LayerRun(self.module, index, layers, before, replayed, self.batches)
        try:
            with torch.no_grad():
                for b, args in enumerate(self.batches):
                    try:
                        out = run.through(b, args)
                    except MoecError:  # the checkpoint's own errors (a layer's experts are read as it runs)
                        raise
                    except Exception as exc:
                        shapes = ", ".join(str(list(t.shape)) for t in args)
                        raise CalibrationError(f"--calibration: the model fails on calibration batch {b} (shape "
                                               f"{shapes}) at {key}: {type(exc).__name__}: {str(exc)[:300]}.") from exc
                    outputs.append(out.detach() if isinstance(out, torch.Tensor) else out)
        finally:
            for h in handles:
                h.remove()
        return outputs, {path: torch.cat(xs) for path, xs in inputs.items()}

    def _calibrate_dense(self, key: str, index: int, layers, before: list) -> None:
        """GPTQ for the layer's dense Linears (moec.targets.onnxruntime.quantize_dense.calibrated_codes, the
        in-memory solver), their codes handed to `self.dense`. The model calibrated_codes runs is the model up to
        this layer, whose output it returns (`_LayerRun`): a group's GPTQ codes are kept where they move the layer's
        output on held-out batches less than round-to-nearest's (in memory: the model's output; the logits do not
        exist until the last layer ran)."""
        from moec.targets.onnxruntime.quantize_dense import calibrated_codes

        targets = [(p, self.model.get_submodule(p)) for p in self.dense.in_group(key)]
        # not those the checkpoint has usable codes for (found by where they were read: a shared expert moved)
        targets = [(p, m) for p, m in targets if type(m) is nn.Linear and not m.weight.is_meta
                   and self.dense.own_codes(p, m) is None]
        if not targets:
            return
        run = _LayerRun(self.module, index, layers, before, self.outputs, self.batches)
        codes = calibrated_codes(run, [(f"{_LayerRun.PREFIX}{p}", m) for p, m in targets], self.dense.spec,
                                 self.batches, self.dense.accuracy_level, self.log, f"{key}'s output")
        self.dense.calibrate({p[len(_LayerRun.PREFIX):]: c for p, c in codes.items()})

    def calibrate_head(self) -> None:
        """--quant-dense: the output head's codes, once the data went through every decoder layer (its group is
        written last): moec.gptq.quantize_rows on the head's inputs, every 5th token held out to choose GPTQ's
        codes or round-to-nearest's by the head's own output error there, which is the logits' (in memory: the
        logits on held-out batches). The inputs come from the model's forward with every layer replaying the last
        one's outputs (the final norm runs on them), stopped at the head (moec.passes.layers.capture_inputs).
        GPTQ solves HEAD_BLOCK_ELEMENTS weights' rows at a time, each block's codes put in MatMulNBits' layout as
        it is solved (a large-vocabulary head's int32 codes would be as large as its fp32 weight). A head with
        codes of the checkpoint's own keeps them."""
        from moec.calibration import CalibrationError
        from moec.gptq import quantize_rows
        from moec.passes.layers import capture_inputs
        from moec.quant import concat_nbits, nbits

        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        path = next((p for p in self.dense.in_group("") if self.model.get_submodule(p) is output), None)
        if path is None or not self.batches:  # no head among the MatMulNBits Linears
            return
        _, layers = decoder_layers(self.model)
        if self.next != len(layers):
            raise RuntimeError(f"calibration: the head asked for after {self.next} of {len(layers)} decoder layers")
        replayed = (self.pruned_outputs or self.outputs) if self.pruned_states else self.outputs
        batch = [0]
        with self._head_read(replayed, batch):
            head = self.model.get_submodule(path)
            if self.dense.own_codes(path, head) is not None:
                return
            xs = []
            for b, args in enumerate(self.batches):
                batch[0] = b
                try:
                    got = capture_inputs(self.module, [f"model.{path}"], args).get(f"model.{path}")
                except MoecError:
                    raise
                except Exception as exc:
                    raise CalibrationError(f"--calibration: the model fails on calibration batch {b} after its last "
                                           f"decoder layer: {type(exc).__name__}: {str(exc)[:300]}.") from exc
                if got is None or isinstance(got, str):  # the head never ran on its own inputs: left rounded
                    return
                xs.append(got[1].reshape(-1, got[1].shape[-1]))
            x = torch.cat(xs)
            del xs
            rows = max(1, HEAD_BLOCK_ELEMENTS // head.weight.shape[1])
            blocks, method = quantize_rows(head.weight.detach(), x, self.dense.spec, f"{path}.weight", rows, nbits)
            self.log(f"  {path}: {method} at {self.dense.spec.name} ({x.shape[0]} calibration tokens)")
            if blocks is None:  # rounded to nearest when the head is written, and said why
                self.dense.reasons[path] = method
            else:
                self.dense.calibrate({path: (concat_nbits(blocks), method)})

    @contextmanager
    def _head_read(self, replayed: list, batch: list) -> Iterator[None]:
        """The embeddings-and-head group read (but the input embeddings where they read alone: untied, as large as
        the head), every decoder layer replaying `replayed` (what the last one returned, per batch; the batch
        running is batch[0]) and the input embeddings stood in for by zeros: the model's own forward then runs
        only its final norm and head. Put back and released after."""
        _, layers = decoder_layers(self.model)
        embeddings = self.model.get_input_embeddings()
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        tied = (output is not None and output.weight is embeddings.weight) or \
            bool(getattr(self.model.config, "tie_word_embeddings", False))
        name, alone = self._embeddings_tensor(embeddings)
        before = [layers[j] for j in range(len(layers))]
        try:
            self.ck.materialise(self.model, "", skip=(lambda n: n == name) if alone and not tied else None)
            if hasattr(self.model, "tie_weights"):
                self.model.tie_weights()
            for j in range(len(layers)):
                layers[j] = _Replay(before[j], replayed, batch)
            self.model.set_input_embeddings(_Zeros(embeddings.weight.shape[1]))
            yield
        finally:
            for j in range(len(layers)):
                layers[j] = before[j]
            self.model.set_input_embeddings(embeddings)
            release(self.model, buffers=False)

    def _embeddings(self, index: int) -> nn.Module:
        """The input embeddings, read for the first layer (only their own tensor where it reads alone), looked up
        once per batch and replayed (`_Looked`), and stood in for by zeros after it. Returns the module to put
        back."""
        embeddings = self.model.get_input_embeddings()
        if index > 0:
            self.model.set_input_embeddings(_Zeros(embeddings.weight.shape[1]))
            return embeddings
        name, alone = self._embeddings_tensor(embeddings)
        self.ck.materialise(self.model, "", skip=(lambda n: n != name) if alone else None)
        # each batch's embeddings looked up once and the table released: a large vocabulary's (Qwen3-30B: 1.2 GiB
        # fp32) would otherwise sit beside the layer's kept experts for all its runs
        looked: dict = {}

        def seen(mod, args, out):
            looked[_ids_key(args[0])] = out.detach().clone()
            raise _Stop

        handle = embeddings.register_forward_hook(seen)
        try:
            with torch.no_grad():
                for args in self.batches:
                    try:
                        self.module(*args)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        release(embeddings, buffers=False)
        self.model.set_input_embeddings(_Looked(looked))
        return embeddings

    def _embeddings_tensor(self, embeddings: nn.Module) -> tuple[str, bool]:
        """The input embeddings' checkpoint tensor, and whether it reads on its own (LazyCheckpoint.one_by_one)."""
        name = f"{next(n for n, m in self.model.named_modules() if m is embeddings)}.weight"
        return name, name in (self.ck.one_by_one(self.model, "") or [])

    @contextmanager
    def final_outputs(self, failing: str) -> Iterator[Callable[[list], Iterator[torch.Tensor]]]:
        """The model's first output (the logits) from final states (what the last decoder layer returned, per
        batch), the head's group read once (`_head_read`). Yields `logits(states)`: each batch's logits in turn.
        `failing`: what a batch is, for the error a failing batch raises ("--quant auto: verification input")."""
        from moec.calibration import CalibrationError

        batch, replayed = [0], []

        def logits(states: list) -> Iterator[torch.Tensor]:
            replayed[:] = states
            for b, args in enumerate(self.batches):
                batch[0] = b
                try:
                    with torch.no_grad():
                        out = self.module(*args)
                except MoecError:
                    raise
                except Exception as exc:
                    raise CalibrationError(f"{failing} {b}: the model fails after its last decoder layer: "
                                           f"{type(exc).__name__}: {str(exc)[:300]}.") from exc
                yield (out[0] if isinstance(out, (tuple, list)) else out).detach()

        with self._head_read(replayed, batch):
            yield logits

    def pruning_distance(self):
        """--prune-experts with the pruned model's states carried (`pruned_states`), once the data went through
        every decoder layer: the pruned model's logits against the unpruned one's on the calibration data, as the
        in-memory pass measures them (passes.prune_experts.distance: relative L2 over every batch, top-1
        agreement). Holds the unpruned logits of every batch, as in memory."""
        from moec.passes.prune_experts import distance

        _, layers = decoder_layers(self.model)
        if not self.pruned_states or self.next != len(layers):
            raise RuntimeError("calibration: the pruning's distance asked for before both models ran every layer")
        with self.final_outputs("--prune-experts: calibration batch") as logits:
            reference = list(logits(self.outputs))
            return distance(reference, logits(self.pruned_outputs or self.outputs))

    def done(self) -> None:
        self.outputs, self.pruned_outputs = [], []


class CalibratedCodes(Coder):
    """moec.quantize_streamed's coder with --calibration: each expert GPTQ-solved on its routed calibration tokens
    (`use(path, fused, x)` gives a layer's inputs before its experts are coded)."""

    method = "gptq (calibrated)"
    calibrated = True
    reference = ("the dequantized model, layer by layer (each layer's experts calibrated on the calibration data "
                 "and dequantized; the codes read back as written)")

    def __init__(self, spec, calibration: str):
        """`calibration`: the --calibration value, for errors."""
        self.spec, self.calibration = spec, calibration
        self.packed: dict = {}
        self.layers: dict[str, tuple] = {}  # path -> (experts' spec, Routed, LayerChoice), while it is coded
        self.swiglu: dict[str, bool] = {}
        self.position: dict[str, dict[int, int]] = {}  # path -> checkpoint index -> index as written (`keep`)
        self.written: Optional[ArtifactTensors] = None

    def attach(self, packed: dict) -> None:
        """moec.quantize_streamed.StreamedQuantizer.packed: a layer's arrays while it is written."""
        self.packed = packed

    def use(self, path: str, fused, x: Optional[torch.Tensor]) -> None:
        """The layer's calibration inputs [T, H], as in memory (too few tokens for its experts: refused; None: the
        data never reached the layer, whose experts are then rounded to nearest)."""
        from moec.calibration import CalibrationError
        from moec.gptq import LayerChoice, min_tokens, route_tokens
        from moec.targets.onnxruntime.lower_moe_onnxruntime import plan_layer

        spec = fused.spec.experts
        self.swiglu[path] = plan_layer(fused.spec, fused.spec.route.top_k).activation_type == "swiglu"
        if x is None:
            return
        if x.shape[0] < spec.num_experts:
            raise CalibrationError(
                f"--calibration {self.calibration}: {x.shape[0]} calibration tokens reach {path}, fewer than its "
                f"{spec.num_experts} experts; calibrated quantization needs data that reaches every expert (more or "
                "longer sequences). Nothing was written.")
        with torch.no_grad():
            routed = route_tokens(fused, x)
        self.layers[path] = (spec, routed, LayerChoice(needed=min_tokens(spec.hidden, spec.intermediate)))

    def keep(self, path: str, experts: list[int]) -> None:
        # routing (route_tokens on the layer as written) and the written codes count the experts kept only
        self.position[path] = {e: i for i, e in enumerate(experts)}

    def codes(self, reader, path: str, e: int, stacked: dict, w) -> tuple:
        from moec.gptq import quantize_expert
        from moec.mixed_precision import spec_at

        at = spec_at(self.spec, path)  # --quant auto: the layer's own
        if path not in self.layers:  # the calibration data never reached the layer: rounded, as in memory
            from moec.quant import quantize

            return (quantize(w.w_gate_up, at, f"{path}.w_gate_up"), quantize(w.w_down, at, f"{path}.w_down"))
        spec, routed, choice = self.layers[path]
        with torch.no_grad():
            return quantize_expert(spec, w.w_gate_up[0], None if w.b_gate_up is None else w.b_gate_up[0],
                                   w.w_down[0], routed, self.position[path][e], at, path, choice)

    def describe(self, path: str) -> str:
        """How the layer's codes were chosen (the in-memory report's words), once all its experts were coded;
        its calibration inputs go."""
        return self.layers.pop(path)[2].describe() if path in self.layers else "round-to-nearest"

    def dequantized(self, path: str, e: int, w):
        """Expert e's weights as its written codes dequantize them (fc1's rows de-interleaved for SwiGLU)."""
        from moec.mixed_precision import spec_at
        from moec.ops import deinterleave_gate_up
        from moec.quant import PackedWeight, dequantize, unpack

        out = {}
        for prefix, field in (("fc1", "w_gate_up"), ("fc2", "w_down")):
            arrays = self._arrays(path, prefix, self.position[path][e])
            q = unpack(PackedWeight(arrays[prefix], arrays[f"{prefix}_scales"], arrays.get(f"{prefix}_zero_points"),
                                    spec_at(self.spec, path), getattr(w, field).shape[-1]), f"{path}.{prefix}")
            weight = dequantize(q)
            out[field] = deinterleave_gate_up(weight) if prefix == "fc1" and self.swiglu.get(path) else weight
        return replace(w, **out)

    def _arrays(self, path: str, prefix: str, e: int) -> dict[str, np.ndarray]:
        names = (prefix, f"{prefix}_scales", f"{prefix}_zero_points")
        if path in self.packed:  # being written
            arrays = {n: self.packed[path][n][e:e + 1] for n in names if n in self.packed[path]}
        elif self.written is not None:
            arrays = {n: self.written.read(path, n, e) for n in names if self.written.has(path, n)}
        else:
            raise RuntimeError(f"{path}: its calibrated codes are neither being written nor read back")
        if prefix not in arrays or f"{prefix}_scales" not in arrays:
            raise RuntimeError(f"{path}: the artifact has no {prefix} codes and scales to read its calibrated "
                               "experts back from")
        return arrays

    def read_back(self, model_path: str) -> None:
        """From now on the codes come from the written artifact."""
        self.written = ArtifactTensors(model_path)


class ArtifactTensors:
    """A written artifact's QMoE initializers, one expert's slice at a time (external data memory-mapped; small
    ones, stored inline, as they are)."""

    def __init__(self, model_path: str):
        import os

        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
        from onnx.numpy_helper import to_array

        self.dir = os.path.dirname(model_path)
        self.index: dict[str, object] = {}  # name -> (location, offset, dims, dtype) or the array itself
        for t in onnx.load(model_path, load_external_data=False).graph.initializer:
            if not t.name.rsplit(".", 1)[-1].startswith(("fc1", "fc2")):
                continue
            ext = {e.key: e.value for e in t.external_data}
            self.index[t.name] = ((ext["location"], int(ext.get("offset", 0)), tuple(t.dims),
                                   tensor_dtype_to_np_dtype(t.data_type)) if "location" in ext else to_array(t))

    def _name(self, path: str, array: str) -> Optional[str]:
        """The layer's initializer `array` (fc1, fc1_scales ...): under its module path, wrappers before it."""
        return next((n for n in self.index if f"{path}." in n and n.endswith(f".{array}")), None)

    def has(self, path: str, array: str) -> bool:
        return self._name(path, array) is not None

    def read(self, path: str, array: str, e: int) -> np.ndarray:
        """Expert e's slice [1, ...] of the layer's `array`."""
        import os

        entry = self.index[self._name(path, array)]
        if isinstance(entry, np.ndarray):
            return entry[e:e + 1]
        location, offset, dims, dtype = entry
        per = int(np.prod(dims[1:])) * np.dtype(dtype).itemsize
        data = np.memmap(os.path.join(self.dir, location), dtype=dtype, mode="r", offset=offset + e * per,
                         shape=(1,) + dims[1:])
        return np.array(data)

"""Verify an artifact against its checkpoint layer by layer, holding one decoder layer's weights at a time.

Eager side: the checkpoint's model with parameters on the meta device, wrapped as the artifact's graph was
(logits, or the KV-cache decoder); a hook materialises each decoder layer from the checkpoint just before it
runs, records its output hidden states and drops its weights after. Artifact side: moec.segmented_run executes
the artifact segment by segment. Per probe input, each decoder layer's output is compared with the hidden
states the artifact's segment of that layer hands on (the value of the same shape), and every output of the
graph (logits, and a decoder's present keys and values) with the eager one. A layer whose error exceeds the
tolerance is named; the first such layer is where the artifact went wrong, the ones after it inherit its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from moec.heap import trim
from moec.lazy_checkpoint import LazyCheckpoint, decoder_layers, release
from moec.numerics import compare_tensors

# (model, layer group, skip=None): read the group's weights into the model, but the checkpoint tensors `skip` names
Prepare = Callable[..., None]
Wrap = Callable[[nn.Module], nn.Module]  # the transformers model -> the module whose graph the artifact is


@dataclass
class LayerError:
    layer: str
    rel_l2: float
    max_abs: float


@dataclass
class ProbeResult:
    name: str
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]  # the artifact's
    rel_l2: float  # the worst of the graph's outputs
    max_abs: float
    worst_output: str
    layers: list[LayerError] = field(default_factory=list)
    vs_fp32: Optional[dict] = None  # with `prepare` (e.g. quantized experts): the first output against full precision
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # the eager reference's outputs


@dataclass
class LayerVerification:
    probes: list[ProbeResult]
    against: str = "eager PyTorch"

    @property
    def layers(self) -> list[LayerError]:
        """Per decoder layer, its worst error over the probes."""
        worst: dict[str, LayerError] = {}
        for p in self.probes:
            for l in p.layers:
                if l.layer not in worst or l.rel_l2 > worst[l.layer].rel_l2:
                    worst[l.layer] = l
        return list(worst.values())

    @property
    def vs_fp32(self) -> Optional[dict]:
        rows = [p.vs_fp32 for p in self.probes if p.vs_fp32 is not None]
        return max(rows, key=lambda r: r["rel_l2"]) if rows else None

    def first_failing(self, tolerance: float) -> Optional[LayerError]:
        return next((l for l in self.layers if l.rel_l2 > tolerance), None)

    def passed(self, tolerance: float) -> bool:
        return all(p.rel_l2 <= tolerance for p in self.probes) and self.first_failing(tolerance) is None

    def numerics(self, tolerance: float) -> dict:
        return {
            "verification": "layer by layer: eager PyTorch with one decoder layer materialised at a time against "
                            "ONNX Runtime running the artifact one segment (layer) at a time",
            "against": self.against, "tolerance_rel_l2": tolerance, "passed": self.passed(tolerance),
            "inputs": [{"input": p.name, "rel_l2": p.rel_l2, "max_abs": p.max_abs, "output": p.worst_output,
                        "passed": p.rel_l2 <= tolerance} for p in self.probes],
            "layers": [{"layer": l.layer, "rel_l2": l.rel_l2, "max_abs": l.max_abs} for l in self.layers],
        }

    def failure(self, tolerance: float) -> str:
        bad = self.first_failing(tolerance)
        worst = max(self.probes, key=lambda p: p.rel_l2)
        where = (f"; it starts at {bad.layer} (relative L2 {bad.rel_l2:.3g} on that layer's output)" if bad else
                 "; every layer's output is within tolerance, so the difference is after the last layer")
        return (f"ONNX Runtime output differs from {self.against}: {worst.worst_output} relative L2 "
                f"{worst.rel_l2:.3g} on {worst.name} (tolerance {tolerance:g}){where}.")


def verify_layer_by_layer(model_path: str, ck: LazyCheckpoint, tolerance: float, inputs: list[tuple],
                          input_names: list[str], output_names: list[str], wrap: Wrap,
                          log: Callable[[str], None] = lambda msg: None,
                          prepare: Optional[Prepare] = None, prepare_fp32: Optional[Prepare] = None,
                          against: Optional[str] = None, reference_is_fp32: bool = False) -> LayerVerification:
    """`prepare(model, group)` reads a layer group as the exact reference (e.g. with quantized experts,
    dequantized); without it the checkpoint's own layers are the reference. With it, `prepare_fp32` reads the
    full-precision model the error against fp32 is measured on (default: the checkpoint's own layers), unless
    `reference_is_fp32` says the reference is that model already (a pre-quantized checkpoint's own weights):
    then the eager model runs once."""
    from moec.segmented_run import run_segmented

    probes = []
    for i, args in enumerate(inputs):
        name = f"probe{i} ({', '.join(f'{n} {tuple(a.shape)}' for n, a in zip(input_names, args) if a.dim() <= 2)})"
        eager_layers, eager = eager_by_layer(wrap(ck.skeleton()), args, prepare or ck.materialise, log, ck)
        fp32 = None
        if prepare is not None:
            fp32 = eager if reference_is_fp32 else eager_by_layer(wrap(ck.skeleton()), args,
                                                                   prepare_fp32 or ck.materialise, lambda m: None, ck)[1]
        feeds = {n: a.numpy() for n, a in zip(input_names, args)}
        run = run_segmented(model_path, feeds, log)
        errors = {n: compare_tensors(e, torch.from_numpy(run.outputs[n])) for n, e in zip(output_names, eager)}
        worst = max(errors, key=lambda n: errors[n].rel_l2)
        layers = []
        for key, expected in eager_layers.items():
            handed = [v for s, produced in run.handed_on if s.name == key for v in produced.values()
                      if tuple(v.shape) == tuple(expected.shape)]
            if not handed:
                raise ValueError(f"the artifact's segment for {key} hands on no tensor of shape {tuple(expected.shape)}")
            best = min((compare_tensors(expected, torch.from_numpy(v)) for v in handed), key=lambda e: e.rel_l2)
            layers.append(LayerError(key, float(best.rel_l2), float(best.max_abs)))
        vs_fp32 = None
        if fp32 is not None:
            got = torch.from_numpy(run.outputs[output_names[0]])
            c = compare_tensors(fp32[0], got)
            vs_fp32 = {"rel_l2": float(c.rel_l2), "cosine": float(c.cosine), "max_abs": float(c.max_abs),
                       # how often the top-1 (argmax of the last dim) still agrees: pruning's report gives it
                       "top1_agreement": float((fp32[0].argmax(-1) == got.argmax(-1)).float().mean())}
        probes.append(ProbeResult(name, feeds, {n: run.outputs[n] for n in output_names},
                                  float(errors[worst].rel_l2), float(errors[worst].max_abs), worst, layers, vs_fp32,
                                  {n: e.detach().numpy() for n, e in zip(output_names, eager)}))
    return LayerVerification(probes, against or ("the dequantized reference" if prepare else "eager PyTorch"))


def eager_by_layer(module: nn.Module, args: tuple, prepare: Prepare, log: Callable[[str], None],
                   ck: Optional[LazyCheckpoint] = None):
    """Each decoder layer's output hidden states and the module's outputs (a tuple), one layer's weights in memory
    at a time. `module` wraps the transformers model as `.model`. With `ck`, an untied output head is read only
    when it runs and the input embeddings are dropped once they ran (with a large vocabulary, each is more than
    a decoder layer: GPT-OSS's are 2.2 GiB apiece in fp32)."""
    model = module.model
    head = head_apart(model, ck) if ck is not None else None
    if head is None:
        prepare(model, "")
    else:
        prepare(model, "", skip=head.__contains__)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if hasattr(model, "tie_weights") and (out is None or getattr(out, "weight", None) is None or out.weight.is_meta):
        model.tie_weights()  # only a head `prepare` left unread: one it read (e.g. dequantized, untied) stays its own
    _, layers = decoder_layers(model)
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    read = []
    if head is not None:
        def drop_embeddings(mod, a, out):  # once: the model's one lookup is done
            release(mod)
            handles.remove(dropping)
            dropping.remove()

        def read_head(mod, a):
            if not read:
                prepare(model, "", skip=lambda name: name not in head)
                read.append(True)

        dropping = model.get_input_embeddings().register_forward_hook(drop_embeddings)
        handles += [dropping, model.get_output_embeddings().register_forward_pre_hook(read_head)]
    for i, layer in enumerate(layers):
        key = f"layers.{i}"

        def before(mod, a, key=key):
            prepare(model, key)

        def after(mod, a, out, key=key):
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            outputs[key] = hidden.detach().clone()
            release(mod, buffers=True)
            for m in mod.modules():  # a layer computing its experts one at a time: what it reads from goes too
                if getattr(m, "stream", None) is not None:
                    m.stream = None
            trim()
            log(f"  eager {key}")

        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        with torch.no_grad():
            result = module(*args)
    finally:
        for h in handles:
            h.remove()
        release(model)
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if head is not None and not read:  # the head's weight was used without calling its module
        raise ValueError(f"{type(model).__name__}: its output head ({', '.join(sorted(head))}) never ran as a module, "
                         "so the layer-by-layer reference could not read it when needed")
    return outputs, tuple(t.detach() for t in result)


def head_apart(model: nn.Module, ck: LazyCheckpoint) -> Optional[set[str]]:
    """The checkpoint names of the output head's weights, when it can be read apart from the rest of the
    embeddings-and-head group: untied from the input embeddings, and the group's tensors each read on their own
    (LazyCheckpoint.one_by_one). None otherwise."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, out = (get_in() if get_in else None), (get_out() if get_out else None)
    if emb is None or out is None or getattr(out, "weight", None) is getattr(emb, "weight", None):
        return None
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    names = ck.one_by_one(model, "")
    path = next((n for n, m in model.named_modules() if m is out), None)
    head = {f"{path}.{n}" for n, _ in out.named_parameters()} if path else set()
    return head if names and head and head <= set(names) and len(head) < len(names) else None

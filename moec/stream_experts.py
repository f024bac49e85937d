"""Expert weights read from a checkpoint one expert at a time: what lets an out-of-core compile quantize a layer
whose experts alone exceed its memory bound (OLMoE-1B-7B: 1.5 GiB of fp32 experts a layer, 0.2 GiB at int4).

`ExpertReader` serves, for a fused MoE layer and an expert index e, that expert's weights in two forms:
- `hf(path, e)`: the layer's own stacked parameters sliced to expert e ([1, ...], the model's layout), for
  checking the fusion against the layer as written;
- `canonical(path, e)`: the fused layer's [1, rows, H] / [1, H, I] weights (and biases), in the reading the
  miniature's fusion chose.
It reads only expert e's tensors: `<layer>.<...>.<e>.<...>` names (renamed to expert 0) and [E, ...] tensors
stored stacked (sliced to [e:e+1]), through transformers' own checkpoint conversion into a one-expert copy of
the model (the config with one expert, on the meta device), so every family's renamings and stacking apply as
from_pretrained would. The last expert read is kept (a layer asks for its gate/up and down one after the other).

`StreamedExperts` computes a FusedMoE's routed experts from such a reader (FusedMoE.stream), one expert at a
time over the tokens routed to it, with the expert's weights as given (fp32, or quantized and dequantized):
the eager reference of a streamed layer. `LazyStack` stands in for a stacked parameter of the layer as
written, reading an expert when it is indexed.

Refuses (SourceError): a checkpoint whose expert tensors transformers can't load into the one-expert model,
a layer whose experts are a ModuleList of modules or whose reading the miniature did not record (those layers
are read whole, as before, by the caller).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from moec.errors import SourceError
from moec.external_data import _LAYER
from moec.lazy_checkpoint import LazyCheckpoint, load_converted, parameters_on_meta, release
from moec.miniature import EXPERT_COUNT_KEYS, TOP_K_KEYS

# routing keys a one-expert config must not leave larger than its single expert
_ONE_KEYS = EXPERT_COUNT_KEYS + TOP_K_KEYS + ("n_group", "topk_group", "num_experts_per_token")


@dataclass
class ExpertSlice:
    """One expert's weights in the fused layer's canonical layout, each [1, ...]."""

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    b_gate_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]


@dataclass
class StreamedLayer:
    """A fused layer whose experts are read one at a time: its group, expert count, the reading its fusion
    chose, and where its stacked expert parameters sit (names under the layer, and which are [E, ...])."""

    path: str
    group: str
    num_experts: int
    hidden: int
    layout: str
    stacked: dict[str, str]  # the reading's parameter name -> its dotted name under the layer


def expert_index(name: str) -> Optional[int]:
    """The expert a checkpoint tensor belongs to: the first integer component after its layer's index
    (`model.layers.3.mlp.experts.5.up_proj.weight` -> 5), None for the layer's other tensors."""
    m = _LAYER.search(name)
    if m is None:
        return None
    for part in name[m.end():].split("."):
        if part.isdigit():
            return int(part)
    return None


def _as_expert_zero(name: str) -> str:
    m = _LAYER.search(name)
    head, parts = name[: m.end()], name[m.end():].split(".")
    i = next(i for i, part in enumerate(parts) if part.isdigit())
    return head + ".".join(parts[:i] + ["0"] + parts[i + 1:])


def one_expert_config(config):
    """The config with one expert (and top-k, groups 1): the model it builds holds a single expert per layer."""
    d = config.to_dict()
    over = {k: 1 for k in _ONE_KEYS if isinstance(d.get(k), int)}
    for key, value in d.items():  # sub-configs (a multimodal model's text_config)
        if isinstance(value, dict) and any(isinstance(value.get(k), int) for k in EXPERT_COUNT_KEYS):
            over[key] = {**value, **{k: 1 for k in _ONE_KEYS if isinstance(value.get(k), int)}}
    return type(config)(**{**d, **over})


class ExpertReader:
    def __init__(self, ck: LazyCheckpoint, config, layers: list[StreamedLayer]):
        self.ck = ck
        self.layers = {l.path: l for l in layers}
        self.counts = {l.group: l.num_experts for l in layers}
        try:
            with parameters_on_meta():
                from transformers import AutoModelForCausalLM

                self.one = AutoModelForCausalLM.from_config(one_expert_config(config), dtype=torch.float32).eval()
        except Exception as exc:
            raise SourceError(f"'{ck.path}': the model of its config with one expert does not build "
                              f"({type(exc).__name__}: {str(exc)[:300]}); compile without --quant out of core, or "
                              "with --out-of-core off.") from exc
        self._last: Optional[tuple[str, int, dict[str, torch.Tensor]]] = None

    def is_expert_tensor(self, name: str) -> bool:
        """A checkpoint tensor read expert by expert (never whole): per-expert names and [E, ...] 3-D tensors."""
        group = _group(name)
        e = self.counts.get(group)
        if e is None:
            return False
        shape = self.ck.shapes.get(name, ())
        return expert_index(name) is not None or (len(shape) == 3 and shape[0] == e)

    def meta_names(self) -> frozenset:
        """The model's parameters left on the meta device by is_expert_tensor's tensors."""
        return frozenset(f"{l.path}.{dotted}" for l in self.layers.values() for dotted in l.stacked.values())

    def hf(self, full: nn.Module, path: str, e: int) -> dict[str, torch.Tensor]:
        """Expert e's stacked parameters as the layer holds them, by reading name, each [1, ...]. `full`: the
        layer in the model being filled, whose tensors stored stacked beside the experts' (biases) are read."""
        if self._last is not None and self._last[:2] == (path, e):
            return self._last[2]
        layer = self.layers[path]
        if not 0 <= e < layer.num_experts:
            raise IndexError(f"{path}: expert {e} of {layer.num_experts}")
        self._last = None  # the previous expert's tensors go before this one's are read
        self._load(layer, e)
        one = self.one.get_submodule(path)
        out = {}
        for key, dotted in layer.stacked.items():
            t = _get(one, dotted)
            if t.is_meta:  # not in the expert's tensors: stored stacked beside them (a [E, N] bias), already read
                t = _get(full, dotted)
                if t.is_meta:
                    raise SourceError(f"'{self.ck.path}': no tensor of the checkpoint fills {path}.{dotted} for "
                                      f"expert {e}. Nothing was written.")
                t = t[e:e + 1] if t.dim() and t.shape[0] == layer.num_experts else t
            out[key] = t.detach().clone()
        release(one)
        self._last = (path, e, out)
        return out

    def canonical(self, full: nn.Module, path: str, e: int) -> ExpertSlice:
        """Expert e in the fused layer's layout (the miniature's reading applied to the one expert)."""
        from moec.passes.fusion_rules import ExpertSource, expert_readings

        layer = self.layers[path]
        source = ExpertSource(1, stacked=self.hf(full, path, e))
        for _, reading in expert_readings(source, layer.hidden):
            if reading.layout == layer.layout:
                return ExpertSlice(reading.w_gate_up.contiguous(), reading.w_down.contiguous(),
                                   reading.b_gate_up, reading.b_down)
        raise SourceError(f"{path}: expert {e} read alone has no '{layer.layout}' reading; compile with "
                          "--out-of-core off.")

    def _load(self, layer: StreamedLayer, e: int) -> None:
        from safetensors import safe_open

        names = self.ck.groups.get(layer.group, [])
        with contextlib.ExitStack() as stack:  # mapped only while this expert is read
            state = {}
            for name in names:
                shape = self.ck.shapes.get(name, ())
                index = expert_index(name)
                if index is None and not (len(shape) == 3 and shape[0] == layer.num_experts):
                    continue
                if index is not None and index != e:
                    continue
                file = self.ck.files[name]
                try:
                    f = stack.enter_context(safe_open(file, "pt"))
                    state[_as_expert_zero(name) if index is not None else name] = (
                        f.get_slice(name) if index is not None else f.get_slice(name)[e:e + 1])
                except Exception as exc:
                    raise SourceError(f"'{file}': cannot read tensor '{name}' ({type(exc).__name__}: {exc}).") from exc
            if not state:
                raise SourceError(f"'{self.ck.path}': no tensor of {layer.path}'s expert {e} in the checkpoint. "
                                  "Nothing was written.")
            try:
                info = load_converted(self.one, state)
            except Exception as exc:
                raise SourceError(f"'{self.ck.path}': loading expert {e} of {layer.path} failed: "
                                  f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self.ck.check_loading(info)


def _group(name: str) -> str:
    from moec.external_data import layer_key

    return layer_key(name)


def _get(module: nn.Module, dotted: str) -> torch.Tensor:
    owner, _, leaf = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


class StreamedExperts:
    """FusedMoE.stream: the routed experts computed one expert at a time, `fetch(e)` giving expert e's weights.
    The same op as the stacked computation (moec.experts), on the tokens routed to each expert."""

    def __init__(self, fused, fetch: Callable[[int], ExpertSlice]):
        self.spec, self.fetch = fused.spec.experts, fetch

    def __call__(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = self.spec
        out = torch.zeros_like(flat)
        for e in torch.unique(ids).tolist():
            rows, slot = (ids == e).nonzero(as_tuple=True)
            w = self.fetch(int(e))
            cast = [None if t is None else t.to(flat.dtype) for t in (w.w_gate_up, w.w_down, w.b_gate_up, w.b_down)]
            y = torch.ops.moec.experts(flat[rows], torch.zeros_like(ids[rows, :1]), weights[rows, slot][:, None],
                                       *cast, x.activation, x.gated,
                                       x.alpha, x.beta, x.limit, x.weight_on_input)
            out.index_add_(0, rows, y)
        return out


class LazyStack:
    """Stands in for a layer's stacked [E, ...] expert parameter: `stack[e]` reads expert e. For running the
    layer as written (its eager experts index the stack expert by expert) without its experts in memory."""

    def __init__(self, like: torch.Tensor, read: Callable[[int], torch.Tensor]):
        self.shape, self.dtype, self.device, self.read = like.shape, torch.float32, torch.device("cpu"), read

    def __getitem__(self, index) -> torch.Tensor:
        return self.read(int(index))

    def __len__(self) -> int:
        return int(self.shape[0])


@contextlib.contextmanager
def lazy_experts(layer: nn.Module, streamed: StreamedLayer, reader: ExpertReader):
    """The layer as written with its stacked expert parameters read expert by expert (and transformers' eager
    experts implementation, which indexes them so)."""
    for key, dotted in streamed.stacked.items():
        owner_name, _, leaf = dotted.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        t = getattr(owner, leaf)
        if t.is_meta and t.dim() == 3:
            owner._parameters.pop(leaf, None)
            object.__setattr__(owner, leaf, LazyStack(t, lambda e, key=key: reader.hf(layer, streamed.path, e)[key][0]))
    configs = {id(m.config): m.config for m in layer.modules()
               if getattr(getattr(m, "config", None), "_experts_implementation", None) not in (None, "eager")}
    before = {k: c._experts_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation_internal = "eager"  # not the setter: it would rewrite every sub-config
        yield layer
    finally:
        for k, c in configs.items():
            c._experts_implementation_internal = before[k]

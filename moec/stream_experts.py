"""Expert weights read from a checkpoint one expert at a time: what lets an out-of-core compile quantize a layer
whose experts alone exceed its memory bound (OLMoE-1B-7B: 1.5 GiB of fp32 experts a layer, 0.2 GiB at int4).

`ExpertReader` serves, for a fused MoE layer and an expert index e, that expert's weights in two forms (and
other tensors in the first):
- `hf(path, e)`: the layer's own stacked parameters sliced to expert e ([1, ...], the model's layout), for
  checking the fusion against the layer as written;
- `canonical(path, e)`: the fused layer's [1, rows, H] / [1, H, I] weights (and biases), in the reading the
  miniature's fusion chose (a one-expert fusion_rules.ExpertWeights);
- `convert(path, e, values, like)`: `hf`'s form of tensors laid out like the expert's weights, standing in for
  them in the checkpoint (a per-Linear checkpoint's codes, its scales per element: moec.packed_stream).
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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from moec.errors import SourceError
from moec.external_data import _LAYER
from moec.lazy_checkpoint import LazyCheckpoint, load_converted, parameters_on_meta, release
from moec.miniature import EXPERT_COUNT_KEYS, GROUP_KEYS, TOP_K_KEYS, TOPK_GROUP_KEYS

if TYPE_CHECKING:
    from moec.passes.fusion_rules import ExpertWeights

# routing keys a one-expert config must not leave larger than its single expert
_ONE_KEYS = EXPERT_COUNT_KEYS + TOP_K_KEYS + GROUP_KEYS + TOPK_GROUP_KEYS + ("num_experts_per_token",)


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

    @property
    def block(self) -> str:
        """The MoE module's name under its decoder layer ('mlp', 'block_sparse_moe')."""
        m = _LAYER.search(self.path + ".")
        return self.path[m.end():].split(".")[0] if m else ""


def _expert_position(name: str) -> Optional[int]:
    """Where in a checkpoint name (its components after the layer index) the expert index sits: the integer right
    after an `experts`-like component (`mlp.experts.5.up_proj.weight`; not `shared_experts`, not LongCat's
    `mlps.0`)."""
    m = _LAYER.search(name)
    if m is None:
        return None
    parts = name[m.end():].split(".")
    for i in range(1, len(parts)):
        before = parts[i - 1].lower()
        if parts[i].isdigit() and "expert" in before and "shared" not in before:
            return i
    return None


def expert_index(name: str) -> Optional[int]:
    """The expert a checkpoint tensor belongs to (`model.layers.3.mlp.experts.5.up_proj.weight` -> 5), None for
    the layer's other tensors."""
    at = _expert_position(name)
    return None if at is None else int(name[_LAYER.search(name).end():].split(".")[at])


def _as_expert_zero(name: str) -> str:
    m = _LAYER.search(name)
    head, parts = name[: m.end()], name[m.end():].split(".")
    parts[_expert_position(name)] = "0"
    return head + ".".join(parts)


def _stored_stacked(name: str, shape: tuple, layer: StreamedLayer) -> bool:
    """A tensor holding every expert of `layer` stacked on disk: 3-D, E first, under the layer's own MoE module
    (GPT-OSS's `mlp.experts.gate_up_proj`, Granite-MoE's `block_sparse_moe.input_linear.weight`; not
    JetMoE's attention experts, which sit under its attention)."""
    m = _LAYER.search(name)
    return (m is not None and len(shape) == 3 and shape[0] == layer.num_experts
            and name[m.end():].split(".")[0] == layer.block)


def one_expert_config(config):
    """The config with one expert (and top-k, groups 1): the model it builds holds a single expert per layer."""
    d = config.to_dict()
    over = {k: 1 for k in _ONE_KEYS if isinstance(d.get(k), int)}
    for key, value in d.items():  # sub-configs (a multimodal model's text_config)
        if isinstance(value, dict) and any(isinstance(value.get(k), int) for k in EXPERT_COUNT_KEYS):
            over[key] = {**value, **{k: 1 for k in _ONE_KEYS if isinstance(value.get(k), int)}}
    return type(config)(**{**d, **over})


class ExpertReader:
    def __init__(self, ck: LazyCheckpoint, config, layers: list[StreamedLayer], log: Callable[[str], None]):
        """Keeps the layers the one-expert model can serve: it must build, and hold each layer's stacked expert
        parameters with one expert (a family that turns a one-expert block into a dense MLP, or whose config
        insists on more experts, has its layers read whole, as before)."""
        self.ck = ck
        self._last: Optional[tuple[str, int, dict[str, torch.Tensor]]] = None
        self.layers: dict[str, StreamedLayer] = {}
        try:
            with parameters_on_meta():
                from transformers import AutoModelForCausalLM

                self.one = AutoModelForCausalLM.from_config(one_expert_config(config), dtype=torch.float32).eval()
        except Exception as exc:
            log(f"  experts read whole (the model of the config with one expert does not build: "
                f"{type(exc).__name__}: {str(exc)[:200]})")
            return
        for l in layers:
            try:
                one = self.one.get_submodule(l.path)
                ok = all(_get(one, d).dim() < 3 or _get(one, d).shape[0] == 1 for d in l.stacked.values())
            except Exception:
                ok = False
            names = ck.groups.get(l.group, [])
            if not ok:
                log(f"  {l.path}: experts read whole (the model with one expert has no such experts there)")
            elif not any(expert_index(n) is not None or _stored_stacked(n, ck.shapes.get(n, ()), l) for n in names):
                # e.g. stored stacked under a block name the conversion renames: not told apart from the layer's own
                log(f"  {l.path}: experts read whole (no checkpoint tensor of {l.group} reads as one expert's)")
            else:
                self.layers[l.path] = l

    def is_expert_tensor(self, name: str) -> bool:
        """A checkpoint tensor read expert by expert (never whole): per-expert names and [E, ...] 3-D tensors
        stored stacked under a streamed layer's MoE module."""
        group = _group(name)
        layers = [l for l in self.layers.values() if l.group == group]
        return bool(layers) and (expert_index(name) is not None or any(
            _stored_stacked(name, self.ck.shapes.get(name, ()), l) for l in layers))

    def clear(self) -> None:
        """Drop the expert kept from the last read (a layer done with)."""
        self._last = None

    def meta_names(self) -> frozenset:
        """The model's parameters left on the meta device by is_expert_tensor's tensors."""
        return frozenset(f"{l.path}.{dotted}" for l in self.layers.values() for dotted in l.stacked.values())

    def hf(self, beside: dict[str, torch.Tensor], path: str, e: int) -> dict[str, torch.Tensor]:
        """Expert e's stacked parameters as the layer holds them, by reading name, each [1, ...]. `beside`: the
        layer's own [E, ...] tensors stored beside the experts' (GPT-OSS's biases), by reading name."""
        if self._last is not None and self._last[:2] == (path, e):
            return self._last[2]
        layer = self.layers[path]
        if not 0 <= e < layer.num_experts:
            raise IndexError(f"{path}: expert {e} of {layer.num_experts}")
        self._last = None  # the previous expert's tensors go before this one's are read
        out = self._converted(beside, path, e)
        self._last = (path, e, out)
        return out

    def convert(self, path: str, e: int, values: Callable[[str], Optional[torch.Tensor]],
                like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`hf`'s form of other tensors laid out like expert e's weights: `values(name)` stands in for the checkpoint
        tensor `name` where it gives one (a per-Linear checkpoint's codes, its scales per element), through the same
        conversion (gate/up concatenated, renamed, transposed as the family's loading does). `like`: `hf`'s own
        result for expert e, whose tensors fill what the checkpoint stores beside the experts."""
        return self._converted({}, path, e, values, like)

    def _converted(self, beside: dict[str, torch.Tensor], path: str, e: int, values=None,
                   like: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        layer = self.layers[path]
        self._load(layer, e, values)
        one = self.one.get_submodule(path)
        out = {}
        for key, dotted in layer.stacked.items():
            t = _get(one, dotted)
            if t.is_meta and like is not None:
                t = like[key]
            elif t.is_meta:  # not in the expert's tensors: stored stacked beside them (a [E, N] bias), already read
                t = beside.get(key)
                if t is None:
                    raise SourceError(f"'{self.ck.path}': no tensor of the checkpoint fills {path}.{dotted} for "
                                      f"expert {e}. Nothing was written.")
                t = t[e:e + 1] if t.dim() and t.shape[0] == layer.num_experts else t
            out[key] = t.detach().clone()
        release(self.one)
        return out

    def canonical(self, beside: dict[str, torch.Tensor], path: str, e: int) -> "ExpertWeights":
        """Expert e in the fused layer's layout (the miniature's reading applied to the one expert)."""
        return self.read_as_fused(path, self.hf(beside, path, e), e)

    def read_as_fused(self, path: str, stacked: dict[str, torch.Tensor], e: int) -> "ExpertWeights":
        """One expert's tensors as the layer holds them (`hf`'s form) in the fused layer's layout: the same
        reading applies to any tensors laid out like the weights (a checkpoint's codes, its scales per element)."""
        from moec.passes.fusion_rules import ExpertSource, expert_readings

        layer = self.layers[path]
        source = ExpertSource(1, stacked=stacked)
        for _, reading in expert_readings(source, layer.hidden):
            if reading.layout == layer.layout:
                return replace(reading, w_gate_up=reading.w_gate_up.contiguous(),
                               w_down=reading.w_down.contiguous())
        raise SourceError(f"{path}: expert {e} read alone has no '{layer.layout}' reading; compile with "
                          "--out-of-core off.")

    def _load(self, layer: StreamedLayer, e: int, values=None) -> None:
        from safetensors import safe_open

        names = self.ck.groups.get(layer.group, [])
        with contextlib.ExitStack() as stack:  # mapped only while this expert is read
            state = {}
            for name in names:
                index = expert_index(name)
                if index is None and not _stored_stacked(name, self.ck.shapes.get(name, ()), layer):
                    continue
                if index is not None and index != e:
                    continue
                file = self.ck.files[name]
                key = _as_expert_zero(name) if index is not None else name
                if key in state:
                    raise SourceError(f"'{file}': tensors '{name}' and another both read as {key} for expert {e}; "
                                      "compile with --out-of-core off.")
                given = values(name) if values is not None else None
                if given is not None:
                    state[key] = given
                    continue
                if name in self.ck.decoded:  # decoded from what stores it (moec.mxfp4_stream): its own errors
                    state[key] = self.ck.decoded[name](None if index is not None else e)
                    continue
                try:
                    f = stack.enter_context(safe_open(file, "pt"))
                    state[key] = self.ck.read(f, name, None if index is not None else e)
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


def beside_experts(layer: nn.Module, streamed: StreamedLayer) -> dict[str, torch.Tensor]:
    """The layer's stacked expert tensors that were read with the layer (not expert by expert), by reading name."""
    return {key: _get(layer, dotted) for key, dotted in streamed.stacked.items() if not _get(layer, dotted).is_meta}


def _get(module: nn.Module, dotted: str) -> torch.Tensor:
    owner, _, leaf = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


class StreamedExperts:
    """FusedMoE.stream: the routed experts computed one expert at a time, `fetch(e)` giving expert e's weights.
    The same op as the stacked computation (moec.experts), on the tokens routed to each expert."""

    def __init__(self, fused, fetch: Callable[[int], "ExpertWeights"]):
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


class KeptExperts:
    """Experts read one at a time, kept once read while they fit in `budget` bytes (fp32 weights and biases): a
    layer run many times over on the same weights (calibration's batches, carried and held out) reads each kept
    expert from the checkpoint once rather than once a run. Those that don't fit are read each time. One budget
    for every fused layer it wraps (`wrap`); dropped with the streams it wraps."""

    def __init__(self, budget: int):
        self.budget, self.held = budget, 0
        self.kept: dict[tuple[int, int], "ExpertWeights"] = {}
        self.missed: set[tuple[int, int]] = set()

    def wrap(self, stream: StreamedExperts) -> None:
        fetch, layer = stream.fetch, id(stream)

        def kept(e: int) -> "ExpertWeights":
            w = self.kept.get((layer, e))
            if w is not None:
                return w
            w = fetch(e)
            n = sum(t.numel() * t.element_size() for t in (w.w_gate_up, w.w_down, w.b_gate_up, w.b_down)
                    if t is not None)
            if self.held + n <= self.budget:
                # without the tensors it was read from (a reading's views of the checkpoint's own)
                w = replace(w, gate_up_sources=None, down_sources=None)
                self.kept[(layer, e)], self.held = w, self.held + n
            else:
                self.missed.add((layer, e))
            return w

        stream.fetch = kept

    def describe(self) -> str:
        """How many of the experts asked for were kept ("" when none was asked for)."""
        if not self.kept and not self.missed:
            return ""
        if not self.missed:
            return "each expert read once"
        return (f"{len(self.kept)} of {len(self.kept) + len(self.missed)} experts kept "
                f"({self.budget / 2**20:.0f} MiB), the rest read on every run")


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
def lazy_experts(layer: nn.Module, stacked: dict[str, str], read: Callable[[str, int], torch.Tensor]):
    """The layer as written with its stacked [E, ...] expert parameters (reading name -> dotted name under the
    layer) standing in as LazyStacks, `read(name, e)` giving expert e's slice; and transformers' eager experts
    implementation, which indexes them expert by expert. The stand-ins shadow the parameters (an instance
    attribute is found before nn.Module's lookup) and are removed after: the layer is left as it was. A 3-D
    entry that is not a parameter (a buffer) can't be stood in for: ValueError."""
    swapped, configs, before = [], {}, {}
    try:
        for key, dotted in stacked.items():
            owner_name, _, leaf = dotted.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            t = getattr(owner, leaf)
            if t.dim() != 3:
                continue
            if leaf not in owner._parameters:
                raise ValueError(f"{dotted} is not a parameter")
            object.__setattr__(owner, leaf, LazyStack(t, lambda e, key=key: read(key, e)))
            swapped.append((owner, leaf))
        configs = {id(m.config): m.config for m in layer.modules()
                   if getattr(getattr(m, "config", None), "_experts_implementation", None) not in (None, "eager")}
        before = {k: c._experts_implementation for k, c in configs.items()}
        for c in configs.values():
            c._experts_implementation_internal = "eager"  # not the setter: it would rewrite every sub-config
        yield layer
    finally:
        for k, c in configs.items():
            c._experts_implementation_internal = before[k]
        for owner, leaf in swapped:  # nothing keeps a stand-in (or what it reads from) alive
            object.__delattr__(owner, leaf)


def stacked_names(layer: nn.Module, stacked: dict[str, torch.Tensor]) -> Optional[dict[str, str]]:
    """A reading's stacked tensors (fusion_rules.ExpertSource.stacked) by their dotted names under the layer;
    None when one is not the layer's own."""
    names = {id(t): n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())}
    found = {key: names[id(t)] for key, t in stacked.items() if id(t) in names}
    return found if len(found) == len(stacked) else None


def runs_expert_by_expert(layer: nn.Module, stacked: dict[str, torch.Tensor], call, hidden: int) -> bool:
    """Whether the layer as written computes the same with its stacked experts indexed one at a time (LazyStack):
    transformers' eager experts do; a layer that multiplies the whole stack at once (Llama 4's bmm) does not, and
    an out-of-core compile reads its experts whole. Checked on the miniature, whose weights are real."""
    from moec.numerics import compare_tensors

    names = stacked_names(layer, stacked)
    if names is None:
        return False
    x = torch.randn(1, 5, hidden, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            want = layer(*call.args(x))
            with lazy_experts(layer, names, lambda key, e: stacked[key][e]):
                got = layer(*call.args(x))
    except Exception:  # the stand-in is not a tensor: the layer uses the stack whole
        return False
    first = [o[0] if isinstance(o, (tuple, list)) else o for o in (want, got)]
    return all(isinstance(o, torch.Tensor) for o in first) and compare_tensors(first[0], first[1]).rel_l2 <= 1e-5

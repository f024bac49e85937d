"""A Hugging Face checkpoint read one decoder layer at a time, into a model that otherwise stays on the meta device.

`LazyCheckpoint(path)` indexes the safetensors headers (moec.safetensors_check: truncated files, missing shards
named before anything is read) and groups the checkpoint's tensors by decoder layer (`layers.<N>.` in the name;
everything else is the group ""). `skeleton()` builds the transformers model with every parameter on the meta
device and the buffers real (rotary frequencies are not in a checkpoint, and they are small). `materialise(model,
group)` reads only that group's tensors, memory-mapped, and loads them through transformers' own checkpoint
conversion (per-expert `experts.N.gate_proj.weight` -> stacked `gate_up_proj`, renamings), converting each tensor
to `dtype` on its own: a bf16 checkpoint is never upcast as a whole. `release(module)` returns a layer's
parameters to the meta device. Refuses, naming the file and the tensor: a tensor whose shape disagrees with the
config, a tensor the model lacks, a parameter the group needs that the checkpoint lacks, unreadable data.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moec.errors import SourceError
from moec.external_data import layer_key
from moec.safetensors_check import checkpoint_files, read_header



@dataclass
class LazyCheckpoint:
    path: str
    model_config: Any = None  # the transformers config to build (default: config.json through AutoConfig)
    files: dict[str, str] = field(default_factory=dict)  # tensor -> file
    groups: dict[str, list[str]] = field(default_factory=dict)  # layer key -> tensors, checkpoint order
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # as stored
    nbytes: int = 0  # as stored
    numel: int = 0
    # tensors stored in parts (GPT-OSS's MXFP4 experts, GPTQ / AWQ / compressed-tensors Linears; `decode_as`):
    # name -> its fp32 value, whole (None) or one expert's [e:e + 1]; listed in files/groups/shapes under that
    # name, in the model's layout
    decoded: dict[str, Callable[[Optional[int]], torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in checkpoint_files(self.path):
            file = os.path.join(self.path, name)
            for tensor, meta in read_header(file).items():
                self.files[tensor] = file
                self.groups.setdefault(layer_key(tensor), []).append(tensor)
                self.shapes[tensor] = tuple(int(d) for d in meta["shape"])
                n = 1
                for d in meta["shape"]:
                    n *= int(d)
                self.numel += n
                self.nbytes += int(meta["data_offsets"][1]) - int(meta["data_offsets"][0])
        if not self.files:
            raise SourceError(f"'{self.path}' holds no safetensors weights; out-of-core compiles read safetensors "
                              "checkpoints (model.safetensors, or shards with model.safetensors.index.json).")

    def decode_as(self, encoded: list["Encoded"]) -> None:
        """Lists each encoded tensor's stored parts (MXFP4 `_blocks` / `_scales`, GPTQ `qweight` / `qzeros` / ...)
        as the one tensor the model has, in the model's layout, where its first part was: in `decoded` (its value
        read when asked for), `files`, `shapes` and its group, the parts gone; `numel` counts its elements."""
        renamed = {}
        for t in encoded:
            for name in t.stored:
                renamed[name] = t.name
                self.numel -= math.prod(self.shapes.pop(name))
                del self.files[name]
            self.files[t.name], self.shapes[t.name] = t.file, tuple(t.shape)
            self.numel += math.prod(t.shape)
            self.decoded[t.name] = t.value
        for key, names in self.groups.items():
            kept = dict.fromkeys(renamed.get(n, n) for n in names)  # in order, each once
            self.groups[key] = list(kept)

    def config(self):
        from transformers import AutoConfig

        if self.model_config is not None:
            return self.model_config
        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:
            raise SourceError(f"'{self.path}/config.json' does not load: {type(exc).__name__}: {str(exc)[:300]}") from exc

    def skeleton(self, config=None) -> nn.Module:
        """The causal LM of the config: parameters on the meta device, buffers real and small."""
        from transformers import AutoModelForCausalLM

        config = config or self.config()
        try:
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as exc:
            raise SourceError(f"'{self.path}': the model of its config.json does not build: {type(exc).__name__}: "
                              f"{str(exc)[:300]}") from exc
        return model.eval()

    def layer_groups(self) -> list[str]:
        """"" first, then the decoder layers in numeric order."""
        layers = sorted((k for k in self.groups if k), key=lambda k: int(k.split(".")[1]))
        return [""] + layers if "" in self.groups else layers

    def materialise(self, model: nn.Module, group: str, dtype: torch.dtype = torch.float32,
                    skip: Optional[Callable[[str], bool]] = None, may_stay_meta: frozenset = frozenset()) -> None:
        """Load the checkpoint's tensors of `group` into `model` (converted as transformers loads them). `skip`:
        checkpoint tensors not to read (experts streamed one at a time, a head read when it runs); `may_stay_meta`:
        the model's parameters they would have filled (a skipped tensor named as the model names it is one)."""
        from safetensors import safe_open

        names = [n for n in self.groups.get(group, []) if skip is None or not skip(n)]
        if skip is not None:
            may_stay_meta = may_stay_meta | {n for n in self.groups.get(group, []) if skip(n)}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        state = {n: self.decoded[n](None) for n in names if n in self.decoded}  # their own errors, named
        for file, tensors in by_file.items():
            try:
                with safe_open(file, "pt") as f:  # readable now: a broken file is named before any conversion
                    for n in tensors:
                        if n not in self.decoded:
                            state[n] = Reopened(file, n, f.get_slice(n), dtype)
            except Exception as exc:
                raise SourceError(f"'{file}': cannot read tensor data ({type(exc).__name__}: {exc}).") from exc
        try:
            info = load_converted(model, state, dtype)  # each tensor read when transformers converts it
        except Exception as exc:
            raise SourceError(f"'{self.path}': loading the tensors of {group or 'the embeddings and head'} failed: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self._check(model, group, info, may_stay_meta)

    def one_by_one(self, model: nn.Module, group: str) -> Optional[list[str]]:
        """The group's checkpoint tensors, when each can be read on its own: every one is named as the model names
        a tensor of its own (no conversion merges or renames them). None otherwise."""
        names = self.groups.get(group, [])
        own = {n for n, _ in _named_tensors(model)}
        return list(names) if names and all(n in own and n not in self.decoded for n in names) else None

    def read(self, f, name: str, expert: Optional[int] = None):
        """What transformers' conversion reads for the stored tensor `name` from the open file `f`: a lazy
        safetensors slice, or with `expert` its [e:e + 1] rows (a decoded tensor is `decoded[name](expert)`)."""
        stored = f.get_slice(name)
        return stored if expert is None else stored[expert:expert + 1]

    def _check(self, model: nn.Module, group: str, info, may_stay_meta: frozenset = frozenset()) -> None:
        self.check_loading(info)
        still = [n for n, p in _named_tensors(model) if p.is_meta and layer_key(n) == group and n not in _LOOSE(model)
                 and n not in may_stay_meta]
        if still:
            raise SourceError(f"the checkpoint in '{self.path}' lacks '{still[0]}' ({len(still)} tensor(s) of "
                              f"{group or 'the embeddings and head'} missing); transformers would initialize them "
                              "randomly. Nothing was written.")

    def check_loading(self, info) -> None:
        """transformers' loading info, checked: shapes that disagree with the config, tensors the model lacks,
        conversions that failed; each named with its file."""
        mismatched = sorted(info.mismatched_keys or [])
        if mismatched:
            key = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
            raise SourceError(f"'{self._file_of(key)}': tensor '{key}' has a shape that disagrees with config.json "
                              f"({len(mismatched)} such tensors). Nothing was written.")
        unexpected = sorted(info.unexpected_keys or [])
        if unexpected:
            raise SourceError(f"'{self._file_of(unexpected[0])}': tensor '{unexpected[0]}' is not a tensor of the "
                              f"model in config.json ({len(unexpected)} such tensors); it is not this config's "
                              "checkpoint. Nothing was written.")
        errors = info.conversion_errors or {}
        if errors:
            key, why = next(iter(errors.items()))
            raise SourceError(f"'{self.path}': converting tensor '{key}' failed: {str(why)[:300]}. Nothing was written.")

    def _file_of(self, key: str) -> str:
        if key in self.files:
            return self.files[key]
        hits = [f for n, f in self.files.items() if n.endswith(key) or key.endswith(n)]
        return hits[0] if hits else self.path


@dataclass
class Encoded:
    """A tensor the checkpoint stores in parts (moec.mxfp4_stream, moec.packed_stream): its name and [shape] as the
    model has it, the stored parts, the file of the first, and its value, whole (None) or one expert's slice."""

    name: str
    stored: list[str]
    file: str
    shape: tuple[int, ...]
    value: Callable[[Optional[int]], torch.Tensor]


class Reopened:
    """A checkpoint tensor transformers reads (`tensor[...]`) through a file mapping of its own, which lives as
    long as the tensor read from it. Read through one mapping held open for the whole group, every page read
    would stay resident until the group is loaded: a 201k-token head's 1 GiB of bf16 beside its fp32 copy.
    A large floating-point tensor read whole is converted to `dtype` here, CHUNK bytes of rows at a time, each
    through a mapping of its own, so its stored form is never resident whole beside the converted one (what
    transformers then casts it to is the same values: bf16 and fp16 widen to fp32 exactly)."""

    CHUNK = 64 << 20
    FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}

    def __init__(self, file: str, name: str, stored, dtype: Optional[torch.dtype] = None):
        self.file, self.name, self.convert_to = file, name, dtype
        self.shape, self.dtype = stored.get_shape(), stored.get_dtype()

    def get_shape(self):
        return self.shape

    def get_dtype(self):
        return self.dtype

    def __getitem__(self, index) -> torch.Tensor:
        stored = self.FLOATS.get(self.dtype)
        if index is Ellipsis and stored is not None and self.convert_to is not None and stored != self.convert_to \
                and self.convert_to.is_floating_point and len(self.shape) >= 1 and self.shape[0] > 1 \
                and math.prod(self.shape) * stored.itemsize > self.CHUNK:
            out = torch.empty(tuple(self.shape), dtype=self.convert_to)
            rows = max(1, self.CHUNK * self.shape[0] // (math.prod(self.shape) * stored.itemsize))
            for start in range(0, self.shape[0], rows):
                out[start:start + rows] = self._read(slice(start, start + rows))
            return out
        return self._read(index)

    def _read(self, index) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(self.file, "pt") as f:
                return f.get_slice(self.name)[index]
        except Exception as exc:
            raise SourceError(f"'{self.file}': cannot read tensor '{self.name}' ({type(exc).__name__}: {exc}).") from exc


def load_converted(model: nn.Module, state: dict, dtype: torch.dtype = torch.float32):
    """Load `state` (checkpoint names and layout: tensors or safetensors slices) into `model` through transformers'
    own checkpoint conversion, as from_pretrained would; returns transformers' loading info."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    config = LoadStateDictConfig(dtype=dtype, weight_mapping=get_model_conversion_mapping(model), device_map={"": "cpu"})
    os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")  # one tensor in flight: memory stays bounded
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per layer would bury moec's own progress
    try:
        info, _ = convert_and_load_state_dict_in_model(model, state, config)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return info


def _LOOSE(model: nn.Module) -> set[str]:
    """Parameters tied to another (an lm_head tied to the embeddings): filled by tie_weights, not the checkpoint.
    The instance's own map when it has one (empty when the config does not tie), else the class's list."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def release(module: nn.Module, buffers: bool = False) -> None:
    """Drop a module's parameters (back to the meta device); with `buffers`, its buffers too (a decoder layer done
    with: a lowering keeps packed codes as buffers). Otherwise its real buffers stay (rotary frequencies)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        if buffers:
            for name, b in list(m._buffers.items()):
                if b is not None and not b.is_meta:
                    m._buffers[name] = torch.empty_like(b, device="meta")


META_FROM = 1 << 20  # elements: a factory call this large builds a weight, never a buffer worth computing


class _LargeOnMeta(TorchFunctionMode):
    """Tensor factories without a device build large tensors on the meta device: a trillion-parameter model's
    stacked experts (45 GB a layer) can't even be allocated empty first."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None and "out" not in kwargs:
            if "size" in kwargs:
                shape = kwargs["size"]
            elif func is torch.full or (len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size))):
                shape = args[0] if args else ()
            else:
                shape = args
            try:
                numel = math.prod(int(d) for d in shape)
            except (TypeError, ValueError):
                numel = 0
            if numel >= META_FROM:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real (accelerate's
    init_empty_weights without its dependency): large factory calls go to meta directly, the rest of a
    parameter is moved there once registered (it was allocated empty, never written)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        with _LargeOnMeta():
            yield
    finally:
        nn.Module.register_parameter = original


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers (`...layers`), whose children the checkpoint's tensors are grouped by
    (external_data.layer_key reads the same `layers.<N>.` in their names)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer") and len(mod):
            return name, mod
    raise SourceError(f"{type(model).__name__} has no ModuleList of decoder layers ('layers'); out-of-core compiles "
                      "stream a decoder one layer at a time.")

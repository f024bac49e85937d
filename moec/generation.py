"""Causal LMs as decoders with a KV cache: the graph a text-generation artifact exposes.

One graph serves prefill and decode. Inputs follow onnxruntime-genai's conventions so that its
runtime loads the artifact as it is:

    input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq],
    past_key_values.N.key [batch, kv_heads, past, head_dim_k], past_key_values.N.value [..., head_dim_v]
    -> logits [batch, seq, vocab], present.N.key / present.N.value [batch, kv_heads, total, head_dim]

with total = past + seq. The cache is a plain concatenation (genai's past_present_share_buffer false):
every layer keeps every position, and sliding-window layers get their window from the attention mask,
as transformers computes it, so the semantics are the model's own. One difference, which changes nothing
for transformers' own inputs: a window (or Llama 4's attention chunk) is measured in positions (the unpadded
tokens the mask counts) rather than in cache slots (`windows_over_positions`). With transformers' left
padding the two are the same; onnxruntime-genai pads a batch on the right, so its cache holds each shorter
row's padding between the prompt and the generated tokens, and a window counted in slots would count it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from moec.errors import SourceError
from moec.sources import LoadedSource

TASKS = ("text-generation", "logits")


@dataclass(frozen=True)
class CacheLayout:
    """Per layer: key/value heads and head sizes (DeepSeek-V3's keys and values differ in size)."""

    kv_heads: tuple[int, ...]
    key_dims: tuple[int, ...]
    value_dims: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.kv_heads)

    def uniform(self) -> bool:
        return len(set(self.kv_heads)) == 1 and len(set(self.key_dims)) == 1 and self.key_dims == self.value_dims


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key before value for each layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


class CausalLMDecoder(nn.Module):
    """(input_ids, attention_mask, position_ids, past k/v per layer...) -> (logits, present k/v per layer...).

    forward takes one flat tuple so that every input is a plain tensor with its own name and dims.
    """

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers
        # the cache the model runs with: a transformers DynamicCache, or a subclass a lowering pass sets
        # (moec/targets/onnxruntime/lower_attention.py) that is active while the model runs
        self.cache_class: Callable = default_cache

    def forward(self, *inputs: torch.Tensor):
        input_ids, attention_mask, position_ids = inputs[:3]
        past = inputs[3:]
        if len(past) != 2 * self.layers:
            raise ValueError(f"expected {2 * self.layers} past key/value tensors, got {len(past)}")
        cache = self.cache_class([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        with cache.active(self.model) if hasattr(cache, "active") else contextlib.nullcontext(), \
                windows_over_positions(attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{cache_keyword(self.model): cache})
        present = []
        for layer in cache.layers[:self.layers]:  # the model appended this step's keys and values in place
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@contextlib.contextmanager
def windows_over_positions(attention_mask: torch.Tensor):
    """While the model runs, transformers' sliding-window masks keep a key when its position is within the
    window of the query's, and its chunked-attention masks (Llama 4) put a key in the query's chunk by
    position (positions: the mask's running count of unpadded tokens), not by cache slot. Causality and
    padding stay transformers' own. Equal to transformers' masks wherever padding only leads a row (its
    convention: its chunks already count from a row's left padding); right for a row padded in the middle
    too (onnxruntime-genai's batches)."""
    from transformers import masking_utils

    positions = attention_mask.cumsum(-1) - 1

    def window(size: int) -> Callable:
        def inner(batch_idx, head_idx, q_idx, kv_idx):
            return positions[batch_idx, kv_idx] > positions[batch_idx, q_idx] - size
        return inner

    def chunk(size: int) -> Callable:
        def inner(batch_idx, head_idx, q_idx, kv_idx):
            return positions[batch_idx, kv_idx] // size == positions[batch_idx, q_idx] // size
        return inner

    replaced = {
        "sliding_window_causal_mask_function":
            lambda size: masking_utils.and_masks(window(size), masking_utils.causal_mask_function),
        "chunked_causal_mask_function":  # its left_padding argument is what positions already count
            lambda size, left_padding: masking_utils.and_masks(chunk(size), masking_utils.causal_mask_function),
    }
    saved = {name: getattr(masking_utils, name) for name in replaced}
    for name, function in replaced.items():
        setattr(masking_utils, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(masking_utils, name, function)


def default_cache(pairs):
    from transformers import DynamicCache

    return DynamicCache(pairs)


def cache_keyword(model: nn.Module) -> str:
    """transformers renamed forward's past_key_values to cache (5.x deprecates the old name)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def probe_cache_layout(model: nn.Module) -> CacheLayout:
    """Run the model once on two tokens and read the cache it builds (no config arithmetic: MLA, GQA and
    per-layer head sizes all come out as the model really stores them)."""
    layers = int(model.config.num_hidden_layers)
    try:
        with torch.no_grad():
            from transformers import DynamicCache

            cache = DynamicCache()
            model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True, **{cache_keyword(model): cache})
        found = list(getattr(cache, "layers", []))
    except Exception as exc:
        raise SourceError(f"{type(model).__name__} cannot run with a KV cache ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); compile it with --task logits.") from exc
    if len(found) < layers or any(getattr(l, "keys", None) is None for l in found[:layers]):
        raise SourceError(f"{type(model).__name__} returned no key/value cache for its {layers} layers (a model "
                          "without a KV cache interface, or with a recurrent state moec does not export); compile it "
                          "with --task logits.")
    keys = [l.keys for l in found[:layers]]
    values = [l.values for l in found[:layers]]
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.dim() != 4 or v.dim() != 4 or k.shape[2] != 2 or v.shape[2] != 2:
            raise SourceError(f"layer {i} of {type(model).__name__} caches keys {tuple(k.shape)} and values "
                              f"{tuple(v.shape)}; moec exports caches laid out [batch, kv_heads, seq, head_dim] "
                              "that grow by one position a token. Compile it with --task logits.")
    return CacheLayout(tuple(int(k.shape[1]) for k in keys), tuple(int(k.shape[3]) for k in keys),
                       tuple(int(v.shape[3]) for v in values))


@dataclass
class DecoderSource(LoadedSource):
    """A causal LM as a KV-cache decoder: inputs are made consistent (mask covers past + new tokens, the
    positions count the unpadded tokens, left padding in the first row)."""

    layout: Optional[CacheLayout] = None
    vocab: int = 0
    max_positions: int = 0
    info: Optional["GenerationInfo"] = None

    def make_inputs(self, seed: int, seq_len: Optional[int] = None, batch: Optional[int] = None) -> tuple:
        ids = self.example_args[0]
        b = batch or int(ids.shape[0])
        s = seq_len or int(ids.shape[1])
        past = int(self.example_args[3].shape[2])
        return self.step_inputs(seed, b, s, past, pad=min(2, past) if b > 1 else 0)

    def step_inputs(self, seed: int, batch: int, seq: int, past: int, pad: int = 0) -> tuple:
        """Random tokens and cache for one step of `seq` new tokens after `past` cached ones; the first row
        has `pad` masked (left-padding) positions."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        mask[0, :pad] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:].contiguous()  # a view would export its strides
        cache = []
        for heads, dk, dv in zip(self.layout.kv_heads, self.layout.key_dims, self.layout.value_dims):
            cache += [torch.randn(batch, heads, past, dk, generator=gen),
                      torch.randn(batch, heads, past, dv, generator=gen)]
        return (ids, mask, positions, *cache)

    def dim_ranges(self) -> dict[str, tuple[int, Optional[int], int]]:
        ranges = super().dim_ranges()
        if "total" in ranges:
            ranges["total"] = (1, *ranges["total"][1:])
        return ranges

    def verification_inputs(self, other_seq: Optional[int], seed: int = 100) -> list[tuple]:
        """A prefill with a cached prefix (batch 2, left padding) and a one-token decode step (batch 3)."""
        return [self.make_inputs(seed=seed),
                self.step_inputs(seed + 1, 3, 1, int(self.example_args[3].shape[2]) + 4, 3)]


def decoder_source(model: nn.Module, identity: str, source_dir: Optional[str] = None, batch: int = 2, seq: int = 5,
                   past: int = 3) -> DecoderSource:
    """Wrap a transformers causal LM as a KV-cache decoder with dynamic batch, seq, past and total dims."""
    layout = probe_cache_layout(model)
    max_pos = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    Dim = torch.export.Dim
    # total = past + seq is a relation torch.export cannot declare, so it is a dim of its own. torch.export
    # traces with every size >= 2 (it specializes 0 and 1) and so derives total >= 4; the graph holds for
    # past = 0 and seq = 1 (a one-token prompt), which verification runs, and dim_ranges reports min 1.
    b, s = Dim("batch", min=1, max=64), Dim("seq", min=1, max=max_pos)
    p, t = Dim("past", min=0, max=max_pos), Dim("total", min=4, max=2 * max_pos)
    past_names, present_names = cache_names(layout.layers)
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}) + tuple({0: b, 2: p} for _ in past_names)
    src = DecoderSource(
        CausalLMDecoder(model, layout.layers).eval(), (), dynamic, identity,
        ["input_ids", "attention_mask", "position_ids"] + past_names, ["logits"] + present_names,
        [f"{type(model).__name__} as a decoder with a KV cache ({layout.layers} layers, past_key_values "
         "[batch, kv_heads, past, head_dim])"],
        [f"tokens:{int(model.config.vocab_size)}", "mask", "positions"] + ["float"] * len(past_names),
        derived_dims={"total": ("past", "seq")}, layout=layout, vocab=int(model.config.vocab_size),
        max_positions=max_pos, info=generation_info(model, layout, source_dir))
    src.example_args = src.step_inputs(0, batch, seq, past)
    return src


# Files of a Hugging Face directory that onnxruntime-genai (og.Tokenizer) and users read beside the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass
class SearchDefaults:
    """The source's generation_config.json sampling settings, which become genai_config.json's search
    defaults (transformers' own defaults where the source sets none). Verification is greedy regardless."""

    do_sample: bool = False
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0


@dataclass
class GenerationInfo:
    """What the generation files need from the model, kept after the model itself is freed."""

    layout: CacheLayout
    vocab: int
    hidden: int
    heads: int
    context_length: int
    bos_id: Optional[int]
    eos_ids: list[int]
    pad_id: int
    source_dir: Optional[str]  # a Hugging Face directory to copy tokenizer files from
    search: SearchDefaults = field(default_factory=SearchDefaults)

    @property
    def cache_shapes(self) -> list[tuple[int, int]]:
        out = []
        for heads, dk, dv in zip(self.layout.kv_heads, self.layout.key_dims, self.layout.value_dims):
            out += [(heads, dk), (heads, dv)]
        return out


def generation_info(model: nn.Module, layout: CacheLayout, source_dir: Optional[str]) -> GenerationInfo:
    """Token ids from generation_config (what transformers' generate uses), else from the config."""
    cfg, gen = model.config, getattr(model, "generation_config", None)

    def pick(name: str):
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else getattr(cfg, name, None)

    vocab = int(cfg.vocab_size)

    def in_vocab(value) -> Optional[int]:  # a config's ids outside the vocabulary can never be generated
        return int(value) if value is not None and 0 <= int(value) < vocab else None

    eos = pick("eos_token_id")
    eos_ids = [e for e in (in_vocab(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])) if e is not None]
    pad_id = in_vocab(pick("pad_token_id"))
    pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
    defaults = SearchDefaults()
    search = SearchDefaults(**{
        name: type(default)(getattr(gen, name)) if getattr(gen, name, None) is not None else default
        for name, default in vars(defaults).items()})
    return GenerationInfo(layout, vocab, int(cfg.hidden_size), int(cfg.num_attention_heads),
                          int(getattr(cfg, "max_position_embeddings", 4096) or 4096),
                          in_vocab(pick("bos_token_id")), eos_ids, pad_id, source_dir, search)


def genai_config(info: GenerationInfo) -> tuple[Optional[dict], str]:
    """(onnxruntime-genai's genai_config.json, "") or (None, why it cannot hold this model's cache)."""
    layout = info.layout
    if not layout.uniform():
        return None, (f"onnxruntime-genai holds one head size and head count for every layer's keys and values; this "
                      f"model caches keys of size {sorted(set(layout.key_dims))} and values of size "
                      f"{sorted(set(layout.value_dims))} with {sorted(set(layout.kv_heads))} heads. Run the artifact "
                      "with ONNX Runtime directly (the generation golden does).")
    model = {
        # "llama": genai's plain decoder-only runner; the graph carries the family's semantics.
        "type": "llama",
        "vocab_size": info.vocab,
        "context_length": info.context_length,
        "pad_token_id": info.pad_id,
        "eos_token_id": info.eos_ids if len(info.eos_ids) != 1 else info.eos_ids[0],
        "decoder": {
            "session_options": {"log_id": "moec", "provider_options": []},
            "filename": "model.onnx",
            "head_size": layout.key_dims[0],
            "hidden_size": info.hidden,
            "num_attention_heads": info.heads,
            "num_hidden_layers": layout.layers,
            "num_key_value_heads": layout.kv_heads[0],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    if info.bos_id is not None:
        model["bos_token_id"] = info.bos_id
    search = {**vars(info.search), "num_beams": 1, "num_return_sequences": 1, "max_length": info.context_length,
              "min_length": 0,
              "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
              # the graph concatenates past and new keys (present = past + seq): no shared buffer
              "past_present_share_buffer": False}
    return {"model": model, "search": search}, ""


def write_generation_files(out_dir: str, info: GenerationInfo) -> dict:
    """genai_config.json (when genai can hold the cache) and the source's tokenizer files; returns the
    report's generation section."""
    import json
    import shutil

    config, why = genai_config(info)
    if config is not None:
        with open(os.path.join(out_dir, "genai_config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    copied = []
    if info.source_dir:
        for name in TOKENIZER_FILES:
            path = os.path.join(info.source_dir, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out_dir, name))
                copied.append(name)
    return {"task": "text-generation", "genai_config": config is not None, "genai_unsupported": why or None,
            "tokenizer_files": copied, "eos_token_ids": info.eos_ids, "pad_token_id": info.pad_id,
            "cache": {"layers": info.layout.layers, "kv_heads": list(info.layout.kv_heads),
                      "key_dims": list(info.layout.key_dims), "value_dims": list(info.layout.value_dims),
                      "layout": "[batch, kv_heads, seq, head_dim]"}}

"""lower_attention: a KV-cache decoder's attention as ONNX Runtime's com.microsoft.GroupQueryAttention.

Matches: a text-generation decoder (moec/generation.py's CausalLMDecoder) whose model dispatches attention
through transformers' AttentionInterface (``config._attn_implementation`` "sdpa" or "eager").

Produces: a cache for the decoder (SplitCache) that keeps each layer's past and this step's keys and values
apart and, while the decoder runs, switches the model's attention implementation to ``moec_group_query``,
whose masks are transformers' additive (eager) masks (the model itself is left as it was). Each attention call whose keys and values are exactly the cache's concatenation becomes one
``moec::ort_group_query_attention``: GroupQueryAttention with causal=0 and the mask passed whole as
attention_bias (padding, causality and sliding windows stay the model's own, fully masked rows included),
GPT-OSS's sinks as head_sink, the model's scaling as scale. ORT's CPU kernel refuses a batch of more than one
multi-token chunk after a cached prefix, so a torch.cond (an ONNX If) takes the same arithmetic as plain ops
for exactly that case; prompts (no past) and one-token steps, what onnxruntime-genai runs, take the fused op.

Refuses, per layer (the layer keeps the model's own attention ops; the reason is in the report): keys and
values of different head sizes (DeepSeek-V3's MLA), a head size not a multiple of 8 (ORT's kernel
refuses it), query heads not a multiple of key/value heads, dropout,
soft-capped logits, keys that are not the cache's concatenation, a module with sinks it does not pass as
``s_aux``. The whole pass does nothing on a model without a cache (--task logits) or one whose attention
implementation is not sdpa or eager.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.outcomes import LoweringOutcome
from moec.targets.onnxruntime.ops import group_query_attention_reference

IMPLEMENTATION = "moec_group_query"
FUSED = "com.microsoft.GroupQueryAttention"
KEPT = "the model's own attention ops"

_ACTIVE: contextvars.ContextVar[Optional["SplitCache"]] = contextvars.ContextVar("moec_split_cache", default=None)
_RECORD: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("moec_attention_record", default=None)


@dataclass
class Step:
    """One layer's update in this call: the cache before it, the new keys/values, what update returned."""

    past_key: torch.Tensor
    past_value: torch.Tensor
    new_key: torch.Tensor
    new_value: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


def split_cache_class():
    from transformers import DynamicCache

    class SplitCache(DynamicCache):
        """A DynamicCache that remembers, per layer, the past and the new keys/values it concatenated, so the
        attention function can hand them to GroupQueryAttention apart (it concatenates them itself)."""

        def __init__(self, pairs, fallback: str):
            super().__init__(pairs)
            self.fallback = fallback
            self.steps: dict[int, Step] = {}
            self._lengths: Optional[tuple[torch.Tensor, torch.Tensor]] = None

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
            past = (layer.keys, layer.values) if layer is not None and layer.is_initialized else None
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if past is not None:
                self.steps[layer_idx] = Step(past[0], past[1], key_states, value_states, keys, values)
            return keys, values

        def lengths(self, batch, total) -> tuple[torch.Tensor, torch.Tensor]:
            """GroupQueryAttention's seqlens_k (total - 1 for every row: the bias masks padding) and
            total_sequence_length, made once a call so that the graph computes them once for all layers."""
            if self._lengths is None:
                self._lengths = (torch.full((batch,), total - 1, dtype=torch.int32),
                                 torch.full((), total, dtype=torch.int32))
            return self._lengths

        @contextlib.contextmanager
        def active(self, model: nn.Module):
            """While `model` runs with this cache: moec's attention implementation, this cache found by it."""
            undo = switch_implementation(model, IMPLEMENTATION)
            token = _ACTIVE.set(self)
            try:
                yield
            finally:
                _ACTIVE.reset(token)
                for config, previous in undo:
                    config._attn_implementation_internal = previous

    return SplitCache


def fallback_attention(implementation: str, module: nn.Module) -> Callable:
    """The attention function the model had: transformers' sdpa, or the family's own eager function."""
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def why_not(module, query, key, value, mask, dropout, step: Optional[Step], kwargs: dict) -> str:
    """Why this call can't be GroupQueryAttention ("" when it can)."""
    if step is None:
        return "the call's keys do not come from this layer's cache update"
    if key is not step.key or value is not step.value:
        return "the keys and values attended are not the cache's concatenation"
    if dropout:
        return "attention dropout"
    if kwargs.get("softcap") is not None:
        return "soft-capped attention logits"
    if mask is None:
        return "no attention mask"
    heads, kv_heads = query.shape[1], key.shape[1]
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return (f"query, key and value head sizes {query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]} differ "
                "(GroupQueryAttention takes one head size)")
    if query.shape[-1] % 8:
        return f"head size {query.shape[-1]} (ONNX Runtime's kernel takes multiples of 8)"
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != key.shape[2] or not mask.is_floating_point():
        return f"a {mask.dtype} mask of shape {tuple(mask.shape)} (expected an additive [batch, 1, seq, total])"
    sink = kwargs.get("s_aux")
    if sink is None and getattr(module, "sinks", None) is not None:
        return "the module has sinks the attention call does not receive"
    if sink is not None and tuple(sink.shape) != (heads,):
        return f"sinks of shape {tuple(sink.shape)} (expected one per query head, {heads})"
    if query.dtype not in (torch.float32, torch.float16):
        return f"{query.dtype} attention (ONNX Runtime's CPU kernel runs fp32 and fp16)"
    return ""


def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: GroupQueryAttention where why_not allows, else the model's own."""
    cache = _ACTIVE.get()  # set by SplitCache.active, which alone switches the model to this function
    step = cache.steps.get(getattr(module, "layer_idx", -1))
    reason = why_not(module, query, key, value, attention_mask, dropout, step, kwargs)
    record = _RECORD.get()
    if record is not None:
        record[module] = reason
    if reason:
        return fallback_attention(cache.fallback, module)(module, query, key, value, attention_mask,
                                                          scaling=scaling, dropout=dropout, **kwargs)
    batch, heads, seq, head = query.shape
    kv_heads = key.shape[1]
    scale = float(scaling) if scaling is not None else head ** -0.5
    mask = attention_mask
    operands = [query.transpose(1, 2).reshape(batch, seq, heads * head),
                step.new_key.transpose(1, 2).reshape(batch, seq, kv_heads * head),
                step.new_value.transpose(1, 2).reshape(batch, seq, kv_heads * head),
                step.past_key, step.past_value, mask.to(query.dtype)]
    operands += cache.lengths(batch, mask.shape[-1])
    sink = kwargs.get("s_aux")
    if sink is not None:
        operands.append(sink)

    def fused(q, k, v, pk, pv, bias, seqlens, total, *sinks):
        return torch.ops.moec.ort_group_query_attention(q, k, v, pk, pv, seqlens, total, bias,
                                                        sinks[0] if sinks else None, heads, kv_heads, scale)

    def plain(q, k, v, pk, pv, bias, seqlens, total, *sinks):
        return group_query_attention_reference(q, k, v, pk, pv, seqlens, total, bias, sinks[0] if sinks else None,
                                               heads, kv_heads, scale)

    # ORT's CPU kernel: "batch_size must be 1 when sequence_length > 1 and past context is given"
    chunked = (batch > 1) & (seq > 1) & (step.past_key.shape[2] > 0)
    out, present_key, present_value = torch.cond(chunked, plain, fused, tuple(operands))
    layer = cache.layers[module.layer_idx]
    layer.keys, layer.values = present_key, present_value
    return out.reshape(batch, seq, heads, head), None


def register_implementation() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def switch_implementation(model: nn.Module, implementation: str) -> list[tuple[object, str]]:
    """Set every config in the model to `implementation`; returns (config, previous) to undo it."""
    seen, undo = set(), []
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen.add(id(config))
        undo.append((config, config._attn_implementation_internal))
        config._attn_implementation_internal = implementation
    return undo


class LowerAttentionForGQA(Pass):
    name = "lower_attention"
    on_task_graph = True

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        from moec.generation import CausalLMDecoder, default_cache

        if not isinstance(module, CausalLMDecoder):
            return PassResult(module, False, {"reason": "not a KV-cache decoder (--task logits): no cache to lower"})
        model = module.model
        original = getattr(model.config, "_attn_implementation", None)
        if original not in ("sdpa", "eager"):
            return PassResult(module, False, {"reason": f"attention implementation {original!r} (sdpa or eager "
                                                        "lowers)"})
        register_implementation()
        module.cache_class = functools.partial(split_cache_class(), fallback=original)
        record: dict = {}
        token = _RECORD.set(record)
        try:
            with torch.no_grad():
                module(*ctx.probes[0])
        finally:
            _RECORD.reset(token)
        names = {m: name for name, m in model.named_modules()}
        layers = [LoweringOutcome(f"model.{names.get(m, type(m).__name__)}", KEPT if reason else FUSED, reason)
                  for m, reason in record.items()]
        lowered = sum(o.lowered_to == FUSED for o in layers)
        if not lowered:
            module.cache_class = default_cache
            why = "the model computes attention without transformers' AttentionInterface" if not layers \
                else "no attention layer could be lowered"
            return PassResult(module, False, {"reason": why}, layers)
        ctx.log(f"  attention: {lowered} of {len(layers)} layers as {FUSED}")
        return PassResult(module, True, {"lowered": lowered, "kept": len(layers) - lowered}, layers)

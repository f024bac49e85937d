"""Hugging Face configs without weights: read a config.json as users have it, and shrink it to a miniature.

`moec plan` recognises MoE layers by running them (fuse_moe's translation validation needs numbers), which
a trillion-parameter config can't afford. Its miniature is the same transformers class with every width
tiny and fewer layers and experts, but the routing kept: top-k, expert groups, scaling factors and the
kinds of layer (dense/sparse, sliding/full attention) are what recognition reads, so they stay. The
survey (tools/survey_families.py) shrinks transformers' default configs with the same tables.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from moec.errors import SourceError

# config key -> tiny value, applied where a config has the key (widths only: routing keys are kept)
WIDTHS = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "expert_intermediate_size": 32, "ffn_hidden_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "sliding_window": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "kv_n_heads": 2,
}
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
MINIATURE_MAX_PARAMETERS = 20_000_000  # past this, a config's widths hide under keys moec doesn't know
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "experts_per_token", "moe_top_k")
GROUP_KEYS = ("n_group", "num_expert_group", "n_groups")
TOPK_GROUP_KEYS = ("topk_group", "topk_groups")
MINIATURE_LAYERS = 4


@dataclass
class HFConfig:
    """A config.json read into its transformers config class, and the causal-LM class that builds it."""

    config: object  # transformers.PretrainedConfig
    model_class: type
    path: str
    notes: list[str] = field(default_factory=list)


def read_config(source: str) -> HFConfig:
    """`source`: a config.json, or a directory holding one. A model_type transformers doesn't know is read
    as the config of the first `architectures` entry transformers has (Kimi-K2's "kimi_k2" ships
    DeepseekV3ForCausalLM with remote code: the same architecture)."""
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise SourceError(f"'{source}': no config.json there; `moec plan` reads a Hugging Face config.json (a file, "
                          "or a directory holding one). No weights are needed.")
    try:
        with open(path) as f:
            raw = _decode_floats(json.load(f))
    except Exception as exc:
        raise SourceError(f"'{path}' is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SourceError(f"'{path}' holds a JSON {type(raw).__name__}, not a config object.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    notes = []
    model_type = raw.get("model_type")
    arch_names = [a for a in raw.get("architectures") or [] if hasattr(transformers, a)]
    if model_type in CONFIG_MAPPING_NAMES and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_cls = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
        model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    elif arch_names:
        model_cls = getattr(transformers, arch_names[0])
        config_cls = model_cls.config_class
        notes.append(f"model_type '{model_type}' is not a transformers causal-LM family; read as the config of "
                     f"{arch_names[0]} (its 'architectures' entry)")
    else:
        raise SourceError(f"'{path}': model_type '{model_type}' is not a transformers causal-LM family and no "
                          f"'architectures' entry names a transformers class (got {raw.get('architectures')}); "
                          "moec never runs a checkpoint's remote code.")
    body = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type")}
    if "quantization_config" in body:
        q = body.pop("quantization_config")
        if q:
            method = q.get("quant_method", "?") if isinstance(q, dict) else type(q).__name__
            notes.append(f"the checkpoint's quantization_config ({method}) is ignored: the plan counts weights at "
                         "the precisions it lists")
    try:
        config = config_cls(**body)
    except Exception as exc:
        raise SourceError(f"'{path}' does not make a {config_cls.__name__}: {type(exc).__name__}: "
                          f"{str(exc)[:300]}") from exc
    return HFConfig(config, model_cls, path, notes)


def _decode_floats(obj):
    """transformers writes Infinity and NaN as {"__float__": "Infinity"} in config.json; read them back."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def explicit_keys(config) -> dict:
    """The config's keys whose values its class would not compute from the others. A saved config.json holds
    derived keys too (an MLA head size that is the sum of two others, per-layer lists built from a pattern);
    a miniature must let its class recompute them from the shrunk values."""
    cls = type(config)
    d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    out = {}
    for k, v in d.items():
        try:
            again = cls(**{kk: vv for kk, vv in d.items() if kk != k}).to_dict().get(k, _MISSING)
        except Exception:
            again = _MISSING
        if again != v:
            out[k] = v
    return out


_MISSING = object()


def _layer_keyed(key: str, value, full_layers: int) -> str:
    """'list': one entry per layer; 'indices': a list of layer indices; 'dict': a dict keyed by layer index."""
    if isinstance(value, list) and len(value) == full_layers and full_layers > 1:
        return "list"
    if "layer" not in key:
        return ""
    if isinstance(value, list) and value and all(isinstance(i, int) and 0 <= i < full_layers for i in value):
        return "indices"
    if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
        return "dict"
    return ""


def _shrink_layers(value, how: str, n: int):
    if how == "list":
        return keep_each_kind(value, n)
    if how == "indices":  # the layers named, where they fall in n; else the last one, to keep that kind
        return [i for i in value if i < n] or [n - 1]
    kept = {k: v for k, v in value.items() if int(k) < n}
    return kept or {type(next(iter(value)))(n - 1): next(iter(value.values()))}


def keep_each_kind(values: list, n: int) -> list:
    """A per-layer list cut to n layers that still holds each kind of layer the full list has, in order of first
    appearance (DeepSeek-V3.2's ["dense"] * 3 + ["sparse"] * 58 at 2 layers is ["dense", "sparse"], not
    all dense), when n allows."""
    head = values[:n]
    kinds = list(dict.fromkeys(values))
    if set(head) == set(kinds) or len(kinds) > n:
        return head
    return (kinds + [values[-1]] * n)[:n]


def miniature(config, layers: int = MINIATURE_LAYERS):
    """The same config class with tiny widths, at most `layers` layers (each kind kept) and just enough experts
    for the routing to stay what it is: at least 8, twice top-k, and within each expert group twice the
    top-k share of the groups selected. Keys are found under their family's own names (attribute_map:
    DBRX's d_model) and one level down in sub-configs (DBRX's ffn_config, a multimodal model's text_config)."""
    d = config.to_dict()
    base = explicit_keys(config)
    aliases = dict(getattr(config, "attribute_map", {}) or {})
    over = _shrink(d, base, aliases, layers)
    for key, value in d.items():
        if isinstance(value, dict) and key not in ("id2label", "label2id"):
            sub = _shrink(value, value, {}, layers)
            if sub:
                over[key] = {**value, **sub}
    try:
        return type(config)(**{**base, **over})
    except Exception as exc:  # some configs insist on plain multi-head attention
        if "num_key_value_heads" not in str(exc):
            raise
        return type(config)(**{**base, **over, "num_key_value_heads": over.get("num_attention_heads", 4)})


def width_overrides(d: dict, widths: dict = WIDTHS, aliases: Optional[dict] = None,
                    include_none: bool = False) -> dict:
    """`widths` applied where the config dict `d` has the key (under its alias; with `include_none`, also where
    its value is None), kept consistent: multi-head latent attention's head_dim is its rope part with one
    key/value head per head, and special token ids stay inside the tiny vocabulary."""
    aliases = aliases or {}

    def name(key):
        return aliases.get(key, key)

    over = {name(k): v for k, v in widths.items() if name(k) in d and (include_none or d[name(k)] is not None)}
    if "qk_rope_head_dim" in d:
        over["head_dim"] = widths["qk_rope_head_dim"]
        over[name("num_key_value_heads")] = widths["num_attention_heads"]
    for i, key in enumerate(("pad_token_id", "bos_token_id", "eos_token_id")):
        if isinstance(d.get(key), int) and d[key] >= widths["vocab_size"]:
            over[key] = i
    return over


def _shrink(d: dict, explicit: dict, aliases: dict, layers: int) -> dict:
    """The overrides that make one (flat) config dict a miniature."""
    def name(key):
        return aliases.get(key, key)

    over = width_overrides(d, WIDTHS, aliases)
    full_layers = d.get(name("num_hidden_layers"))
    if isinstance(full_layers, int) and full_layers > 0:  # no layer count, no per-layer lists to cut
        n = min(full_layers, layers)
        over[name("num_hidden_layers")] = n
        for key in ("first_k_dense_replace", "moe_layer_start_index"):  # dense layers first: keep one
            if isinstance(d.get(key), int) and d[key] > 0:
                over[key] = min(d[key], 1)
        if isinstance(d.get("moe_layer_end_index"), int) and d["moe_layer_end_index"] >= n:
            over["moe_layer_end_index"] = n - 1
        for key, value in explicit.items():  # per-layer lists and layer indices, wherever a family keeps them
            how = _layer_keyed(key, value, full_layers) if key not in over else ""
            if how:
                over[key] = _shrink_layers(value, how, n)
    k = max([int(d[key]) for key in TOP_K_KEYS if isinstance(d.get(key), int)] or [1])
    groups = max([int(d[key]) for key in GROUP_KEYS if isinstance(d.get(key), int)] or [1])
    topk_group = max([int(d[key]) for key in TOPK_GROUP_KEYS if isinstance(d.get(key), int)] or [1])
    per_group = max(2, math.ceil(2 * k / topk_group)) if groups > 1 else 0
    for key in EXPERT_COUNT_KEYS:
        if isinstance(d.get(key), int) and d[key] > 0:
            want = max(8, 2 * k, groups * per_group)
            want = -(-want // groups) * groups
            over[key] = min(d[key], want)
    return over

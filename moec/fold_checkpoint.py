"""Fold pre-quantized Hugging Face checkpoints (compressed-tensors, GPTQ, AWQ, MXFP4) into moec without re-quantizing.

Each format has a reading of its own (moec/compressed_tensors_checkpoint.py, moec/gptq_checkpoint.py: a
`LinearFormat`) that turns the checkpoint's packed tensors, one Linear at a time, into `PackedLinear`s — unsigned codes, fp32 scales and zero points per group, in
moec's [N, K] layout — and checks them against its quantization config. This module does what is common:
Produces: the config's transformers model with every quantized weight dequantized exactly in fp32, as
(code - zero point) * scale — the arithmetic ONNX Runtime's QMoE does — and, for the stacked expert parameters,
the checkpoint's own codes, scales and zero points (moec.quant.WeightCodes; symmetric: zero point 2^(bits-1)).
fuse_moe stacks them into the fused layers and the QMoE artifact carries them unchanged. The expert layout
transformers' conversion gives (per-expert Linears on disk, stacked in the model) is followed by running the
same conversion over the codes and the scales, and every expert tensor is checked to dequantize to exactly the
weight the model got. Other quantized Linears (attention) stay dequantized fp32 weights, with a note.
Formats that quantize the stacked expert tensors themselves (GPT-OSS's MXFP4) have a loader of their own
(moec/mxfp4_checkpoint.py, STACKED_LOADERS) built on the same model builder.
Refuses (QuantError): experts quantized with different schemes, a layout the codes can't follow, tensors the
model of config.json lacks or does not have.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moec.quant import QuantError, QuantizedWeight, QuantSpec, WeightCodes, dequantize


@dataclass
class PackedLinear:
    """One quantized Linear of the checkpoint, unpacked: unsigned codes, fp32 scales and zero points per group."""

    codes: torch.Tensor  # int32 [N, K], 0 .. 2^bits - 1
    scales: torch.Tensor  # float32 [N, G]
    zero_points: Optional[torch.Tensor]  # int32 [N, G], or None: symmetric (2^(bits-1))
    spec: QuantSpec

    def dequantized(self) -> torch.Tensor:
        """(code - zero point) x scale in fp32: the difference is a small integer, exact in fp32, so computing it
        in place in fp32 gives the integer arithmetic's result bit for bit, with one rounding (the product)."""
        n, k = self.codes.shape
        g = self.scales.shape[1]
        blocks = self.codes.reshape(n, g, k // g).to(torch.float32, copy=True)  # the codes themselves untouched
        if self.zero_points is None:
            blocks.sub_(1 << (self.spec.bits - 1))
        else:
            blocks.sub_(self.zero_points[..., None].float())
        return blocks.mul_(self.scales[..., None]).reshape(n, k)

    def per_element(self, field: str) -> Optional[torch.Tensor]:
        """`codes`, `scales` or `zero_points` as an fp32 [N, K] map laid out like the weight (a group's value on
        each of its columns; None for absent zero points): what a layout transform of the weights can carry."""
        t = getattr(self, field)
        if t is None:
            return None
        t = t.float()
        return t if field == "codes" else t.repeat_interleave(self.codes.shape[1] // t.shape[1], 1)


def groups_in_order(g_idx: torch.Tensor, k: int, block: Optional[int]) -> bool:
    """A g_idx (each input column's group) that is contiguous blocks of `block` columns (None: one group), the
    only act-order layout QMoE's blocks can hold."""
    return tuple(g_idx.shape) == (k,) and torch.equal(g_idx.to(torch.int64), torch.arange(k) // (block or k))


def exact_codes(codes: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor], spec: QuantSpec,
                weight: torch.Tensor) -> Optional[QuantizedWeight]:
    """Per-element code, scale and zero-point maps (laid out as `weight` is, K last) as QMoE's codes at `spec`,
    if they dequantize to exactly `weight`; None when they don't (or their blocks don't even reshape: K is not
    last), i.e. a layout the codes can't follow."""
    step = spec.block_size or codes.shape[-1]
    z = None if spec.symmetric or zero_points is None else zero_points[..., ::step].round().to(torch.int32)
    q = QuantizedWeight(codes.round().to(torch.int32), scales[..., ::step].contiguous(), z, spec)
    try:
        return q if torch.equal(dequantize(q), weight) else None
    except RuntimeError:
        return None


@dataclass
class LinearFormat:
    """A per-Linear format's reading (moec/compressed_tensors_checkpoint.py, moec/gptq_checkpoint.py), its config
    already checked: the tensor parts a quantized Linear `<prefix>.<part>` is stored as, and two readings of one
    Linear's parts, shared by the in-memory fold and the out-of-core stream (moec.packed_stream)."""

    name: str  # the report's checkpoint_format
    parts: tuple[str, ...]
    # (prefix, its parts' tensors, the file) -> the Linear unpacked and checked
    read: Callable[[str, dict[str, torch.Tensor], str], PackedLinear]
    # (prefix, its parts' stored shapes, the file, a reader of one small part's tensor) -> ([N, K], its QuantSpec),
    # from the headers: what an out-of-core compile must know before it reads any codes
    layout: Callable[[str, dict[str, tuple], str, Callable[[str], torch.Tensor]], tuple[tuple[int, int], QuantSpec]]
    act_order: str = ""  # the part holding each input column's group, when the config allows act-order


def read_linears(path: str, fmt: LinearFormat) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """Every quantized Linear of the checkpoint (by module prefix) and its plain tensors (by name)."""
    raw, where, plain = read_tensors(path, fmt.parts)
    return {prefix: fmt.read(prefix, parts, where[prefix]) for prefix, parts in raw.items()}, plain


def quantization_config(path: str) -> Optional[dict]:
    """config.json's quantization_config, if it has one."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and qc else None


def quant_method(path: str) -> Optional[str]:
    """config.json's quantization_config.quant_method, when it names a format moec folds."""
    method = (quantization_config(path) or {}).get("quant_method")
    return method if method in READERS or method in STACKED_LOADERS else None


def read_tensors(path: str, parts: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str], dict]:
    """The checkpoint's tensors: per module prefix its quantization `parts`, the file holding each (by prefix, the
    last read; by full tensor name, its own), and the plain tensors by name."""
    from safetensors import safe_open

    from moec.safetensors_check import checkpoint_files

    raw: dict[str, dict[str, torch.Tensor]] = {}
    where: dict[str, str] = {}
    plain: dict[str, torch.Tensor] = {}
    for fname in checkpoint_files(path):
        file = os.path.join(path, fname)
        with safe_open(file, "pt") as f:
            for key in f.keys():
                prefix, _, part = key.rpartition(".")
                if part in parts:
                    raw.setdefault(prefix, {})[part] = f.get_tensor(key)
                    where[prefix] = where[key] = file
                else:
                    plain[key] = f.get_tensor(key)
    return raw, where, plain


def load_quantized_checkpoint(path: str):
    """(model with exactly dequantized weights, the experts' QuantSpec or None, their codes, notes, format name)."""
    method = quant_method(path)
    if method in STACKED_LOADERS:
        return STACKED_LOADERS[method]()(path)
    fmt = READERS[method]()(path)
    linears, plain = read_linears(path, fmt)
    if not linears:
        raise QuantError(f"'{path}': config.json says {fmt.name}, but no tensor of the checkpoint is quantized that way.")
    model, spec, table, notes = fold(path, linears, plain, fmt.name)
    return model, spec, table, notes, fmt.name


def model_builder(path: str) -> Callable[[dict], torch.nn.Module]:
    """state dict (checkpoint names) -> the fp32 transformers model of path's config.json holding it, loaded
    through transformers' own checkpoint conversion (renamings, expert stacking) with its quantizer off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moec.lazy_checkpoint import load_converted, parameters_on_meta

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # moec folds the codes itself; transformers' quantizer must not wrap layers

    def build(state: dict) -> torch.nn.Module:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        info = load_converted(model, state)
        bad = sorted(info.unexpected_keys or []) + [k for k, *_ in (info.mismatched_keys or [])]
        if bad:
            raise QuantError(f"'{path}': tensor '{bad[0]}' does not fit the model of config.json ({len(bad)} such).")
        return model

    return build


def complete(path: str, model: torch.nn.Module) -> torch.nn.Module:
    """Refuses a model some of whose parameters the checkpoint lacked; ties the embeddings as transformers does."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise QuantError(f"'{path}': the checkpoint lacks '{missing[0]}' ({len(missing)} parameters); transformers "
                         "would initialize them randomly.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def fold(path: str, linears: dict[str, PackedLinear], plain: dict[str, torch.Tensor], fmt: str):
    build = model_builder(path)
    model = complete(path, build({**plain, **{f"{p}.weight": l.dequantized() for p, l in linears.items()}}))
    table, spec, notes = _expert_codes(path, model, linears, build, fmt)
    params = dict(model.named_parameters())
    dense = [p for p in linears if f"{p}.weight" in params]  # a Linear of its own in the model, not stacked
    for p in dense:  # their own codes, for --quant-dense (quantize_dense checks them against the weight, and folds them)
        l = linears[p]
        table.attach(params[f"{p}.weight"], QuantizedWeight(l.codes[None], l.scales[None], None if l.zero_points is None
                                                            else l.zero_points[None], l.spec))
    if dense:
        notes.append(dense_note(dense))
    return model.eval(), spec, table, notes


def dense_note(dense: list[str]) -> str:
    """What became of the quantized Linears that are not experts (attention): the report's note."""
    return (f"{len(dense)} other quantized Linear layers (e.g. {dense[0]}) dequantized to fp32 weights "
            "(--quant-dense folds their own codes into MatMulNBits where its blocks take them)")


def _expert_codes(path: str, model, linears: dict[str, PackedLinear], build,
                  fmt: str) -> tuple[WeightCodes, Optional[QuantSpec], list]:
    """Each stacked expert parameter's codes, scales and zero points: the checkpoint's, laid out as transformers
    laid out the weights (the same conversion run over them, renamings included: Mixtral's block_sparse_moe.w1/w3
    become mlp.experts.gate_up_proj), checked to dequantize to exactly the weight."""
    schemes = sorted({l.spec for l in linears.values()}, key=lambda q: (q.bits, q.block_size or 0, q.symmetric))

    def expanded(field):
        out = {}
        for p, l in linears.items():
            # "scheme": which scheme each weight element came with, to follow it through the conversion
            t = torch.full(l.codes.shape, float(schemes.index(l.spec))) if field == "scheme" else l.per_element(field)
            if t is not None:
                out[f"{p}.weight"] = t
        return out

    fields = ["codes", "scales"] + (["scheme"] if len(schemes) > 1 else []) + (
        ["zero_points"] if any(l.zero_points is not None for l in linears.values()) else [])
    maps = {}
    for f in fields:  # one map model at a time, keeping only the stacked (3-D) parameters
        maps[f] = {n: p.detach() for n, p in build(expanded(f)).named_parameters() if p.dim() == 3}
    params = dict(model.named_parameters())
    table, used = WeightCodes(), set()
    for name, weight in params.items():
        c = maps["codes"].get(name)
        if weight.dim() != 3 or c is None or c.is_meta:
            continue
        ids = maps["scheme"][name].unique() if "scheme" in maps else torch.zeros(1)
        if len(ids) != 1:
            raise QuantError(f"'{path}': the experts stacked into '{name}' are quantized with {len(ids)} different "
                             "schemes; QMoE takes one per layer.")
        spec = schemes[int(ids[0])]
        q = exact_codes(c, maps["scales"][name], maps["zero_points"][name] if "zero_points" in maps else None, spec,
                        weight)
        if q is None:
            raise QuantError(f"'{path}': the codes of '{name}' do not dequantize to its weight once laid out as "
                             "transformers lays out the experts (a transform moec can't follow the codes through); "
                             "not folded.")
        table.attach(weight, q)
        used.add(spec)
    if len(used) > 1:
        raise QuantError(f"'{path}': experts are quantized with different schemes ({', '.join(q.name for q in used)}); "
                         "one expert precision per model is supported.")
    notes = [f"{fmt} expert weights ({next(iter(used)).name}) folded without re-quantizing"] if used else []
    return table, (next(iter(used)) if used else None), notes


def _compressed_tensors():
    from moec.compressed_tensors_checkpoint import linear_format

    return linear_format


def _gptq():
    from moec.gptq_checkpoint import gptq_format

    return gptq_format


def _awq():
    from moec.gptq_checkpoint import awq_format

    return awq_format


def _mxfp4():
    from moec.mxfp4_checkpoint import load_mxfp4

    return load_mxfp4


# quant_method in config.json -> a factory of its reading: path -> LinearFormat (the config checked)
READERS: dict[str, Callable[[], Callable]] = {"compressed-tensors": _compressed_tensors, "gptq": _gptq, "awq": _awq}
# Formats that quantize stacked expert tensors rather than Linears: a factory of a loader giving what
# load_quantized_checkpoint gives.
STACKED_LOADERS: dict[str, Callable[[], Callable]] = {"mxfp4": _mxfp4}

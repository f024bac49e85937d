"""Load what `moec compile SOURCE` names into a module, example inputs and dynamic shapes.

SOURCE forms: none (the built-in demo), ``package.module:factory``, a ``.pt2`` file saved
with torch.export.save, or a Hugging Face model directory (config.json + safetensors),
loaded offline. Each failure raises SourceError naming the source and what to do.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from moec.errors import SourceError
from moec.quant import WeightCodes


@dataclass
class LoadedSource:
    module: nn.Module
    example_args: tuple
    dynamic_shapes: Any = None  # as torch.export takes it; None = static
    identity: str = ""
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what capture choices were made
    input_kinds: list[str] = field(default_factory=list)  # "tokens:<vocab>", "int" (vocabulary unknown) or "float"
    prequantized: Any = None  # the QuantSpec of a packed checkpoint's expert weights, if any
    weight_codes: WeightCodes = field(default_factory=WeightCodes)  # and their codes, by weight tensor
    quant_format: str = ""  # the checkpoint format the codes came in ("moec-packed/1", compressed-tensors ...)
    derived_dims: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dim -> the dims it is the sum of

    def make_inputs(self, seed: int, seq_len: Optional[int] = None, batch: Optional[int] = None) -> tuple:
        """Fresh fixed-seed inputs shaped like the example (optionally another batch/sequence)."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for i, a in enumerate(self.example_args):
            shape = list(a.shape)
            if batch is not None and self._is_dynamic(i, 0):
                shape[0] = batch
            if seq_len is not None and len(shape) > 1 and self._is_dynamic(i, 1):
                shape[1] = seq_len
            kind = self.input_kinds[i] if i < len(self.input_kinds) else "float"
            out.append(random_like(a, shape, gen, int(kind.split(":")[1]) if kind.startswith("tokens:") else None))
        return tuple(out)

    def verification_inputs(self, other_seq: Optional[int] = None, seed: int = 100) -> list[tuple]:
        """The example's shape, and another sequence length (`other_seq`, else a derived one) at batch 1 —
        or, with a dynamic batch alone, another batch size. Drawn from seeds `seed` and `seed` + 1."""
        inputs = [self.make_inputs(seed=seed)]
        dynamic_seq = bool(self.example_args) and self._is_dynamic(0, 1)
        if dynamic_seq:
            seq = int(self.example_args[0].shape[1])
            other = other_seq or (seq + 5 if seq < 64 else max(2, seq // 2))
            inputs.append(self.make_inputs(seed=seed + 1, seq_len=other, batch=1 if self._is_dynamic(0, 0) else None))
        elif self.example_args and self._is_dynamic(0, 0):
            inputs.append(self.make_inputs(seed=seed + 1, batch=int(self.example_args[0].shape[0]) + 1))
        return inputs

    def dim_ranges(self) -> dict[str, tuple[int, Optional[int], int]]:
        """Named dynamic dims -> (min, max or None if unbounded, example size)."""
        out: dict[str, tuple[int, Optional[int], int]] = {}
        ds = self.dynamic_shapes
        if ds is None:
            return out
        specs = list(ds.values()) if isinstance(ds, dict) else list(ds)
        for i, (a, spec) in enumerate(zip(self.example_args, specs)):
            for axis, dim in (spec or {}).items() if isinstance(spec, dict) else []:
                if dim is None:  # torch.export's way of saying static
                    continue
                lo, hi = self.dim_range(i, axis)
                out.setdefault(getattr(dim, "__name__", f"d{axis}"), (lo, hi, int(a.shape[axis])))
        return out

    def dim_spec(self, arg: int, axis: int):
        """The torch.export Dim of input `arg`'s `axis`, or None when that dim is fixed."""
        ds = self.dynamic_shapes
        if ds is None:
            return None
        spec = ds[arg] if isinstance(ds, (tuple, list)) else list(ds.values())[arg]
        return spec.get(axis) if isinstance(spec, dict) else None

    def dim_range(self, arg: int, axis: int) -> Optional[tuple[int, Optional[int]]]:
        """(min, max or None if unbounded) of a dynamic dim; None when the dim is fixed."""
        dim = self.dim_spec(arg, axis)
        if dim is None:
            return None
        lo, hi = getattr(dim, "min", 1), getattr(dim, "max", None)
        return int(lo or 1), None if hi is None or not isinstance(hi, int) or hi > 2**40 else int(hi)

    def _is_dynamic(self, arg: int, dim: int) -> bool:
        return self.dim_spec(arg, dim) is not None


def random_like(example: torch.Tensor, shape, gen: Optional[torch.Generator] = None,
                vocab: Optional[int] = None) -> torch.Tensor:
    """A random input of `shape` like `example`: token ids below `vocab`, normal floats, or integers in
    the example's range."""
    if vocab is not None:
        return torch.randint(0, vocab, shape, generator=gen, dtype=example.dtype)
    if example.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=example.dtype)
    hi = int(example.max()) + 1 if example.numel() else 2
    return torch.randint(0, max(hi, 2), shape, generator=gen, dtype=example.dtype)


class CausalLMLogits(nn.Module):
    """input_ids -> logits, without a KV cache: the graph a serving artifact exposes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def causal_lm_source(model: nn.Module, identity: str, batch: int = 2, seq: int = 8,
                     example: Optional[torch.Tensor] = None) -> LoadedSource:
    notes = []
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen) if example is None else example
    max_pos = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=max_pos)},)
    return LoadedSource(
        CausalLMLogits(model).eval(), (ids,), dynamic, identity, ["input_ids"], ["logits"], notes,
        [f"tokens:{vocab}"],
    )


def load_source(source: Optional[str], static: bool = False, task: Optional[str] = None) -> LoadedSource:
    """`static`: keep a factory's example shapes when it gives no dynamic shapes, and compile a Hugging Face
    directory as the logits graph at its example's shapes (--static).
    `task`: "text-generation" (a KV-cache decoder; the default for Hugging Face directories and transformers
    factories) or "logits" (input_ids -> logits; the default for the built-in demo). Other sources have no
    task and refuse "text-generation"."""
    if source is None or source in ("", "demo", "builtin:mixtral-demo"):
        from moec.demo import mixtral_demo

        if task == "text-generation":
            return as_task(mixtral_demo().module.model, "builtin:mixtral-demo", task, "the built-in demo")
        return mixtral_demo()
    if os.path.isdir(source):
        if not static:
            return load_hf_dir(source, task)
        # --static asks for the logits graph at the example's shapes, as for a factory's causal LM
        refuse_generation_static(task, f"'{source}'")
        return made_static(load_hf_dir(source, "logits"))
    if source.endswith(".pt2"):
        refuse_generation(task, f"'{source}' is a torch.export program, not a transformers causal LM")
        return load_pt2(source)
    if ":" in source:
        return load_factory(source, static, task)
    raise SourceError(
        f"cannot interpret SOURCE '{source}': expected 'package.module:factory', a .pt2 file saved "
        "with torch.export.save, or a Hugging Face model directory (config.json + *.safetensors)."
    )


def as_task(model: nn.Module, identity: str, task: Optional[str], what: str,
            example: Optional[torch.Tensor] = None, source_dir: Optional[str] = None) -> LoadedSource:
    """A transformers causal LM as the graph `task` asks for (text-generation unless told otherwise)."""
    if task in (None, "text-generation"):
        from moec.generation import decoder_source

        return decoder_source(model, identity, source_dir)
    if task != "logits":
        raise SourceError(f"unknown task '{task}' for {what}; expected text-generation or logits.")
    return causal_lm_source(model, identity, example=example)


def made_static(src: LoadedSource) -> LoadedSource:
    """A Hugging Face directory's logits graph with --static: the example's shapes, no dynamic dims."""
    src.dynamic_shapes = None
    src.notes.append("--static: input_ids -> logits at the example's shapes (no dynamic dims)")
    return src


def refuse_generation_static(task: Optional[str], what: str) -> None:
    if task == "text-generation":
        raise SourceError(f"--static with --task text-generation for {what}: a text-generation artifact has its own "
                          "dynamic dims (batch, seq, past, total). Drop --static, or compile with --task logits.")


def refuse_generation(task: Optional[str], why: str) -> None:
    if task == "text-generation":
        raise SourceError(f"--task text-generation needs a transformers causal LM (a Hugging Face model directory or "
                          f"a factory returning a *ForCausalLM), and {why}; compile it without --task.")


def load_factory(spec: str, static: bool = False, task: Optional[str] = None) -> LoadedSource:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:
        raise SourceError(
            f"cannot import module '{mod_name}' named by SOURCE '{spec}': {type(exc).__name__}: {exc}. "
            "Check the module path and that it is importable (PYTHONPATH, installed package)."
        ) from exc
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise SourceError(f"module '{mod_name}' has no callable '{fn_name}' (SOURCE '{spec}').")
    try:
        result = fn()
    except Exception as exc:
        raise SourceError(
            f"factory '{spec}' raised {type(exc).__name__}: {exc}. The factory must build the model "
            "without network access and return (module, example_args[, dynamic_shapes])."
        ) from exc
    if isinstance(result, LoadedSource):
        if task == "text-generation" and isinstance(result.module, CausalLMLogits):
            return as_task(result.module.model, result.identity, task, f"factory '{spec}'")
        refuse_generation(task, f"factory '{spec}' returned a LoadedSource of {type(result.module).__name__}")
        return result
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], nn.Module):
        raise SourceError(
            f"factory '{spec}' returned {type(result).__name__}; expected (module, example_args) or "
            "(module, example_args, dynamic_shapes)."
        )
    module, args = result[0], result[1]
    args = args if isinstance(args, tuple) else (args,)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise SourceError(f"factory '{spec}' returned example input {i} as {type(a).__name__}; example_args must "
                              "be a tuple of tensors (one per forward argument).")
    dyn = result[2] if len(result) == 3 else None
    if not is_causal_lm(module):
        refuse_generation(task, f"factory '{spec}' returned a {type(module).__name__}")
    # Example shapes or --static given for a causal LM ask for the logits graph unless the task is explicit.
    if is_causal_lm(module) and (task == "text-generation" or (task is None and dyn is None and not static)):
        if dyn is not None or static:
            raise SourceError(f"factory '{spec}' returned a causal LM with {'dynamic shapes' if dyn else '--static'}; "
                              "a text-generation artifact has its own inputs and dims (batch, seq, past, total). "
                              "Drop them, or compile with --task logits.")
        src = as_task(module.eval(), f"factory:{spec}", task, f"factory '{spec}'")
        src.notes.append(f"{type(module).__name__} from factory '{spec}' compiled as a KV-cache decoder")
        return src
    if is_causal_lm(module):  # a transformers model as it comes: wrapped as a Hugging Face directory is
        if len(args) != 1 or args[0].is_floating_point() or args[0].dim() != 2:
            raise SourceError(f"factory '{spec}' returned a {type(module).__name__} with example inputs "
                              f"{[tuple(a.shape) for a in args]}; a causal LM takes one [batch, seq] tensor of token "
                              "ids.")
        src = causal_lm_source(module.eval(), f"factory:{spec}", example=args[0])
        if dyn is not None:
            src.dynamic_shapes = dyn
        elif static:
            src.dynamic_shapes = None
        src.notes.append(f"{type(module).__name__} wrapped as input_ids -> logits (no KV cache)")
        return src
    src = LoadedSource(module.eval(), args, dyn, f"factory:{spec}",
                       [f"input_{i}" for i in range(len(args))], [], [], [input_kind(a) for a in args])
    if dyn is None and not static:
        src.dynamic_shapes, note = infer_dynamic_shapes(src.module, args)
        src.notes.append(note)
    return src


def input_kind(example: torch.Tensor) -> str:
    return "float" if example.is_floating_point() else "int"


def is_causal_lm(module: nn.Module) -> bool:
    """A transformers model with a language-model head (what AutoModelForCausalLM returns)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return (isinstance(module, PreTrainedModel) and hasattr(module, "generate")
            and module.get_output_embeddings() is not None)


BATCH_MAX, SEQ_MAX = 1024, 4096


def infer_dynamic_shapes(module: nn.Module, args: tuple) -> tuple[Any, str]:
    """Dynamic dims for a factory that gave none: dim 0 of every input as `batch` and, for token ids
    [B, S] and hidden states [B, S, H], dim 1 as `seq` — when all inputs agree on those sizes and the
    eager model runs at other sizes (probed). Returns (dynamic_shapes or None, a note for the report)."""
    def agreed(dim: int, min_rank: int) -> bool:
        sizes = {int(a.shape[dim]) for a in args if a.dim() >= min_rank}
        return len(sizes) == 1 and next(iter(sizes)) >= 2 and all(a.dim() >= min_rank for a in args)

    def runs(shapes: dict[int, int]) -> bool:
        probe = [random_like(a, [shapes.get(d, n) for d, n in enumerate(a.shape)]) for a in args]
        try:
            with torch.no_grad():
                module(*probe)
            return True
        except Exception:
            return False

    if not args:
        return None, "no inputs: static"
    batch = agreed(0, 1)
    seq = agreed(1, 2) and all((a.dim() == 2 and not a.is_floating_point()) or a.dim() == 3 for a in args)
    candidates = [c for c in ((batch, seq), (batch, False), (False, seq)) if any(c)]
    for use_batch, use_seq in candidates:
        shapes = {}
        if use_batch:
            shapes[0] = int(args[0].shape[0]) + 1
        if use_seq:
            shapes[1] = int(args[0].shape[1]) + 3
        if not runs(shapes):
            continue
        spec = {}
        if use_batch:
            spec[0] = torch.export.Dim("batch", min=1, max=BATCH_MAX)
        if use_seq:
            spec[1] = torch.export.Dim("seq", min=2, max=SEQ_MAX)
        names = ", ".join(f"dim {d} = {'batch' if d == 0 else 'seq'}" for d in spec)
        return tuple(dict(spec) for _ in args), (
            f"dynamic dims inferred for every input ({names}; probed: the eager model runs at other sizes); "
            "--static keeps the example's shapes")
    return None, "no dynamic dims inferred (the eager model does not run at other batch/sequence sizes): static"


def load_pt2(path: str) -> LoadedSource:
    if not os.path.isfile(path):
        raise SourceError(f"checkpoint '{path}' does not exist.")
    try:
        ep = torch.export.load(path)
    except Exception as exc:
        raise SourceError(
            f"cannot read '{path}' as a torch.export program: {type(exc).__name__}: {str(exc)[:300]}. "
            "Save it with torch.export.save(torch.export.export(model, args), path)."
        ) from exc
    args = ep.example_inputs[0] if ep.example_inputs else None
    if args is None:
        raise SourceError(f"'{path}' has no example inputs recorded; re-save it with torch.export.save.")
    dyn = _dynamic_shapes_of(ep)
    try:
        module = torch.export.unflatten(ep)
        note = "pt2: module hierarchy recovered with torch.export.unflatten (MoE fusion applies)"
    except Exception as exc:
        module = ep.module()
        note = f"pt2: unflatten failed ({exc}); compiled as a flat graph without MoE fusion"
    return LoadedSource(module, tuple(args), dyn, f"pt2:{os.path.abspath(path)}",
                        [f"input_{i}" for i in range(len(args))], [], [note], [input_kind(a) for a in args])


def _dynamic_shapes_of(ep) -> Any:
    """Rebuild dynamic_shapes from an ExportedProgram's symbolic input dims."""
    specs = []
    names: dict[str, torch.export.Dim] = {}
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for s in user_inputs:
        val = placeholders[s.arg.name].meta.get("val")
        dims = {}
        for i, d in enumerate(getattr(val, "shape", ())):
            if isinstance(d, torch.SymInt):
                key = str(d)
                if key not in names:
                    rng = ep.range_constraints.get(d.node.expr)
                    lo = int(rng.lower) if rng is not None else 1
                    hi = int(rng.upper) if rng is not None and str(rng.upper) not in ("int_oo", "oo") else None
                    names[key] = torch.export.Dim(f"d{len(names)}", min=max(lo, 1), max=hi) if hi else torch.export.Dim(f"d{len(names)}", min=max(lo, 1))
                dims[i] = names[key]
        specs.append(dims or None)
    return tuple(specs) if any(specs) else None


def load_hf_dir(path: str, task: Optional[str] = None) -> LoadedSource:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise SourceError(f"'{path}' is a directory but has no config.json; a Hugging Face model directory is expected.")
    try:
        with open(cfg_path) as f:
            json.load(f)
    except Exception as exc:
        raise SourceError(f"'{cfg_path}' is not valid JSON: {exc}") from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    from moec.checkpoint import is_packed, load_packed

    if is_packed(path):
        from moec.checkpoint import FORMAT

        model, spec, codes = load_packed(path)
        src = as_task(model, f"hf-packed:{os.path.abspath(path)}", task, f"'{path}'", source_dir=path)
        src.prequantized, src.weight_codes, src.quant_format = spec, codes, FORMAT
        src.notes.append(f"packed expert weights ({spec.name}) folded without re-quantizing")
        return src
    from moec.fold_checkpoint import quant_method

    if quant_method(path) is not None:  # compressed-tensors, GPTQ, AWQ: their codes folded, not re-quantized
        from moec.fold_checkpoint import load_quantized_checkpoint

        model, spec, codes, notes, fmt = load_quantized_checkpoint(path)
        src = as_task(model, f"hf-quantized:{os.path.abspath(path)}", task, f"'{path}'", source_dir=path)
        src.weight_codes = codes  # the experts' and (for --quant-dense) the dense Linears'
        if spec is not None:
            src.prequantized, src.quant_format = spec, fmt
        src.notes += notes
        return src

    from moec.safetensors_check import checkpoint_files

    checkpoint_files(path)  # truncated files, missing shards: named before anything loads
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                           dtype=torch.float32, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)  # refused below, by name
    except Exception as exc:
        raise SourceError(
            f"cannot load the Hugging Face model in '{path}' offline: {type(exc).__name__}: {str(exc)[:400]}. "
            "The directory needs config.json and model.safetensors (or sharded safetensors with an index); "
            "moec never downloads from a hub."
        ) from exc
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, got, want = mismatched[0]
        raise SourceError(f"the checkpoint in '{path}' has {len(mismatched)} tensor(s) whose shape disagrees with "
                          f"its config.json: '{key}' is {tuple(got)} in the checkpoint, the model needs {tuple(want)}. "
                          "Nothing was written.")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise SourceError(f"the checkpoint in '{path}' holds {len(unexpected)} tensor(s) the model in its config.json "
                          f"does not have, e.g. '{unexpected[0]}'; it is not the checkpoint of this config. "
                          "Nothing was written.")
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values and say nothing
        raise SourceError(f"the checkpoint in '{path}' lacks {len(missing)} tensor(s) the model in its config.json "
                          f"needs, e.g. '{missing[0]}'; transformers would initialize them randomly. Nothing was "
                          "written.")
    return as_task(model.eval(), f"hf:{os.path.abspath(path)}", task, f"'{path}'", source_dir=path)

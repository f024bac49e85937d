"""compile(): a model in, a verified artifact directory out, as a list of named stages.

    load -> fold -> eager_reference -> passes -> capture -> onnx_export -> verify -> plan -> package

Each stage is a function with typed inputs and outputs; `compile()` only sequences them, and the
progress lines and `report.json`'s timings come from that sequence. Everything target-specific is
asked of the target (moec/targets/); the artifact is built in a temporary directory beside OUT and
renamed into place only once it is verified, so a failure leaves nothing half-written.

Memory discipline: the model's weights exist once. Passes rewrite layers in place (a layer's new
layout is made before its old one is dropped); the ONNX program aliases torch's tensors until it is
saved; eager reference outputs are computed before the ONNX Runtime session (which holds its own
copy) is created, and the torch model is released first.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from moec import targets, validate
from moec.errors import DiskFullError, FusionRequiredError, MoecError, OutputExistsError, VerificationError
from moec.export_onnx import Captured, capture, save_onnx, to_onnx, weight_bytes
from moec.fsutil import disk_error, make_workdir, release_workdir, remove_stale_workdirs, swap_into_place
from moec.golden import TOLERANCES, Probe, recorded_tolerance, weights_sha256, write_golden
from moec.heap import peak_rss
from moec.numerics import compare_tensors
from moec.passes.base import Pass, PassContext, PassManager, PassRecord, flatten_outputs
from moec.passes.cast_precision import in_fp32
from moec.passes.conditions import EXPERTS_PRUNED, MOE_FUSED, ROUTING_MEASURED
from moec.report import FP32_REL_L2, layer_summary, moec_version, pruning_summary, quantization_summary, versions
from moec.rewrite_rsqrt import NAME as REWRITE_RSQRT, rewrite_rsqrt
from moec.route_margins import MIN_MARGINS, conditioned_draw, watch_route_margins
from moec.simplify_graph import counted, simplify_graph
from moec.sources import LoadedSource, load_source
from moec.targets.base import ArtifactContext, Target
from moec.widen_bf16 import WIDENED_TOLERANCE

__all__ = ["CompileOptions", "CompileResult", "compile", "versions", "FP32_REL_L2"]

STAGES = ("load", "fold", "eager_reference", "passes", "capture", "onnx_export", "verify", "plan", "package")


@dataclass
class CompileOptions:
    out: str
    target: str = "onnxruntime"  # a name in moec.targets
    force: bool = False
    validate: bool = True
    fuse: bool = True
    require_fusion: bool = False
    disabled_passes: Sequence[str] = ()
    triton_repo: Optional[str] = None
    model_name: Optional[str] = None
    model_version: int = 1
    max_batch_size: Optional[int] = None
    instances: int = 1
    instances_given: bool = False  # else derived from the memory plan when --device-memory is set
    verify_seq_len: Optional[int] = None
    tolerance: float = FP32_REL_L2
    keep_failed: bool = False  # on a numerics failure, keep the artifact at OUT.failed for inspection
    log: Callable[[str], None] = lambda msg: None
    extra: dict[str, Any] = field(default_factory=dict)  # options for later passes (quant, memory)


@dataclass
class CompileResult:
    out_dir: str
    report: dict
    triton_model_dir: Optional[str] = None


# ----------------------------------------------------------------------------- what stages hand on


@dataclass
class Loaded:
    src: LoadedSource
    source: Optional[str]
    identity: dict  # source, identity, weights_sha256 (the golden manifest's model)
    notes: list[str]  # capture choices, for the report
    dim_ranges: dict
    calibration: Any = None  # moec.calibration.Calibration with --calibration
    derived_dims: dict = field(default_factory=dict)  # LoadedSource.derived_dims (kept: the source is freed)
    generation: Any = None  # moec.generation.GenerationInfo of a KV-cache decoder (--task text-generation)
    quant_format: str = ""  # LoadedSource.quant_format: the checkpoint format pre-quantized codes came in


@dataclass
class Reference:
    """Fixed-seed verification inputs and the eager model's outputs on them."""

    inputs: list[tuple]
    eager: list[list[torch.Tensor]]
    generation: Optional[list] = None  # a decoder's greedy runs (moec.greedy.GreedyRun) on the prompt sets
    route_margins: Optional[dict] = None  # which draw of inputs and how far its routing was from a tie


@dataclass
class Transformed:
    module: nn.Module
    records: list[PassRecord]
    layers: dict  # the report's moe_layers
    quant: Optional[dict]  # the report's quantization
    exact: list  # outputs after the last pass that changes numerics (pruned / dequantized model): the exact
    # reference for the artifact; [] when no such pass ran (eager PyTorch is the reference)
    exact_name: str = ""  # what `exact` is, for messages and the report: "dequantized reference" ...
    pruning: Optional[dict] = None  # the report's pruning
    routing: Optional[list] = None  # the report's routing statistics (with --calibration)
    exact_generation: Optional[list] = None  # a decoder's greedy runs after the last pass changing numerics
    exact_margins: Optional[dict] = None  # how near a routing tie `exact` came on the verification inputs
    bf16_arithmetic: Optional[dict] = None  # --dtype bf16: the eager bf16 model against eager fp32 (reported)


@dataclass
class Verified:
    numerics: dict
    feeds: list[dict]
    outputs: list[dict]
    evaluable_files: list[str]  # the target's runnable copy (kept for Triton), [] when the artifact runs


# ----------------------------------------------------------------------------- compile


class _Stages:
    """Runs the stages in order: a progress line each, and their wall times for the report."""

    def __init__(self, log: Callable[[str], None], stages: Sequence[str] = STAGES):
        self.log, self.timings, self.index, self.stages = log, {}, 0, stages
        self.peaks: dict[str, int] = {}  # the process's peak resident bytes when each stage ended (Linux)

    def __call__(self, name: str, what: str, fn: Callable, *args, **kwargs):
        assert name in self.stages, name
        self.index += 1
        self.log(f"[{self.index}/{len(self.stages)}] {name}: {what}")
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
            peak = peak_rss()
            if peak:
                self.peaks[name] = peak

    def peak_stage(self) -> Optional[str]:
        """The stage during which the process's peak resident memory was last raised."""
        before, where = 0, None
        for name, peak in self.peaks.items():
            if peak > before:
                before, where = peak, name
        return where



def compile(
    module: Optional[nn.Module] = None,
    example_args: Optional[tuple] = None,
    dynamic_shapes: Any = None,
    *,
    source: Optional[str] = None,
    options: CompileOptions,
) -> CompileResult:
    """Compile a model. Pass either (module, example_args[, dynamic_shapes]) or `source`."""
    t0 = time.perf_counter()
    target = targets.get(options.target)
    check_options(options, target)
    stage = _Stages(options.log)
    loaded = stage("load", f"loading {source or ('python module' if module is not None else 'built-in demo model')}",
                   load, module, example_args, dynamic_shapes, source, bool(options.extra.get("static")),
                   options.extra.get("task"))
    check_loaded(loaded, options)
    folded = stage("fold", "folding quantize/dequantize pairs on weights", fold, loaded, options)
    if folded.spec is not None:
        adopt_checkpoint_quantization(folded.spec, options)
        check_dtype(options)  # the checkpoint's own quantization stands for --quant
    check_quantization(options, folded.spec is not None)
    fold_records = folded.records
    reference = stage("eager_reference", "eager PyTorch outputs on the verification inputs", eager_reference, loaded,
                      options)
    passes = build_passes(options, target)
    names = [p.name for p in passes if p.name not in options.disabled_passes]
    transformed = stage("passes", "running passes: " + (", ".join(names) or "none"), transform,
                        loaded, reference, passes, options, target, fold_records)
    captured = stage("capture", "capturing with torch.export", capture_model, transformed, loaded)
    program, graph = stage("onnx_export", "converting to ONNX", export_graph, captured, loaded, target, options)
    capture_notes = captured.notes
    del captured
    with _workdir(options.out, options.log) as tmp:
        model_path = os.path.join(tmp, "model.onnx")
        onnx_weight_bytes = weight_bytes(program)
        files = save_onnx(program, model_path, shard_bytes=options.extra.get("shard_size"), log=options.log)
        generation = None
        if loaded.generation is not None:
            from moec.generation import write_generation_files

            generation = write_generation_files(tmp, loaded.generation)
            files += [os.path.join(tmp, f) for f in ["genai_config.json"] * generation["genai_config"]
                      + generation["tokenizer_files"]]
        gen_golden = generation_golden(loaded, reference, transformed, options)
        del program, transformed.module, loaded.src
        gc.collect()  # the torch weights go before ONNX Runtime loads its own copy
        verified = stage("verify", "verifying with ONNX Runtime", verify, model_path, tmp, reference, transformed,
                         options, target, gen_golden)
        if transformed.exact_generation and reference.generation:  # how far quantization / pruning moved tokens
            from moec.greedy import token_agreement

            verified.numerics["generation"]["tokens_equal_to_fp32"] = token_agreement(reference.generation,
                                                                                      transformed.exact_generation)
        report = {
            "moec_version": moec_version(),
            "source": source or "python-module",
            "model": loaded.identity,
            "target": target.name,
            "dtype": dtype_of(options),
            "capture": {"method": "torch.export (non-strict)", "notes": loaded.notes + capture_notes},
            "passes": [r.to_dict() for r in fold_records + transformed.records],
            "graph": graph,
            "moe_layers": transformed.layers,
            "quantization": transformed.quant if transformed.quant is None or not loaded.quant_format else dict(
                transformed.quant, checkpoint_format=loaded.quant_format),
            "pruning": transformed.pruning,
            "routing": transformed.routing,
            "generation": generation,
            "calibration": None if loaded.calibration is None else {
                "data": loaded.calibration.description, "tokens": loaded.calibration.tokens},
            "numerics": dict(verified.numerics, route_margins=dict(reference.route_margins or {},
                                                                   exact_reference=transformed.exact_margins)),
            "weights_bytes": onnx_weight_bytes,
            "files": sorted(os.path.relpath(f, tmp) for f in files) + ["golden/"],
            "versions": versions(),
        }
        write_golden(os.path.join(tmp, "golden"),
                     [Probe(f"probe{i}", f, o) for i, (f, o) in enumerate(zip(verified.feeds, verified.outputs))],
                     model=loaded.identity,
                     precision=transformed.quant["precision"] if transformed.quant else dtype_of(options),
                     tolerance=recorded_tolerance(dtype_of(options), bool(transformed.quant),
                                                  verified.numerics["tolerance_rel_l2"]), versions=versions())
        if gen_golden is not None:
            from moec.greedy import write_generation_golden

            write_generation_golden(os.path.join(tmp, "golden"), gen_golden)
        memory = stage("plan", "planning memory", plan_artifact_memory, model_path, loaded.dim_ranges, options,
                       report, target, loaded.derived_dims)
        if memory is not None:
            report["memory"] = memory
        artifact = ArtifactContext(tmp, model_path, files, report, options, verified.evaluable_files, options.log)
        triton_dir = stage("package", "writing the artifact", package, artifact, target, stage.timings, t0)
        return CompileResult(os.path.abspath(options.out), report, triton_dir)


# ----------------------------------------------------------------------------- stages


def check_options(options: CompileOptions, target: Target) -> None:
    """Everything that can be refused before any work: options, destinations."""
    targets.base.refuse_foreign_options(target, options.extra, targets.all_targets())
    extra = options.extra
    target.check_options(options)
    validate.check_positive(options.tolerance, "--tolerance")
    validate.check_positive(extra.get("accuracy_budget"), "--accuracy-budget", allow_zero=True)
    validate.check_positive(extra.get("shard_size"), "--shard-size")
    check_pruning(options)
    check_dtype(options)
    if options.max_batch_size is not None and options.max_batch_size < 0:
        raise MoecError(f"--max-batch-size {options.max_batch_size}: must be >= 0 (0: Triton does not batch).")
    if options.instances < 1:
        raise MoecError(f"--instances {options.instances}: must be >= 1.")
    for name, size in (extra.get("max_shape") or {}).items():
        if not isinstance(size, int) or size < 1:
            raise MoecError(f"--max-shape {name}={size}: sizes must be integers >= 1.")
    if extra.get("device_memory") is not None:
        from moec.memory import parse_size

        validate.check_positive(parse_size(extra["device_memory"]), "--device-memory")
    if os.path.isdir(options.out) and not options.force:
        raise OutputExistsError(
            f"output directory '{options.out}' already exists; moec never overwrites an artifact "
            "unless asked: pass --force to replace it, or choose another --out."
        )
    validate.check_destination(options.out, "--out", options.force)
    if options.triton_repo:
        from moec.triton_repo import check_version_free

        validate.check_model_name(options.model_name if options.model_name is not None else "moe_model")
        validate.check_destination(options.triton_repo, "--triton-repo", must_be_dir_if_exists=True)
        check_version_free(options.triton_repo, options.model_name or "moe_model", options.model_version,
                           options.force)


def check_quantization(options: CompileOptions, prequantized: bool) -> None:
    """Once the checkpoint's own quantization is adopted (it may stand for --quant)."""
    quant = options.extra.get("quant")
    what = "the model's expert weights are already quantized and" if prequantized else f"--quant {quant}"
    if quant and not options.fuse:
        raise MoecError(f"{what} quantizes the fused experts; it needs MoE fusion (drop --no-fusion).")
    if quant == "auto":
        if options.extra.get("accuracy_budget") is None:
            raise MoecError("--quant auto picks each MoE layer's precision (int2, int4, int8 or full) to write the "
                            "fewest bytes within --accuracy-budget; give it (e.g. --accuracy-budget 0.05).")
        if options.extra.get("quant_dense"):
            raise MoecError("--quant-dense quantizes the other Linear layers with the experts' setting; --quant auto "
                            "has one per layer. Give --quant int8|int4|int2 with --quant-dense.")
        if options.extra.get("prune_experts") == "auto":
            raise MoecError("--prune-experts auto and --quant auto would both spend --accuracy-budget; give one of "
                            "them a fixed setting (a fraction, or int8|int4|int2).")
    if options.extra.get("quant_dense") and not quant:
        raise MoecError("--quant-dense quantizes the other Linear layers with the experts' settings; give --quant "
                        "int8|int4|int2 too.")
    for key in ("block_size", "asymmetric", "accuracy_budget", "accuracy_level"):
        if key == "accuracy_budget" and options.extra.get("prune_experts") is not None:
            continue  # it bounds the pruning too
        if options.extra.get(key) is not None and options.extra.get(key) is not False and not quant:
            raise MoecError(f"--{key.replace('_', '-')} {options.extra[key]} applies to quantized experts; give "
                            "--quant int8|int4|int2 too, or drop it.")


def check_pruning(options: CompileOptions) -> None:
    """--prune-experts / --prune-by / --calibration, before any work."""
    from moec.passes.prune_experts import RANKINGS, PruneError, check_fraction

    extra = options.extra
    prune = extra.get("prune_experts")
    if prune is not None:
        check_fraction(prune)
        if not options.fuse:
            raise PruneError("--prune-experts removes experts from fused MoE layers; it needs MoE fusion (drop "
                             "--no-fusion).")
        if not extra.get("calibration"):
            raise PruneError("--prune-experts ranks experts by how they are routed on calibration data: give "
                             "--calibration FILE.npy|FILE.jsonl|random:N.")
        if prune == "auto" and extra.get("accuracy_budget") is None:
            raise PruneError("--prune-experts auto picks how many experts each layer loses from --accuracy-budget; "
                             "give it (e.g. --accuracy-budget 0.05) or a fraction.")
    if extra.get("prune_by") is not None:
        if prune is None:
            raise PruneError(f"--prune-by {extra['prune_by']} ranks experts for --prune-experts; give it too.")
        if extra["prune_by"] not in RANKINGS:
            raise PruneError(f"--prune-by {extra['prune_by']}: expected one of {', '.join(RANKINGS)}.")
    if extra.get("calibration") is not None:
        from moec.calibration import check_spec

        check_spec(extra["calibration"])
    if extra.get("calibration") and not options.fuse:
        raise MoecError("--calibration measures the fused MoE layers' routing; it needs MoE fusion (drop "
                        "--no-fusion).")


def load(module: Optional[nn.Module], example_args: Optional[tuple], dynamic_shapes: Any,
         source: Optional[str], static: bool = False, task: Optional[str] = None) -> Loaded:
    if module is not None and task == "text-generation":
        from moec.sources import as_task, is_causal_lm, refuse_generation

        if not is_causal_lm(module):
            refuse_generation(task, f"the module given is a {type(module).__name__}")
        src = as_task(module.eval(), "python:" + type(module).__name__, task, type(module).__name__)
    elif module is not None:
        src = LoadedSource(module.eval(), tuple(example_args or ()), dynamic_shapes, "python:" + type(module).__name__,
                           [], [], [], [])
        src.input_names = [f"input_{i}" for i in range(len(src.example_args))]
        src.input_kinds = ["float" if a.is_floating_point() else "int" for a in src.example_args]
    else:
        src = load_source(source, static=static, task=task)
    identity = {"source": source or src.identity, "identity": src.identity, "weights_sha256": weights_sha256(src.module)}
    return Loaded(src, source, identity, list(src.notes), src.dim_ranges(), derived_dims=dict(src.derived_dims),
                  generation=getattr(src, "info", None), quant_format=src.quant_format)


def check_loaded(loaded: Loaded, options: CompileOptions) -> None:
    """What needs the model: --max-shape names its dims; its weights are finite (named otherwise)."""
    validate.check_max_shape(options.extra.get("max_shape"), loaded.dim_ranges)
    if dtype_of(options) != "fp32" and loaded.generation is not None:
        # measured: fp16 rounding flips expert choices at routing near-ties, and greedy tokens with them, on
        # 4 of 5 families' test configs; the token-for-token check needs fp16-aware conditioning first
        raise MoecError(f"--dtype {dtype_of(options)}: the KV-cache decoder (--task text-generation, the default for "
                        f"a causal LM) is built in fp32 only so far; compile with --task logits for an "
                        f"{dtype_of(options)} input_ids -> logits graph. Nothing was written.")
    check_finite_weights(loaded.src.module, quantizing=bool(options.extra.get("quant")))
    if options.extra.get("calibration"):
        from moec.calibration import load_calibration

        loaded.calibration = load_calibration(options.extra["calibration"], loaded.src)


@dataclass
class Folded:
    records: list[PassRecord]
    spec: Any  # the QuantSpec the checkpoint's weights come with (packed or Q/DQ), or None


def fold(loaded: Loaded, options: CompileOptions) -> Folded:
    """Fold weight Q/DQ pairs (their own pass, in its own stage: the quantization it finds, or a packed
    checkpoint's, decides which passes follow)."""
    from moec.passes.fold_weight_qdq import FoldWeightQDQ
    from moec.report import folded_qdq

    src = loaded.src
    passes = [p for p in [FoldWeightQDQ()] if p.name not in options.disabled_passes]
    ctx = PassContext(probes=[src.example_args], options=options.extra, log=options.log,
                      weight_codes=src.weight_codes)
    # No probe validation: the pass itself checks the model's outputs bit for bit.
    src.module, records = PassManager(passes, validate=False).run(src.module, ctx)
    folded = folded_qdq(records)
    if folded:
        options.log(f"folded quantize/dequantize pairs on {len(folded['layers'])} Linear weights ({folded['spec']})")
        spec = next(o for r in records for o in r.layers).spec
        if src.prequantized is not None and src.prequantized != spec:
            raise MoecError(f"the checkpoint is packed as {src.prequantized.name} but its Q/DQ layers are "
                            f"{spec.name}; moec folds one quantization per model.")
        src.prequantized = spec
    return Folded(records, src.prequantized)


def eager_reference(loaded: Loaded, options: CompileOptions) -> Reference:
    """Verification inputs (the example's shape and another batch / sequence length) and the eager outputs.

    A draw on which some token's routing comes within fp32 rounding of a tie (moec/route_margins.py) would
    test luck, not the artifact: the next seed's draw replaces it. After the last seed the best-conditioned
    draw is kept; the report's numerics.route_margins says which draw ran and its smallest margin."""
    src = loaded.src
    # an fp16 artifact's routing differs from eager's by fp16 rounding: inputs are kept clear of ties by that much
    draw = conditioned_draw(lambda seed: src.verification_inputs(options.verify_seq_len, seed=seed),
                            lambda inputs: outputs_on(src.module, inputs), lambda m: options.log("verification " + m),
                            MIN_MARGINS[dtype_of(options)])
    conditioning = {"seed": draw.seed, "draws": draw.draws, **draw.margins.to_dict()}
    return Reference(draw.inputs, draw.outputs, greedy_runs(src.module, loaded.generation), conditioning)


GENERATION_STEPS = 8  # new tokens a compile checks per prompt (`moec verify` replays the same)


def greedy_runs(module: nn.Module, info) -> Optional[list]:
    """A decoder's greedy continuations of the fixed prompt sets, in PyTorch (None for other models)."""
    if info is None:
        return None
    from moec.greedy import greedy, prompt_sets, torch_step

    return [greedy(torch_step(module), prompts, GENERATION_STEPS, info.cache_shapes, info.pad_id,
                   info.context_length) for prompts in prompt_sets(info.vocab, info.pad_id)]


def outputs_on(module: nn.Module, inputs: list[tuple]) -> list[list[torch.Tensor]]:
    """The module's flattened outputs on each input tuple, detached copies."""
    with torch.no_grad():
        return [[o.detach().clone() for o in flatten_outputs(module(*a))] for a in inputs]


SIMPLIFY_GRAPH = "simplify_graph"  # an ONNX-side pass after export (moec/simplify_graph.py); so is REWRITE_RSQRT


def build_passes(options: CompileOptions, target: Target) -> list[Pass]:
    """fuse_moe, quantize_experts with --quant, then the target's lowering (--no-pass applies later)."""
    from moec.passes.fold_weight_qdq import FoldWeightQDQ
    from moec.passes.fuse_moe import FuseMoE

    passes: list[Pass] = []
    if options.fuse:
        passes.append(FuseMoE())
        if options.extra.get("calibration"):
            from moec.passes.measure_routing import MeasureRouting

            passes.append(MeasureRouting())
        if options.extra.get("prune_experts") is not None:
            from moec.passes.prune_experts import PruneExperts

            passes.append(PruneExperts())
        if options.extra.get("quant"):
            from moec.passes.quantize_experts import QuantizeExperts

            passes.append(QuantizeExperts())
        passes.extend(target.lowering_passes(options))
    if dtype_of(options) != "fp32":  # last: every structural pass was validated in fp32
        from moec.passes.cast_precision import CastPrecision

        passes.append(CastPrecision(dtype_of(options)))
    names = ([FoldWeightQDQ.name] + [p.name for p in passes] + [SIMPLIFY_GRAPH, REWRITE_RSQRT]
             + [p.name for p in target.graph_passes()])
    unknown = set(options.disabled_passes) - set(names)
    if unknown:
        raise MoecError(f"--no-pass: unknown pass {', '.join(sorted(unknown))}; passes are {', '.join(names)}.")
    if "cast_precision" in options.disabled_passes:
        raise MoecError(f"--no-pass cast_precision: that pass is what --dtype {dtype_of(options)} asks for; drop "
                        "--dtype for an fp32 artifact.")
    return passes


def dtype_of(options: CompileOptions) -> str:
    return options.extra.get("dtype") or "fp32"


def check_dtype(options: CompileOptions) -> None:
    """--dtype: what fp16 and bf16 artifacts are built for so far."""
    dtype, extra = dtype_of(options), options.extra
    if dtype == "fp32":
        return
    if dtype not in ("fp16", "bf16"):
        raise MoecError(f"--dtype {dtype}: choose fp32, fp16 or bf16.")
    clashes = [flag for flag, on in ((f"--target {options.target}", options.target != "onnxruntime"),
                                     # auto's search measures the fp32 model; the budget is checked on the fp16 one
                                     ("--quant auto", extra.get("quant") == "auto"),
                                     (f"experts already quantized in the model ({extra.get('quant')})",
                                      bool(extra.get("prequantized"))),
                                     ("--quant-dense", bool(extra.get("quant_dense"))),
                                     ("--prune-experts", extra.get("prune_experts") is not None),
                                     # Triton's ONNX Runtime backend here runs on CPU, which has no bf16 kernels
                                     ("--triton-repo", dtype == "bf16" and bool(options.triton_repo))) if on]
    if clashes:
        raise MoecError(f"--dtype {dtype} with {', '.join(clashes)}: not built yet ({dtype} artifacts are ONNX "
                        f"Runtime models with {dtype} weights and arithmetic, unpruned, with --quant int8/int4/int2 "
                        "experts or none). Nothing was written.")


def transform(loaded: Loaded, reference: Reference, passes: list[Pass], options: CompileOptions, target: Target,
              fold_records: list[PassRecord]) -> Transformed:
    src = loaded.src
    ctx = PassContext(probes=[src.example_args] + reference.inputs[1:], options=options.extra,
                      log=options.log, weight_codes=src.weight_codes,
                      calibration=loaded.calibration.batches if loaded.calibration is not None else (),
                      verification=reference.inputs)
    pruned: list = []  # the pruned full-precision model's outputs: what quantization's own error is against
    # --quant auto measures against the outputs the budget is checked against: the eager model's, or the pruned
    # one's (filled once pruning has run, before quantization)
    ctx.budget_reference = pruned if options.extra.get("prune_experts") is not None else reference.eager
    ctx.established.update(c for r in fold_records for c in r.ensures)
    last_numerics = next((p for p in reversed(passes) if p.changes_numerics and p.name not in options.disabled_passes),
                         None)
    exact: list = []
    exact_generation: list = []
    exact_margins: dict = {}
    bf16_eager: list = []

    def after_pass(p: Pass, module: nn.Module) -> None:
        if MOE_FUSED in p.ensures:
            refuse_without_fused_layers(module, options)
        if EXPERTS_PRUNED in p.ensures and p is not last_numerics:
            pruned[:] = outputs_on(module, reference.inputs)
        if p is last_numerics:  # the exact reference for the quantized / pruned artifact
            with watch_route_margins() as watch:
                if dtype_of(options) == "bf16":  # checked in fp32 arithmetic on the bf16 weights (moec.widen_bf16)
                    with in_fp32(module):
                        exact[:] = outputs_on(module, reference.inputs)
                else:
                    exact[:] = outputs_on(module, reference.inputs)
            if dtype_of(options) == "bf16":  # what bf16 arithmetic itself costs, in eager PyTorch, for the report
                bf16_eager[:] = outputs_on(module, reference.inputs)
            watch.margins.min_margin = MIN_MARGINS[dtype_of(options)]
            exact_margins.update(watch.margins.to_dict())
            exact_generation[:] = greedy_runs(module, loaded.generation) or []

    active = [p for p in passes if p.name not in options.disabled_passes]
    off = [p for p in passes if p.name in options.disabled_passes]
    module, records = PassManager(active, validate=options.validate, disabled=off).run(src.module, ctx, after_pass)
    src.module = module
    layers = layer_summary(records)
    auto = next((r.details["auto"] for r in records if r.details.get("spec") == "auto"), None)
    # what --quant auto chose decides whether ONNX Runtime quantizes activations
    rounding = target.activation_rounding(options if auto is None else replace(
        options, extra={**options.extra, "quant_chosen": sorted(set(auto["choice"].values()))}))
    # quantization's own error: against the full-precision model it quantized (the pruned one, if pruned)
    quant = quantization_summary(fold_records + records, options.extra, rounding, pruned or reference.eager, exact,
                                 options.tolerance)
    pruning = pruning_summary(records)
    if quant is not None and dtype_of(options) == "fp16":  # the dequantized fp16 model: fp16's rounding as well
        quant["tolerance_vs_dequantized"] = max(quant["tolerance_vs_dequantized"], TOLERANCES[dtype_of(options)])
    elif quant is not None and dtype_of(options) == "bf16":  # in fp32 arithmetic on bf16 weights (widen_bf16)
        quant["tolerance_vs_dequantized"] = max(quant["tolerance_vs_dequantized"], WIDENED_TOLERANCE)
    if quant is not None and pruning is not None:
        quant["logits_vs_fp32_against"] = "the pruned full-precision model"
    routing = next((r.details["routing"] for r in records if ROUTING_MEASURED.name in r.ensures), None)
    exact_name = " ".join(w for w, on in (("pruned", pruning is not None), ("dequantized", quant is not None),
                                          ("fp16", dtype_of(options) == "fp16"),
                                          ("bf16-weights", dtype_of(options) == "bf16")) if on)
    if options.require_fusion and layers["unfused"]:
        bad = [f"{l['path']}: {l.get('reason', '')}" for l in layers["layers"] if not l["fused"]]
        raise FusionRequiredError("--require-fusion: MoE layers left unfused: " + "; ".join(bad))
    return Transformed(module, records, layers, quant, exact if exact_name else [],
                       f"the {exact_name} reference" if exact_name else "", pruning, routing,
                       exact_generation if exact_name and exact_generation else None,
                       exact_margins if exact_name and exact_margins else None,
                       bf16_arithmetic(bf16_eager, reference.eager) if bf16_eager else None)


def bf16_arithmetic(bf16: list, fp32: list) -> dict:
    """How far the eager bf16 model (bf16 weights and arithmetic) is from eager fp32, per verification input:
    what a bf16 runtime adds to the weights' rounding that the widened check measures (reported, not gated)."""
    rows = [{"input": f"probe{i}", **compare_tensors(r[0], g[0]).to_dict()}
            for i, (g, r) in enumerate(zip(bf16, fp32))]
    return {"inputs": rows, "worst_rel_l2": max(r["rel_l2"] for r in rows),
            "note": "eager PyTorch in bf16 against eager fp32 (bf16 weights and arithmetic); ONNX Runtime's bf16 "
                    "kernels (GPU providers) land near this, not bit for bit"}


def export_graph(captured: Captured, loaded: Loaded, target: Target, options: CompileOptions):
    """torch.onnx's program, then the ONNX-side passes on it: simplify_graph, rewrite_rsqrt and the target's
    graph passes (each unless --no-pass names it). Returns the program and the report's "graph" entry (None:
    none ran)."""
    program = to_onnx(captured, loaded.src.input_names, loaded.src.output_names, loaded.src.dynamic_shapes,
                      target.translations())
    graph: dict = {}
    if SIMPLIFY_GRAPH not in options.disabled_passes:
        simplified = simplify_graph(program.model)
        options.log(f"pass {SIMPLIFY_GRAPH}: {simplified.nodes_before} -> {simplified.nodes_after} nodes")
        graph.update(simplified.to_dict())
    if REWRITE_RSQRT not in options.disabled_passes:
        graph["rsqrt_as_division"] = rewrite_rsqrt(program.model)
        options.log(f"pass {REWRITE_RSQRT}: {graph['rsqrt_as_division']} x*rsqrt(v) -> x/sqrt(v)")
    graph.update(run_graph_passes(program.model, target, options))
    if "nodes_after" in graph:  # the counts of what is saved
        graph.update(counted(program.model, "after"))
    return program, graph or None


def run_graph_passes(model, target: Target, options: CompileOptions) -> dict[str, int]:
    """The target's rewrites of the exported graph, unless --no-pass names them: {pass: matches rewritten}."""
    done = {}
    for p in target.graph_passes():
        if p.name not in options.disabled_passes:
            done[p.name] = p.run(model)
            options.log(f"pass {p.name}: {done[p.name]} {p.what}")
    return done


def refuse_without_fused_layers(module: nn.Module, options: CompileOptions) -> None:
    """--quant / --prune-experts work on fused MoE layers; with none, saying "0.0 MiB -> 0.0 MiB" and
    succeeding would hide that the model was not understood."""
    from moec.errors import NoFusedLayerError
    from moec.passes.layers import iter_fused

    extra = options.extra
    asked = [flag for flag, on in (
        (f"--quant {extra.get('quant')}", extra.get("quant") and not extra.get("prequantized")),
        (f"--prune-experts {extra.get('prune_experts')}", extra.get("prune_experts") is not None)) if on]
    if asked and next(iter_fused(module), None) is None:
        raise NoFusedLayerError(
            f"{' and '.join(asked)} works on fused MoE layers, but no MoE layer of this model was fused (the compile "
            "stopped after fuse_moe; compile without the flag to see the report's moe_layers, which says per layer "
            "why). Nothing was written.")


def capture_model(transformed: Transformed, loaded: Loaded) -> Captured:
    loaded.notes += make_unfused_experts_exportable(transformed.module, transformed.layers)
    return capture(transformed.module, loaded.src.example_args, loaded.src.dynamic_shapes)


def generation_golden(loaded: Loaded, reference: Reference, transformed: Transformed, options: CompileOptions):
    """A decoder's generation golden: greedy runs of the exact reference (the quantized / pruned model when
    a pass changed numerics, else eager PyTorch); None for other models."""
    if reference.generation is None:
        return None
    from moec.greedy import GenerationGolden

    info, quant = loaded.generation, transformed.quant
    runs = transformed.exact_generation or reference.generation
    tolerance = quant["tolerance_vs_dequantized"] if quant else options.tolerance
    return GenerationGolden(runs, GENERATION_STEPS, info.pad_id, info.cache_shapes, info.context_length, tolerance,
                            transformed.exact_name if transformed.exact_generation else "eager PyTorch",
                            list(info.eos_ids))


def check_generation(runner, tmp: str, golden, evaluable: bool) -> dict:
    """Replay the golden's greedy runs through ONNX Runtime (every step's logits), and through
    onnxruntime-genai over the artifact directory when it is installed and can hold the cache."""
    from moec import greedy

    checks = [greedy.check(runner.name, golden.runs, greedy.replay(golden, greedy.session_step(runner)),
                           golden.tolerance)]
    genai_note = None
    if evaluable:
        genai_note = "the target's nodes need moec's reference subgraphs; onnxruntime-genai not run"
    elif not os.path.isfile(os.path.join(tmp, "genai_config.json")):
        genai_note = "no genai_config.json (see generation.genai_unsupported)"
    elif not greedy.genai_available():
        genai_note = "onnxruntime-genai is not installed: verified with ONNX Runtime directly"
    else:
        checks.append(greedy.check_genai(tmp, golden))
    return {"reference": golden.reference, "new_tokens": golden.new_tokens,
            "prompt_sets": [[len(p) for p in r.prompts] for r in golden.runs],
            "checks": [{**c.to_dict(), "description": c.describe()} for c in checks],
            "genai": genai_note or "checked", "passed": all(c.passed for c in checks)}


def verify(model_path: str, tmp: str, reference: Reference, transformed: Transformed, options: CompileOptions,
           target: Target, generation=None) -> Verified:
    """The artifact (or the target's runnable copy of it) in ONNX Runtime against eager PyTorch; a
    quantized or pruned artifact is gated on the exact check against the quantized / pruned model
    (its distance from full precision is reported)."""
    from moec.verify import OrtRunner

    evaluable_files = target.write_evaluable(model_path, tmp)  # written once: verification, then Triton
    runner = OrtRunner(evaluable_files[0] if evaluable_files else model_path)
    quant, pruning = transformed.quant, transformed.pruning
    tolerance = exact_tolerance = options.tolerance
    if dtype_of(options) != "fp32":  # fp16's own rounding, against fp32 and against the eager fp16 model alike
        tolerance = max(options.tolerance, TOLERANCES[dtype_of(options)])
    if dtype_of(options) == "fp16":
        exact_tolerance = tolerance
    elif dtype_of(options) == "bf16":  # checked in fp32 arithmetic on the bf16 weights (moec.widen_bf16)
        exact_tolerance = max(options.tolerance, WIDENED_TOLERANCE)
    if quant:  # against fp32 the error is the quantization's own (reported; --accuracy-budget gates it)
        tolerance = max(tolerance, quant["tolerance_vs_fp32"])
    if pruning:  # informational: the pruned model is another model; pruning.vs_unpruned (calibration data) is gated
        tolerance = 1.0
    numerics, feeds, outs = compare_runs(runner, reference.inputs, reference.eager, tolerance)
    if transformed.exact:
        exact_tol = quant["tolerance_vs_dequantized"] if quant else exact_tolerance
        exact, _, outs = compare_runs(runner, reference.inputs, transformed.exact, exact_tol)
        key = "vs_" + transformed.exact_name.removeprefix("the ").replace(" ", "_")
        # fp16 is gated against fp32 too: its rounding is the artifact's whole difference from the model, and a
        # model fp16's range can't hold shows there (with --quant, quantization's error against fp32 is
        # --accuracy-budget's to gate, as at fp32). bf16 has fp32's range, and its check runs in fp32 arithmetic:
        # its distance from fp32 is the weights' rounding, asked for by --dtype bf16, reported, not gated
        gated = exact["passed"] and (numerics["passed"] or dtype_of(options) in ("fp32", "bf16") or quant is not None)
        numerics = {"vs_fp32": numerics, key: exact, "passed": gated, "against": transformed.exact_name,
                    "tolerance_rel_l2": exact["tolerance_rel_l2"], "inputs": exact["inputs"]}
        if dtype_of(options) == "bf16" and quant is None:
            numerics["vs_fp32"]["note"] = ("the bf16 weights' rounding against the fp32 model, for information (the "
                                           "check runs in fp32 arithmetic; bf16_arithmetic adds bf16's own)")
        if transformed.bf16_arithmetic is not None:
            numerics["bf16_arithmetic"] = transformed.bf16_arithmetic
        if pruning:
            numerics["vs_fp32"]["note"] = ("the unpruned model, for information (tolerance 1.0 means nothing in "
                                           "common); --accuracy-budget gates pruning.vs_unpruned on the calibration "
                                           "data and quantization against the pruned model")
    if generation is not None:
        numerics["generation"] = check_generation(runner, tmp, generation, bool(evaluable_files))
        numerics["passed"] = numerics["passed"] and numerics["generation"]["passed"]
    if runner.widened is not None:  # the CPU provider has no bf16 kernels: what ran instead (moec.widen_bf16)
        numerics["evaluated_as"] = (f"the bf16 graph widened to fp32 for ONNX Runtime's CPU provider (no bf16 "
                                    f"kernels): {runner.widened.weights} weights widened exactly, "
                                    f"{len(runner.widened.bf16_values)} bf16 values computed in fp32; checked against "
                                    "eager PyTorch in fp32 on the same bf16 weights. bf16 arithmetic itself is not "
                                    "run here: see bf16_arithmetic")
    del runner
    if evaluable_files:
        if not (options.triton_repo and numerics["passed"]):
            shutil.rmtree(os.path.dirname(evaluable_files[0]))
            evaluable_files = []
        numerics["evaluated_as"] = target.describe_evaluation()
    return Verified(numerics, feeds, outs, evaluable_files)


def compare_runs(runner, inputs: list[tuple], references: list[list[torch.Tensor]], tolerance: float):
    """Run every input; compare each output with its reference (relative L2 against `tolerance`)."""
    names, out_names = list(runner.inputs), runner.outputs
    rows, feeds_all, outs_all = [], [], []
    for idx, (args, ref) in enumerate(zip(inputs, references)):
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        got = runner.run(feeds)
        shape = "x".join(str(d) for d in args[0].shape) if args else ""
        for name, r in zip(out_names, ref):
            s = compare_tensors(r, got[name])
            rows.append({"input": f"probe{idx}[{shape}]", "output": name, **s.to_dict(),
                         "passed": bool(s.rel_l2 <= tolerance)})
        feeds_all.append(feeds)
        outs_all.append({n: r.detach().cpu().numpy() for n, r in zip(out_names, ref)})
    return {"tolerance_rel_l2": tolerance, "inputs": rows, "passed": all(r["passed"] for r in rows)}, feeds_all, outs_all


def plan_artifact_memory(model_path: str, dim_ranges: dict, options: CompileOptions, report: dict,
                         target: Target, derived_dims: Optional[dict] = None) -> Optional[dict]:
    """Plan activation memory over the final graph; enforce --device-memory before anything is written."""
    import onnx

    from moec.analysis.plan_memory import PlanHooks, plan_memory
    from moec.memory import parse_size, source_profiles

    budget = parse_size(options.extra["device_memory"]) if options.extra.get("device_memory") else None
    derived_dims = derived_dims or {}
    profiles = source_profiles(dim_ranges, options.extra.get("max_shape"), derived_dims)
    plan = plan_memory(onnx.load(model_path, load_external_data=False), profiles, hooks=PlanHooks.of(target),
                       base_dir=os.path.dirname(model_path), derived=derived_dims)
    out = plan.to_dict()
    if budget is not None:
        expert_bytes = sum(l.get("weight_bytes_fp32", 0) for l in (report.get("quantization") or {}).get("layers", []))
        if not expert_bytes:
            expert_bytes = int(report.get("weights_bytes", 0) * 0.9) if report["moe_layers"]["fused"] else 0
        # no --quant advice where the artifact is quantized already; an fp16 / bf16 artifact's experts are 2 bytes a
        # value (weights_bytes is the artifact's; weight_bytes_fp32 exists only once quantized)
        out.update(fit_device_memory(plan, budget, 0 if report.get("quantization") else expert_bytes,
                                     4 if dtype_of(options) == "fp32" else 2))
    return out


def fit_device_memory(plan, budget: int, quantizable_bytes: int, value_bytes: int = 4) -> dict:
    """--device-memory against a memory plan at its max profile: what fits (and what Triton and TensorRT take
    from it), or DeviceMemoryError with what would fit. `quantizable_bytes`: expert bytes --quant could shrink
    (0: no such advice), at `value_bytes` a value."""
    from moec.errors import DeviceMemoryError
    from moec.memory import fit_check, human

    fit = fit_check(plan, budget, "max", quantizable_bytes, value_bytes)
    out: dict = {"device_memory": {"budget_bytes": budget, "fits": fit.fits, "total_at_max": fit.total_bytes}}
    if not fit.fits:
        raise DeviceMemoryError(
            f"the model does not fit in {human(budget)} at the max profile "
            f"({', '.join(f'{k}={v}' for k, v in plan.profiles['max'].dims.items())}): it needs "
            f"{human(fit.total_bytes)}, {human(fit.over_bytes)} too much (weights "
            f"{human(plan.weights_bytes)}, activations {human(plan.profiles['max'].arena_bytes)}, "
            f"workspace {human(plan.profiles['max'].workspace_bytes)}). What would fit: "
            + ("; ".join(fit.suggestions) or "nothing moec can do on its own") + ". Nothing was written.")
    per_instance = plan.profiles["max"].arena_bytes + plan.profiles["max"].workspace_bytes
    out["derived"] = {
        "triton_instances": max(1, min(4, (budget - plan.weights_bytes) // max(per_instance, 1))),
        "tensorrt_workspace_bytes": plan.profiles["max"].workspace_bytes,
    }
    if "batch" in plan.dims:  # the largest batch that fits with the other dims at their max
        from moec.memory import largest_fitting

        out["derived"]["triton_max_batch_size"] = largest_fitting(plan, "batch", budget)
    return out


def package(artifact: ArtifactContext, target: Target, timings: dict, t0: float) -> Optional[str]:
    """The target's extras, report.json, a failed check's verdict, the Triton model; then into place."""
    report, options, tmp = artifact.report, artifact.options, artifact.workdir
    extras = target.write_extras(artifact)  # after the plan: engine profiles come from it
    if extras is not None:
        report[target.name] = extras
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    _write_json(os.path.join(tmp, "report.json"), report)
    numerics = report["numerics"]
    if not numerics["passed"]:
        worst = max(numerics["inputs"], key=lambda r: float(r["rel_l2"]))
        where = "Nothing was written; rerun with --keep-failed to inspect the artifact."
        if options.keep_failed:
            kept = os.path.abspath(options.out) + ".failed"
            shutil.rmtree(kept, ignore_errors=True)
            os.rename(tmp, kept)
            where = f"The failing artifact and its report are in {kept}."
        against = numerics.get("against") or "eager PyTorch"
        vs_fp32 = numerics.get("vs_fp32")
        if (report.get("dtype", "fp32") != "fp32" and all(r["passed"] for r in numerics["inputs"]) and vs_fp32
                and not vs_fp32["passed"]):
            # --dtype fp16 is gated against fp32 as well: the exact (fp16) check passed, the model's did not
            numerics, against = vs_fp32, "eager fp32 PyTorch"
            worst = max(numerics["inputs"], key=lambda r: float(r["rel_l2"]))
        elif all(r["passed"] for r in numerics["inputs"]):  # the probes pass: greedy generation diverged
            failed = [c["description"] for c in numerics["generation"]["checks"] if not c["passed"]]
            raise VerificationError(f"greedy generation through the artifact differs from {against}: "
                                    + "; ".join(failed) + f". {where}")
        from moec.targets.base import rounding_hint

        # against the dequantized reference, where ONNX Runtime rounds activations: why, and the ways out
        hint = rounding_hint(report.get("quantization"), float(worst["rel_l2"])) if numerics is report["numerics"] \
            else ""
        raise VerificationError(
            f"ONNX Runtime output differs from {against}: relative L2 {float(worst['rel_l2']):.3g} "
            f"(max abs {float(worst['max_abs']):.3g}) on input '{worst['input']}' exceeds tolerance "
            f"{float(numerics['tolerance_rel_l2']):g}.{hint} {where}"
        )
    triton_dir, model_dir_existed = None, False
    if options.triton_repo:
        model_dir_existed = os.path.isdir(os.path.join(options.triton_repo, options.model_name or "moe_model"))
        triton_dir = write_triton_model(artifact, target)
        _write_json(os.path.join(tmp, "report.json"), report)
    try:
        swap_into_place(tmp, options.out, replace=options.force)
    except BaseException:  # OUT could not be placed (appeared meanwhile, interrupted): unpublish the model
        if triton_dir is not None and not options.force:
            from moec.triton_repo import remove_version

            remove_version(options.triton_repo, options.model_name or "moe_model", options.model_version,
                           model_dir_existed)
        raise
    return triton_dir


def write_triton_model(artifact: ArtifactContext, target: Target) -> str:
    from moec.triton_repo import write_model_repository

    report, options = artifact.report, artifact.options
    derived = (report.get("memory") or {}).get("derived") or {}
    max_batch = options.max_batch_size
    if max_batch is None and derived.get("triton_max_batch_size"):
        max_batch = derived["triton_max_batch_size"]
    model = target.triton_model(artifact)
    if model.note:
        artifact.log(f"Triton model: {model.note}")
    instances = options.instances if options.instances_given or not derived else derived["triton_instances"]
    generation = report.get("generation")
    config_text, extra_files = None, None
    if generation and generation["genai_config"] and not artifact.evaluable_files:
        # a text-generation artifact is served through the generate extension by onnxruntime-genai
        from moec.triton_repo import generate_config

        config_text = generate_config(options.model_name or "moe_model", instances)
        extra_files = {"model.py": os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_backends",
                                                "genai_generate.py")}
    triton_dir = write_model_repository(
        options.triton_repo, options.model_name or "moe_model", model.model_path, model.files,
        version=options.model_version, force=options.force, max_batch_size=max_batch, instances=instances,
        platform=model.platform, kind=model.kind, extra=model.extra, max_batch_cap=model.max_batch_cap,
        config_text=config_text, extra_files=extra_files,
    )
    if generation:
        generation["triton"] = ("generate extension (python backend, onnxruntime-genai, streaming)" if config_text
                                else "the decoder graph, one step a request (no genai_config.json: "
                                     "onnxruntime-genai cannot serve this artifact)")
    if artifact.evaluable_files:  # the runnable copy is not part of the artifact
        shutil.rmtree(os.path.dirname(artifact.evaluable_files[0]))
    report["triton"] = {"model_dir": triton_dir}
    if model.note:
        report["triton"].update(platform=model.platform, serving=model.note)
    return triton_dir


# ----------------------------------------------------------------------------- helpers


def adopt_checkpoint_quantization(spec, options: CompileOptions) -> None:
    """Pre-quantized weights (packed checkpoint, folded Q/DQ) compile with their own quantization;
    a different --quant is a conflict."""
    want = {"quant": f"int{spec.bits}", "block_size": spec.block_size, "asymmetric": not spec.symmetric}
    refuse_requantizing(spec.name, want, options)
    options.extra.update(want, prequantized=True)


def refuse_requantizing(what: str, want: dict, options: CompileOptions) -> None:
    """--quant/--block-size/--asymmetric given with other values than the checkpoint's own (`want`, by option
    key): they would re-quantize it. The same values are allowed (they say what the checkpoint is)."""
    flags = {"quant": "--quant", "block_size": "--block-size", "asymmetric": "--asymmetric"}
    given = {k: options.extra.get(k) for k in want if options.extra.get(k) not in (None, False)}
    bad = [k for k in given if given[k] != want[k]]
    if bad:
        raise MoecError(f"the model's expert weights are already quantized ({what}); {'/'.join(flags[k] for k in bad)} "
                        f"would re-quantize them (given {', '.join(f'{k}={given[k]}' for k in bad)}). Drop those "
                        "flags. Nothing was written.")


def check_finite_weights(module: nn.Module, quantizing: bool = False) -> None:
    """NaN/inf weights make every comparison meaningless (and quantization scales garbage); refuse up
    front, naming the tensor, at any precision."""
    from moec.errors import SourceError
    from moec.quant import QuantError

    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            error = QuantError if quantizing else SourceError
            raise error(f"{name}: {bad} non-finite values (NaN/inf) in the weights ({t.dtype}); nothing was written.")


def make_unfused_experts_exportable(module: nn.Module, layers: dict) -> list[str]:
    """Switch transformers' experts implementation to one that exports, just before capture.

    Only layers moec did not fuse still run transformers' experts code: its 'eager' path
    doesn't export (data-dependent loop) and 'grouped_mm' doesn't convert to ONNX. 'batched_mm'
    does both but gathers a weight copy per token, so it is never used for eager reference runs.
    It is set whether or not fusion recognised anything: experts moec can't even find as a MoE
    layer (a family it has never seen) must still export.
    """
    for m in module.modules():
        if hasattr(m, "set_experts_implementation"):
            try:
                m.set_experts_implementation("batched_mm")
                return ["transformers experts implementation set to batched_mm (it exports) for any experts moec "
                        "did not fuse"]
            except Exception as exc:  # models without the switch (Llama4 ...)
                return [f"experts implementation unchanged: {exc}"]
    return []


class _workdir:
    """A temporary directory beside OUT, removed unless the package stage moved it into place; one
    left by a killed compile is removed first. Running out of disk becomes a DiskFullError."""

    def __init__(self, out: str, log: Callable[[str], None]):
        parent = os.path.dirname(os.path.abspath(out)) or "."
        remove_stale_workdirs(parent, log)
        self.parent, self.path = parent, make_workdir(parent)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, kind, exc, tb) -> None:
        if os.path.isdir(self.path):  # still here: not moved into place (nor kept as OUT.failed)
            shutil.rmtree(self.path, ignore_errors=True)
        release_workdir(self.path)
        full = disk_error(exc) if exc is not None else None
        if full is not None:
            free = shutil.disk_usage(self.parent).free
            raise DiskFullError(f"out of disk space writing the artifact ({full.strerror}: "
                                f"{full.filename or self.parent}); {free / 2**30:.2f} GiB free in '{self.parent}'. "
                                "Nothing was written; free space or choose another --out.") from exc


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")

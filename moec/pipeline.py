"""compile(): source -> passes (validated) -> torch.export -> ONNX -> verify -> write, atomically.

Memory discipline: the model's weights exist once. Passes rewrite layers in place (a
layer's new layout is made before its old one is dropped); the ONNX program aliases
torch's tensors until it is saved; eager reference outputs are computed before the
ONNX Runtime session (which holds its own copy) is created, and the torch model is
released first.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from moec.errors import FusionRequiredError, MoecError, OutputExistsError, VerificationError
from moec.export_onnx import capture, save_onnx, to_onnx, weight_bytes
from moec.fsutil import swap_into_place
from moec.golden import Probe, write_golden
from moec.numerics import compare_tensors
from moec.passes.base import PassContext, PassManager, compare_outputs, flatten_outputs, worst
from moec.sources import LoadedSource, load_source

TARGETS = ("onnxruntime", "tensorrt")
FP32_REL_L2 = 1e-4


@dataclass
class CompileOptions:
    out: str
    target: str = "onnxruntime"
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
    timings: dict[str, float] = {}
    log = options.log
    if options.target not in TARGETS:
        raise MoecError(f"unknown target '{options.target}'; choose one of {', '.join(TARGETS)}.")
    _check_destinations(options)

    if module is not None:
        src = LoadedSource(module.eval(), tuple(example_args or ()), dynamic_shapes, "python:" + type(module).__name__,
                           [], [], [], [])
        src.input_names = [f"input_{i}" for i in range(len(src.example_args))]
        src.input_kinds = ["float" if a.is_floating_point() else "int" for a in src.example_args]
    else:
        log(f"loading {source or 'built-in demo model'}")
        src = load_source(source)
    timings["load"] = time.perf_counter() - t0
    capture_notes = list(src.notes)
    dim_ranges = src.dim_ranges()
    from moec.golden import weights_sha256

    model_identity = {"source": source or src.identity, "identity": src.identity,
                      "weights_sha256": weights_sha256(src.module)}

    from moec.passes.fold_weight_qdq import fold_weight_qdq

    folded = fold_weight_qdq(src.module, src.example_args)  # PT2E-style Q/DQ on weights: keep their codes
    if folded.layers:
        log(f"folded quantize/dequantize pairs on {len(folded.layers)} Linear weights ({folded.spec.name})")
        if src.prequantized is not None and src.prequantized != folded.spec:
            raise MoecError(f"the checkpoint is packed as {src.prequantized.name} but its Q/DQ layers are "
                            f"{folded.spec.name}; moec folds one quantization per model.")
        src.prequantized = folded.spec
        options.extra["folded_qdq"] = folded.to_dict()
    if src.prequantized is not None:
        adopt_checkpoint_quantization(src.prequantized, options)
    if options.extra.get("quant"):
        check_finite_weights(src.module)

    # Verification inputs: the example's shape and another batch / sequence length.
    verify_inputs = [src.make_inputs(seed=100)]
    other_seq = options.verify_seq_len or _other_len(src)
    if other_seq is not None:
        verify_inputs.append(src.make_inputs(seed=101, seq_len=other_seq, batch=1 if src._is_dynamic(0, 0) else None))
    t = time.perf_counter()
    with torch.no_grad():
        eager = [[o.detach().clone() for o in flatten_outputs(src.module(*a))] for a in verify_inputs]
    timings["eager_reference"] = time.perf_counter() - t

    passes = build_passes(options)
    log("running passes: " + ", ".join(p.name for p in passes))
    ctx = PassContext(probes=[src.example_args] + verify_inputs[1:], target=options.target,
                      options=options.extra, log=log)
    dequant_reference: list = []

    def after_pass(name: str, module: nn.Module) -> None:
        if name in QUANT_PASSES:  # after the last one: the exact reference for the quantized artifact
            with torch.no_grad():
                dequant_reference[:] = [[o.detach().clone() for o in flatten_outputs(module(*a))]
                                        for a in verify_inputs]

    t = time.perf_counter()
    module_out, records = PassManager(passes, validate=options.validate).run(src.module, ctx, after_pass)
    timings["passes"] = time.perf_counter() - t
    layers = _layer_summary(records)
    quant = quantization_summary(records, options, eager, dequant_reference)
    if options.require_fusion and layers["unfused"]:
        bad = [f"{l['path']}: {l.get('reason', '')}" for l in layers["layers"] if not l["fused"]]
        raise FusionRequiredError("--require-fusion: MoE layers left unfused: " + "; ".join(bad))

    capture_notes += make_unfused_experts_exportable(module_out, layers)
    log("capturing with torch.export")
    t = time.perf_counter()
    captured = capture(module_out, src.example_args, src.dynamic_shapes)
    timings["capture"] = time.perf_counter() - t
    log("converting to ONNX")
    t = time.perf_counter()
    program = to_onnx(captured, src.input_names, src.output_names, src.dynamic_shapes, options.target)
    timings["onnx_export"] = time.perf_counter() - t
    onnx_weight_bytes = weight_bytes(program)

    parent = os.path.dirname(os.path.abspath(options.out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".moec-tmp-", dir=parent)
    try:
        model_path = os.path.join(tmp, "model.onnx")
        files = save_onnx(program, model_path)
        del program, captured, module_out, src
        gc.collect()  # the torch weights go before ONNX Runtime loads its own copy

        log("verifying with ONNX Runtime")
        t = time.perf_counter()
        verify_path, reference_files = model_path, []
        if options.target == "tensorrt":  # written once: verification, then (if asked) Triton, use it
            reference_files = plugin_reference_model(model_path, tmp)
            verify_path = reference_files[0]
        tolerance = options.tolerance
        if quant:  # against fp32 the error is the quantization's own (reported; --accuracy-budget gates it)
            tolerance = max(options.tolerance, quant["tolerance_vs_fp32"])
        numerics, feeds, outs = verify_onnx(verify_path, verify_inputs, eager, tolerance)
        if quant:  # the artifact itself is gated on the exact check against the dequantized reference
            exact, _, outs = verify_onnx(verify_path, verify_inputs, dequant_reference, quant["tolerance_vs_dequantized"])
            numerics = {"vs_fp32": numerics, "vs_dequantized_reference": exact, "passed": exact["passed"],
                        "tolerance_rel_l2": exact["tolerance_rel_l2"], "inputs": exact["inputs"]}
        if reference_files:
            if not (options.triton_repo and numerics["passed"]):
                shutil.rmtree(os.path.dirname(verify_path))
            numerics["evaluated_as"] = "plugin nodes replaced by their reference subgraph (moec/plugin_reference.py)"
        timings["verify"] = time.perf_counter() - t
        write_golden(os.path.join(tmp, "golden"),
                     [Probe(f"probe{i}", f, o) for i, (f, o) in enumerate(zip(feeds, outs))],
                     model=model_identity, precision=quant["precision"] if quant else "fp32",
                     tolerance=numerics["tolerance_rel_l2"], versions=versions())
        report = {
            "moec_version": _version(),
            "source": source or "python-module",
            "model": model_identity,
            "target": options.target,
            "capture": {"method": "torch.export (non-strict)", "notes": capture_notes},
            "passes": [r.to_dict() for r in records],
            "moe_layers": layers,
            "quantization": quant,
            "numerics": numerics,
            "weights_bytes": onnx_weight_bytes,
            "files": sorted(os.path.relpath(f, tmp) for f in files) + ["golden/"],
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "versions": versions(),
        }
        memory = plan_artifact_memory(model_path, dim_ranges, options, report)
        if memory is not None:
            report["memory"] = memory
        report.update(run_post_hooks(options, tmp, report))  # after the plan: engine profiles come from it
        report["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        _write_json(os.path.join(tmp, "report.json"), report)
        if not numerics["passed"]:
            worst = max(numerics["inputs"], key=lambda r: float(r["rel_l2"]))
            where = "Nothing was written; rerun with --keep-failed to inspect the artifact."
            if options.keep_failed:
                kept = os.path.abspath(options.out) + ".failed"
                shutil.rmtree(kept, ignore_errors=True)
                os.rename(tmp, kept)
                tmp = None
                where = f"The failing artifact and its report are in {kept}."
            raise VerificationError(
                f"ONNX Runtime output differs from eager PyTorch: relative L2 {float(worst['rel_l2']):.3g} "
                f"(max abs {float(worst['max_abs']):.3g}) on input '{worst['input']}' exceeds tolerance "
                f"{options.tolerance:g}. {where}"
            )
        triton_dir = None
        if options.triton_repo:
            from moec.triton_repo import write_model_repository

            serving, triton_report = {}, {}
            derived = (report.get("memory") or {}).get("derived") or {}
            max_batch = options.max_batch_size
            if max_batch is None and derived.get("triton_max_batch_size"):
                max_batch = derived["triton_max_batch_size"]
            if options.target == "tensorrt":
                from moec.tensorrt_target import triton_serving

                plan = triton_serving(tmp, model_path, reference_files, report,
                                      aot=bool(options.extra.get("tensorrt_aot")))
                model_path, files = plan.model_path, plan.files
                serving = dict(platform=plan.platform, kind="KIND_GPU", extra=plan.extra)
                serving["max_batch_cap"] = plan.max_batch_cap
                triton_report = {"platform": plan.platform, "serving": plan.note}
                log(f"Triton model: {plan.note}")
            instances = options.instances if options.instances_given or not derived else derived["triton_instances"]
            triton_dir = write_model_repository(
                options.triton_repo, options.model_name or "moe_model", model_path, files,
                version=options.model_version, force=options.force, max_batch_size=max_batch,
                instances=instances, **serving,
            )
            if reference_files:  # the expanded copy is not part of the artifact
                shutil.rmtree(os.path.dirname(reference_files[0]))
            report["triton"] = {"model_dir": triton_dir, **triton_report}
            _write_json(os.path.join(tmp, "report.json"), report)
        _move_into_place(tmp, options.out, options.force)
        tmp = None
        return CompileResult(os.path.abspath(options.out), report, triton_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def adopt_checkpoint_quantization(spec, options: CompileOptions) -> None:
    """Pre-quantized weights (packed checkpoint, folded Q/DQ) compile with their own quantization;
    a different --quant is a conflict."""
    want = {"quant": f"int{spec.bits}", "block_size": spec.block_size, "asymmetric": not spec.symmetric}
    given = {k: options.extra.get(k) for k in want if options.extra.get(k) not in (None, False)}
    if given and any(given[k] != want[k] for k in given):
        raise MoecError(f"the model's expert weights are already quantized ({spec.name}); --quant/"
                        f"--block-size/--asymmetric {given} would re-quantize them. Drop those flags.")
    options.extra.update(want, prequantized=True)


def check_finite_weights(module: nn.Module) -> None:
    """Quantizing NaN/inf weights gives garbage scales; refuse up front, naming the tensor."""
    from moec.quant import QuantError

    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise QuantError(f"{name}: {bad} non-finite values (NaN/inf) in the weights; nothing was written.")


QUANT_PASSES = ("quantize_experts", "quantize_dense")


def quantization_summary(records, options: CompileOptions, eager: list, dequantized: list) -> Optional[dict]:
    """Per-layer and logits error against full precision, sizes, and the accuracy budget check.

    The logits' error is the whole quantized model's (experts and, with --quant-dense, the dense
    layers) against the fp32 eager model on the verification inputs."""
    recs = {r.name: r for r in records if r.name in QUANT_PASSES}
    if "quantize_experts" not in recs:
        return None
    from moec.errors import AccuracyBudgetError
    from moec.golden import TOLERANCES

    precision = options.extra["quant"]
    layers = recs["quantize_experts"].details["layers"]
    dense = recs["quantize_dense"].details if "quantize_dense" in recs else None
    all_layers = layers + (dense["layers"] if dense else [])
    logits = worst(compare_outputs(eager, dequantized)).to_dict() if dequantized else None
    block = options.extra.get("block_size")
    # ORT's block-wise int8 experts have no fp32 kernel, and accuracy_level 4 asks for int8
    # activations: then ORT quantizes activations too, beyond what the dequantized reference models.
    # (The TensorRT plugin dequantizes weights only; its ORT check evaluates the exact reference.)
    activations_quantized = options.target == "onnxruntime" and (
        (precision == "int8" and block is not None) or options.extra.get("accuracy_level") == 4)
    summary = {
        "precision": precision, "spec": recs["quantize_experts"].details["spec"], "layers": layers,
        "logits_vs_fp32": logits,
        "weight_bytes_fp32": sum(l["weight_bytes_fp32"] for l in all_layers),
        "weight_bytes_quantized": sum(l["weight_bytes_quantized"] for l in all_layers),
        "onnxruntime_quantizes_activations": activations_quantized,
        "tolerance_vs_fp32": TOLERANCES[precision],  # informational: vs_fp32["passed"] in the numerics
        "tolerance_vs_dequantized": 3e-2 if activations_quantized else FP32_REL_L2,
    }
    if dense is not None:
        summary["dense"] = dense
    if options.extra.get("folded_qdq"):
        summary["folded_qdq"] = options.extra["folded_qdq"]
    budget = options.extra.get("accuracy_budget")
    if budget is not None and logits is not None and not (logits["rel_l2"] <= budget):
        worst_layers = sorted(all_layers, key=lambda l: -l.get("rel_l2_vs_fp32", 0))[:3]
        names = ", ".join(f"{l['path']} ({l.get('rel_l2_vs_fp32', float('nan')):.3g})" for l in worst_layers)
        raise AccuracyBudgetError(
            f"--accuracy-budget {budget:g}: {summary['spec']} quantization moves the logits by relative L2 "
            f"{logits['rel_l2']:.3g} against full precision. Worst layers: {names}. Try int8, a smaller "
            "--block-size, or --asymmetric; nothing was written.")
    return summary


def make_unfused_experts_exportable(module: nn.Module, layers: dict) -> list[str]:
    """Switch transformers' experts implementation to one that exports, just before capture.

    Only layers moec did not fuse still run transformers' experts code: its 'eager' path
    doesn't export (data-dependent loop) and 'grouped_mm' doesn't convert to ONNX. 'batched_mm'
    does both but gathers a weight copy per token, so it is never used for eager reference runs.
    """
    from moec.passes.fuse_moe import find_candidates

    if not find_candidates(module):
        return []
    for m in module.modules():
        if hasattr(m, "set_experts_implementation"):
            try:
                m.set_experts_implementation("batched_mm")
                return ["transformers experts implementation set to batched_mm for the unfused layers"]
            except Exception as exc:  # models without the switch (Llama4 ...)
                return [f"experts implementation unchanged: {exc}"]
    return []


def plugin_reference_model(model_path: str, tmp: str) -> list[str]:
    """Where ONNX Runtime can't run TensorRT plugin nodes, a copy with reference subgraphs, in
    tmp/.reference/ (kept out of the artifact); returns its files, model.onnx first."""
    from moec.plugin_reference import save_reference_model

    os.makedirs(os.path.join(tmp, ".reference"))
    return save_reference_model(model_path, os.path.join(tmp, ".reference", "model.onnx"))


def build_passes(options: CompileOptions) -> list:
    from moec.passes.fuse_moe import FuseMoE
    from moec.passes.lower_moe_onnxruntime import LowerMoEForOnnxRuntime
    from moec.passes.lower_moe_tensorrt import LowerMoEForTensorRT

    passes: list = []
    quant = options.extra.get("quant")
    if quant and not options.fuse:
        raise MoecError(f"--quant {quant} quantizes the fused experts; it needs MoE fusion (drop --no-fuse).")
    if options.extra.get("quant_dense") and not quant:
        raise MoecError("--quant-dense quantizes the other Linear layers with the experts' settings; give --quant "
                        "int8|int4 too.")
    if options.extra.get("quant_dense") and options.target != "onnxruntime":
        raise MoecError("--quant-dense emits ONNX Runtime's com.microsoft.MatMulNBits, which TensorRT's ONNX parser "
                        "can't read; use --target onnxruntime, or drop --quant-dense.")
    if options.fuse:
        passes.append(FuseMoE())
        if quant:
            from moec.passes.quantize_experts import QuantizeExperts

            passes.append(QuantizeExperts())
        if options.extra.get("quant_dense"):
            from moec.passes.quantize_dense import QuantizeDense

            passes.append(QuantizeDense())
        if options.target == "tensorrt":
            passes.append(LowerMoEForTensorRT())
        elif quant:
            from moec.passes.lower_moe_qmoe import LowerMoEForQMoE

            passes.append(LowerMoEForQMoE())
        else:
            passes.append(LowerMoEForOnnxRuntime())
    unknown = set(options.disabled_passes) - {p.name for p in passes}
    if unknown:
        raise MoecError(f"--no-pass: unknown pass {', '.join(sorted(unknown))}; passes are "
                        f"{', '.join(p.name for p in passes)}.")
    return [p for p in passes if p.name not in options.disabled_passes]


def plan_artifact_memory(model_path: str, dim_ranges: dict, options: CompileOptions, report: dict) -> Optional[dict]:
    """Plan activation memory over the final graph; enforce --device-memory before anything is written."""
    import onnx

    from moec.errors import DeviceMemoryError
    from moec.memory import fit_check, human, parse_size, profiles_for
    from moec.passes.plan_memory import plan_memory

    budget = parse_size(options.extra["device_memory"]) if options.extra.get("device_memory") else None
    ranges = {d: (lo, hi) for d, (lo, hi, _) in dim_ranges.items()}
    opt = {d: ex for d, (_, _, ex) in dim_ranges.items()}
    profiles = profiles_for(ranges, opt, options.extra.get("max_shape"))
    options.log("planning memory")
    plan = plan_memory(onnx.load(model_path), profiles)
    out = plan.to_dict()
    if budget is not None:
        expert_bytes = sum(l.get("weight_bytes_fp32", 0) for l in (report.get("quantization") or {}).get("layers", []))
        if not expert_bytes:
            expert_bytes = int(report.get("weights_bytes", 0) * 0.9) if report["moe_layers"]["fused"] else 0
        fit = fit_check(plan, budget, "max", 0 if report.get("quantization") else expert_bytes)
        out["device_memory"] = {"budget_bytes": budget, "fits": fit.fits, "total_at_max": fit.total_bytes}
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


def run_post_hooks(options: CompileOptions, tmp: str, report: dict) -> dict:
    """Artifact-level steps after verification: target extras (plugin definitions, engine)."""
    extra: dict = {}
    if options.target == "tensorrt":
        from moec.tensorrt_target import write_tensorrt_extras

        extra["tensorrt"] = write_tensorrt_extras(tmp, report, options.log)
    return extra


def verify_onnx(model_path: str, inputs: list[tuple], eager: list[list[torch.Tensor]], tolerance: float):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    rows, feeds_all, outs_all = [], [], []
    for idx, (args, ref) in enumerate(zip(inputs, eager)):
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        got = sess.run(None, feeds)
        shape = "x".join(str(d) for d in args[0].shape) if args else ""
        for name, g, r in zip(out_names, got, ref):
            s = compare_tensors(r, g)
            rows.append({"input": f"probe{idx}[{shape}]", "output": name, **s.to_dict(),
                         "passed": bool(s.rel_l2 <= tolerance)})
        feeds_all.append(feeds)
        outs_all.append({n: r.detach().cpu().numpy() for n, r in zip(out_names, ref)})
    return {"tolerance_rel_l2": tolerance, "inputs": rows, "passed": all(r["passed"] for r in rows)}, feeds_all, outs_all


def _check_destinations(options: CompileOptions) -> None:
    if os.path.exists(options.out) and not options.force:
        raise OutputExistsError(
            f"output directory '{options.out}' already exists; moec never overwrites an artifact "
            "unless asked: pass --force to replace it, or choose another --out."
        )
    if options.triton_repo:
        from moec.triton_repo import check_version_free

        check_version_free(options.triton_repo, options.model_name or "moe_model", options.model_version,
                           options.force)


def _move_into_place(tmp: str, out: str, force: bool) -> None:
    if os.path.exists(out) and not force:
        raise OutputExistsError(f"output directory '{out}' appeared while compiling; not replacing it.")
    swap_into_place(tmp, out)


def _other_len(src: LoadedSource) -> Optional[int]:
    if not src.example_args or not src._is_dynamic(0, 1):
        return None
    seq = src.example_args[0].shape[1]
    return seq + 5 if seq < 64 else max(2, seq // 2)


def _layer_summary(records) -> dict:
    layers: list[dict] = []
    for r in records:
        if r.name == "fuse_moe":
            layers = [dict(l) for l in r.details.get("layers", [])]
    lowered = {}
    for r in records:
        for l in r.details.get("layers", []) if r.name.startswith("lower_") else []:
            lowered[l["path"]] = l
    for l in layers:
        if l["path"] in lowered:
            l["lowered_to"] = lowered[l["path"]]["lowered_to"]
            if "reason" in lowered[l["path"]]:
                l["lowering_note"] = lowered[l["path"]]["reason"]
    return {"fused": sum(l["fused"] for l in layers), "unfused": sum(not l["fused"] for l in layers),
            "layers": layers, "note": "" if layers else "no MoE layer found; compiled as a dense model"}


def versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("moec")
    except Exception:
        return "0.0.0+local"


def _write_json(path: str, obj: Any) -> None:
    import json

    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")

"""`moec compile DIR` for checkpoints larger than memory: the graph from shapes, the weights streamed a layer at a time.

    load -> recognise -> capture -> onnx_export -> plan -> stream_weights -> verify -> package

1. recognise: MoE layers are recognised on a miniature of the config (moec.plan_model, as `moec plan` does).
2. capture / onnx_export: the real-sized model is built on the meta device, every recognised layer replaced by
   a FusedMoE of its sizes and lowered for ONNX Runtime, captured by torch.export and converted by torch.onnx:
   the ONNX graph's initializers are shapes and dtypes only. The memory plan comes from the captured graph's
   symbolic shapes (moec.analysis.plan_exported), never from weights.
3. stream_weights: per layer group (embeddings and head, then each decoder layer) the checkpoint's tensors are
   read (moec.lazy_checkpoint, through transformers' own checkpoint conversion), every MoE layer in the group is
   fused again at real size with translation validation against the original layer on the real weights (the
   same reading the miniature chose, or the compile stops naming the layer), lowered, and its tensors written
   to external data (moec.external_data.write_streamed, shards of --shard-size, a layer never split); then the
   group's weights are dropped. With --quant, layers that can are quantized one expert at a time
   (moec.quantize_streamed): their experts are never all in memory; with --quant-dense the group's other
   Linears become MatMulNBits as they are read (moec.quantize_dense_streamed). A GPT-OSS MXFP4 checkpoint's
   experts are folded the same way with the checkpoint's own codes (moec.mxfp4_stream), never re-quantized; so
   are the experts of compressed-tensors, GPTQ and AWQ checkpoints, read one Linear at a time
   (moec.packed_stream), and with --quant-dense their attention's codes. With --calibration the calibration
   batches advance one decoder layer at a time beside the writing (moec.calibrate_streamed): routing
   statistics, and with --quant GPTQ codes for each streamed layer's experts, as in memory; with --prune-experts
   the experts each layer loses are chosen from those statistics before it is written (moec.prune_streamed).
4. verify: layer by layer (moec.verify_layers): the eager model runs with one decoder layer materialised at a
   time, the artifact runs segment by segment (moec.segmented_run); every layer's output and the logits are
   compared, and the goldens are the artifact's outputs on that input.
Peak memory is the largest layer group a few times over plus the graph, whatever the model's size.
The artifact is the in-memory compile's (the KV-cache decoder unless --task logits; --quant codes byte for byte;
--triton-repo through the same packaging stage; --device-memory checked on the plan from shapes, before any weight
is read; --prune-experts FRACTION by moec.prune_streamed; --quant auto's choice made before capture, its errors
measured a pass over the checkpoint at a time by moec.measure_precision_streamed, with --calibration on GPTQ's
codes at each precision solved first by moec.calibrate_precisions_streamed, and with --prune-experts FRACTION on
the pruned model, its experts chosen in that first run). Refuses what it does not
stream yet (--prune-experts auto, TensorRT, pre-quantized
checkpoints moec does not fold as they stream: moec-packed, fp8 ...): named, exit 2, with the in-memory compile
as the way to get it.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from moec.errors import FusionRequiredError, MoecError, PassValidationError, VerificationError
from moec.heap import trim
from moec.lazy_checkpoint import LazyCheckpoint, release
from moec.mixed_precision import spec_at
from moec.pipeline import CompileOptions, CompileResult, _Stages, _workdir, check_options, check_quantization
from moec.targets.base import rounding_fields

STAGES = ("load", "recognise", "capture", "onnx_export", "plan", "stream_weights", "verify", "package")
# --quant auto: each fused layer's precision is chosen before the graph (its QMoE nodes' bit widths) is captured
AUTO_STAGES = STAGES[:2] + ("choose_precision",) + STAGES[2:]
WRAPPER = "model."  # CausalLMLogits keeps the transformers model as `.model`: its names in the graph start so
# Options the streamed compile does not take yet, with what they are.
UNSTREAMED = {"tensorrt_aot": "--tensorrt-aot"}
AUTO_FRACTION = 0.3  # auto: stream when the checkpoint's fp32 bytes exceed this share of available memory


def wants_out_of_core(source: Optional[str], mode: str, log: Callable[[str], None] = lambda msg: None) -> bool:
    """--out-of-core on|off|auto: auto streams a safetensors checkpoint whose fp32 weights would take more than
    AUTO_FRACTION of the memory available now (the in-memory compile holds them about 1.5 times)."""
    if mode == "off" or source is None or not os.path.isdir(source):
        return False
    if mode == "on":
        return True
    from moec.checkpoint import is_packed
    from moec.fold_checkpoint import quant_method

    method = quant_method(source)
    if is_packed(source) or not os.path.isfile(os.path.join(source, "config.json")):
        return False
    try:
        ck = LazyCheckpoint(source)
        # the in-memory fold holds pre-quantized weights dequantized: count them as the values they stand for
        if method == "mxfp4":
            from moec.mxfp4_stream import mxfp4_parameters

            numel = mxfp4_parameters(ck)
        elif method is not None:
            from moec.fold_checkpoint import READERS
            from moec.packed_stream import PackedStream

            numel = PackedStream(ck, READERS[method]()(source)).parameters()
        else:
            numel = ck.numel
    except MoecError:
        return False  # the in-memory loader names what is wrong with it
    available = _available_memory()
    if available is None or numel * 4 <= AUTO_FRACTION * available:
        return False
    log(f"the checkpoint in '{source}' has {numel / 1e9:.2f}B parameters ({numel * 4 / 2**30:.1f} GiB at fp32) and "
        f"{available / 2**30:.1f} GiB of memory are available: compiling out of core (--out-of-core off to load it "
        "whole)")
    return True


def _available_memory() -> Optional[int]:
    """MemAvailable, or less when a cgroup (a container) limits this process to less."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        with open("/sys/fs/cgroup/memory.stat") as f:  # page cache the kernel drops under pressure is not "used"
            stat = dict(line.split() for line in f if line.count(" ") == 1)
        used -= int(stat.get("inactive_file", 0))
        if limit != "max":
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def check_streamable(options: CompileOptions) -> None:
    asked = [flag for key, flag in UNSTREAMED.items() if options.extra.get(key) not in (None, False)]
    if options.extra.get("prune_experts") == "auto":  # its sensitivities are whole-model runs, one per layer and count
        asked.append("--prune-experts auto (a FRACTION streams)")
    if options.target != "onnxruntime":
        asked.append(f"--target {options.target}")
    if not options.fuse:
        asked.append("--no-fusion")
    if options.disabled_passes:
        asked.append("--no-pass")
    if asked:
        raise MoecError(f"{', '.join(asked)}: not available in an out-of-core compile yet (it streams "
                        "text-generation and logits artifacts for ONNX Runtime, fp32, fp16 or bf16, or with --quant experts "
                        "and --quant-dense). Compile in memory with --out-of-core off, on a machine that holds the "
                        "model about 1.5 times at fp32. Nothing was written.")
    from moec.pipeline import check_dtype, dtype_of

    check_dtype(options)  # what fp16 and bf16 are not built with, as in memory
    if dtype_of(options) != "fp32" and options.extra.get("task") in (None, "text-generation"):
        raise MoecError(f"--dtype {dtype_of(options)}: the KV-cache decoder (--task text-generation, the default for a "
                        f"causal LM) is built in fp32 only so far; compile with --task logits for an {dtype_of(options)} "
                        "input_ids -> logits graph. Nothing was written.")


def compile_out_of_core(source: str, options: CompileOptions) -> CompileResult:
    kept: list = []  # --quant auto: the search's codes, kept on disk for the writer; removed whatever happens
    try:
        return _compile(source, options, kept)
    finally:
        for store in kept:
            store.close()


def _compile(source: str, options: CompileOptions, kept: list) -> CompileResult:
    from moec.analysis.plan_exported import plan_exported
    from moec.export_onnx import capture, dim_names, to_onnx
    from moec.memory import source_profiles
    from moec.plan_model import build_on_meta, recognise_miniature
    from moec.rewrite_rsqrt import rewrite_rsqrt
    from moec.simplify_graph import simplify_graph
    from moec.sources import as_task, made_static, refuse_generation_static
    from moec.targets import get
    from moec.passes.quantize_experts import spec_from_options
    from moec.fold_checkpoint import quant_method
    from moec.pipeline import (adopt_checkpoint_quantization, check_dtype, dtype_of, refuse_without_fused_layers,
                               run_graph_passes)
    from moec.validate import check_max_shape

    from moec.heap import bounded_heap

    t0 = time.perf_counter()
    bounded_heap()  # freed layers go back to the system (moec.heap)
    target = get("onnxruntime")
    check_options(options, target)  # destinations, Triton versions, values: before any work
    method = quant_method(source)  # a pre-quantized checkpoint's codes are folded as they stream, never re-quantized
    if method is None:
        check_quantization(options, False)  # a pre-quantized checkpoint's own may stand for --quant: checked below
    elif options.extra.get("quant") == "auto":
        raise MoecError(f"--quant auto: the checkpoint in '{source}' is already quantized ({method}); its codes are "
                        "folded as they are, not re-chosen. Drop --quant auto. Nothing was written.")
    check_streamable(options)
    if options.extra.get("calibration") is not None:
        from moec.calibration import check_spec

        check_spec(options.extra["calibration"])  # the file's form, before any work
    refuse_quantized_checkpoint(source)
    if options.extra.get("static"):
        refuse_generation_static(options.extra.get("task"), f"'{source}'")
    auto = options.extra.get("quant") == "auto"
    stage = _Stages(options.log, AUTO_STAGES if auto else STAGES)
    ck, hf, prequant, identity = stage("load", f"indexing the checkpoint in {source} (headers only" + (
        "; each MXFP4 expert read once, to check it and choose the codes' spec)" if method == "mxfp4" else
        f"; its {method} Linears found)" if method else ")"), index_checkpoint, source, method, options)
    if prequant is not None:
        if prequant.spec is not None:
            adopt_checkpoint_quantization(prequant.spec, options)
            if not prequant.fp16_checked:
                check_dtype(options)  # fp16 with pre-quantized experts: refused as in memory
        check_quantization(options, prequant.spec is not None)
    ck.model_config = hf.config  # read_config's reading (unknown model_type through `architectures` ...) everywhere
    options.log(f"  {ck.numel / 1e9:.2f}B parameters, {ck.nbytes / 2**30:.2f} GiB stored, "
                f"{len(ck.layer_groups())} layer groups")
    kinds = stage("recognise", f"recognising MoE layers on a miniature {hf.model_class.__name__}",
                  recognise_miniature, hf, lambda msg: None)

    spec = prequant.spec if prequant is not None and prequant.spec is not None else \
        spec_from_options(options.extra) if options.extra.get("quant") not in (None, "auto") else None
    lowering = target.lowering_passes(options)
    # fp16 / bf16: each tensor converted as it is written; the graph captured in that dtype
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype_of(options))

    def build_source(spec):
        """The meta model with its fused layers (quantized at `spec`) as the task's source."""
        meta = build_on_meta(hf, kinds, lowering, options.extra, spec)
        if not any(p.fused for p in meta.planned):  # --quant with nothing fused: say so, as compile does
            refuse_without_fused_layers(meta.model, options)
        static = bool(options.extra.get("static"))  # the logits graph at the example's shapes, as in memory
        src = as_task(meta.model, f"hf:{os.path.abspath(source)}", "logits" if static else options.extra.get("task"),
                      f"'{source}'", source_dir=source)
        if static:
            src = made_static(src)
        from moec.passes.base import PassContext

        for p in lowering:  # the decoder's own passes (attention), on the meta decoder: shapes decide them
            if p.on_task_graph:
                done = p(src.module, PassContext(probes=[tuple(a.to("meta") for a in src.example_args)],
                                                 options=options.extra, log=options.log))
                src.module = done.module
                if done.modified:
                    meta.notes.append(f"{p.name}: " + ", ".join(f"{k} {v}" for k, v in done.details.items()
                                                                if not isinstance(v, (list, dict))))
        return meta, src

    plan = None
    if auto:  # --quant auto: each layer's precision, measured a pass over the checkpoint at a time
        plan = stage("choose_precision", "choosing each MoE layer's precision within --accuracy-budget "
                     f"{float(options.extra['accuracy_budget']):g} (passes over the checkpoint, one layer at a time)",
                     choose_streamed, ck, hf, kinds, lowering, options, build_source)
        kept.append(plan.codes)
        spec = plan.specs

    # what --quant auto chose decides whether ONNX Runtime quantizes activations (as in memory)
    rounding = target.activation_rounding(options if plan is None else replace(
        options, extra={**options.extra, "quant_chosen": sorted(set(plan.plan.choice.values()))}))

    def build_graph_model():
        meta, src = build_source(spec)
        graph_module = src.module
        if half:  # as cast_precision makes it in memory: fp16 / bf16 inside, the inputs' and outputs' dtypes kept
            from moec.passes.cast_precision import KeepFloatIO

            graph_module = KeepFloatIO(src.module.to(half), half)
        return meta, src, capture(graph_module, tuple(a.to("meta") for a in src.example_args), src.dynamic_shapes)

    meta, src, captured = stage("capture", "capturing the real-sized graph on the meta device", build_graph_model)
    planned, lowered, notes = meta.planned, meta.lowered, meta.notes
    program = stage("onnx_export", "converting to ONNX (no weight bytes)", to_onnx, captured, src.input_names,
                    src.output_names, src.dynamic_shapes, target.translations())
    # with what capture and conversion rewrote (complex RoPE, selective scans), as the in-memory report says
    notes = list(src.notes) + notes + list(captured.notes)
    graph = simplify_graph(program.model, weights_known=False).to_dict()
    graph["rsqrt_as_division"] = rewrite_rsqrt(program.model)
    graph.update(run_graph_passes(program.model, target, options))  # shape-only matches: weights not needed
    ranges = src.dim_ranges()
    check_max_shape(options.extra.get("max_shape"), ranges)
    memory = stage("plan", "planning activation memory from the captured shapes", plan_exported, captured.program,
                   dim_names(captured.program, src.dynamic_shapes),
                   source_profiles(ranges, options.extra.get("max_shape"), src.derived_dims), src.derived_dims)
    del captured
    fit = {}
    if options.extra.get("device_memory"):  # from the captured shapes: refused before any weight is read
        from moec.memory import parse_size
        from moec.pipeline import fit_device_memory

        removed = meta.pruned or {}  # the graph has the experts kept
        experts = sum(w.bytes_at("bf16" if half else "fp32", w.experts - removed.get(w.path, (0, ""))[0])
                      for w in meta.weights)  # what --quant would shrink (advice); fp16 is bf16's 2 bytes a value
        fit = fit_device_memory(memory, parse_size(options.extra["device_memory"]),
                                experts if spec is None else 0, 2 if half else 4)
    layers = _layer_report(planned, lowered)
    if options.require_fusion and layers["unfused"]:
        bad = [f"{l['path']}: {l.get('reason', '')}" for l in layers["layers"] if not l["fused"]]
        raise FusionRequiredError("--require-fusion: MoE layers left unfused: " + "; ".join(bad))
    weights_model = ck.skeleton(hf.config)
    calibration = options.extra.get("calibration")
    coder = prequant.coder() if prequant is not None and prequant.spec is not None else None
    if plan is not None:  # --quant auto: the codes its search measured, written as they are
        coder = plan.coder()
    elif calibration and coder is None and spec is not None:  # GPTQ on each layer's calibration inputs, as in memory
        from moec.calibrate_streamed import CalibratedCodes

        coder = CalibratedCodes(spec, calibration)
    notes += prequant.notes if prequant is not None else []
    dense = None
    if meta.dense is not None:  # --quant-dense: the Linears the graph holds as MatMulNBits, made as they stream
        from moec.quantize_dense_streamed import StreamedDense

        dense = StreamedDense.from_meta(meta.dense, options.extra, getattr(prequant, "dense_codes", None))
        if calibration:  # each decoder layer's Linears calibrated as the data reaches it (moec.calibrate_streamed)
            dense.method = "round-to-nearest (the calibration data did not reach it)"
            notes.append("--calibration with --quant-dense out of core: each decoder layer's dense Linears keep GPTQ's "
                         "codes where they move that layer's output on held-out calibration batches less than "
                         "round-to-nearest's (in memory: the model's output); the output head's where its own output "
                         "(the logits) moves less on held-out calibration tokens, solved once the data went through "
                         "every layer (the embeddings and head are written last)")
    streamer = LayerStreamer(ck, weights_model, planned, kinds, spec, lowering, options.extra, options.log,
                             WRAPPER * (2 if half else 1), coder, dense)
    if plan is not None and plan.pruning is not None:  # --quant auto chose them before measuring the pruned model
        streamer.pruning = plan.pruning
    elif meta.pruned is not None:  # which experts go is chosen from each layer's routing as it streams
        from moec.prune_streamed import StreamedPruning

        streamer.pruning = StreamedPruning.from_meta(meta.pruned, options.extra)
    calibrated = None
    if calibration and plan is not None:  # carried once already, before the search: the codes and routing are kept
        from moec.calibration import load_calibration

        calibrated = load_calibration(calibration, src)
    elif calibration:  # the data carried through the model as its layers stream (moec.calibrate_streamed)
        from moec.calibrate_streamed import LayerInputs
        from moec.calibration import load_calibration

        calibrated = load_calibration(calibration, src)
        streamer.calibration = LayerInputs(wrapper_of(src.module)(ck.skeleton()), calibrated.batches, ck,
                                           streamer.prepare_calibration, streamer.fused_paths, options.log)
        streamer.calibration.dense = dense  # --quant-dense: each layer's Linears calibrated too
        # pruned: the pruned model's states carried beside the unpruned ones (GPTQ solves on them, as in memory),
        # so that both models' logits on the calibration data give the pruning's distance, the in-memory measure
        streamer.calibration.pruned_states = streamer.pruning is not None

    with _workdir(options.out, options.log) as tmp:
        from moec.external_data import DEFAULT_SHARD_BYTES, write_streamed

        model_path = os.path.join(tmp, "model.onnx")
        files = stage("stream_weights", "streaming the weights, one layer at a time", write_streamed, program.model,
                      model_path, streamer.fill, options.extra.get("shard_size") or DEFAULT_SHARD_BYTES, options.log,
                      head_last=streamer.calibrates_head)
        weights_bytes = sum(os.path.getsize(f) for f in files[1:])
        vs_unpruned = None  # the pruning's distance on the calibration data (--quant auto: measured before)
        if streamer.calibration is not None:
            if streamer.pruning is not None:  # the data went through every layer of both models: their logits
                vs_unpruned = streamer.calibration.pruning_distance()
                check_pruning(options.extra, streamer.pruning, vs_unpruned, options.log)  # before the verification
            streamer.calibration.done()
            if streamer.coder is not None:  # calibrated codes, solved once, are read back as written
                streamer.coder.read_back(model_path)
        generation = None
        if getattr(src, "info", None) is not None:
            from moec.generation import write_generation_files

            generation = write_generation_files(tmp, src.info)
            files += [os.path.join(tmp, f) for f in ["genai_config.json"] * generation["genai_config"]
                      + generation["tokenizer_files"]]
        del program, weights_model

        from moec.verify_layers import verify_layer_by_layer

        from moec.golden import TOLERANCES
        from moec.widen_bf16 import WIDENED_TOLERANCE

        quant = None
        if spec is not None:
            tolerance = rounding.tolerance(options.tolerance) if rounding else options.tolerance
            prepare = streamer.prepare
        else:  # pruned: the reference is the pruned model, and the error against fp32 is against the unpruned one
            tolerance, prepare = options.tolerance, streamer.prepare if streamer.pruning is not None else None
        against = prequant.against if prequant is not None else None
        if streamer.pruning is not None:
            against = ("the pruned dequantized reference" if spec is not None and not streamer.coder.exact else
                       "the pruned model")
        if dense is not None:
            against = (f"{against}, the other Linears as MatMulNBits dequantizes them" if against else
                       "the dequantized reference")
        if half == torch.float16:  # the reference is the eager model in fp16, each layer cast as it is read; fp32
            tolerance = max(tolerance, TOLERANCES["fp16"])  # is compared too
            against = ("the checkpoint's weights in fp16" if prequant is not None else
                       "the dequantized reference in fp16" if prepare else "eager PyTorch in fp16")
            prepare = in_fp16(prepare or ck.materialise)
        elif half == torch.bfloat16:  # as in memory: the artifact widened to fp32 (moec.widen_bf16) against the
            # eager model in fp32 on the bf16 weights, each layer rounded to bf16 as it is read
            tolerance = max(tolerance, WIDENED_TOLERANCE)
            against = ("the dequantized bf16-weights reference" if prepare else "the bf16-weights reference")
            prepare = on_bf16_weights(prepare or ck.materialise)
        verified = stage("verify", "verifying layer by layer (eager and ONNX Runtime, one layer in memory)",
                         verify_layer_by_layer, model_path, ck, tolerance, src.verification_inputs(options.verify_seq_len),
                         src.input_names, src.output_names, wrapper_of(src.module), options.log, prepare,
                         streamer.prepare_fp32, against,
                         # pruned: the fp32 reference is the unpruned model (pruning.vs_unpruned)
                         reference_is_fp32=prequant is not None and not half and dense is None
                         and streamer.pruning is None)
        if streamer.streaming is not None:
            streamer.streaming.done()
        pruning = over = None  # over: the budget's refusal, raised once the artifact is known right
        if streamer.pruning is not None:  # on the calibration data, as in memory (--quant auto: before the search)
            pruning = streamer.pruning.report((plan.vs_unpruned if plan is not None else vs_unpruned).to_dict())
        if spec is not None:
            quant = quantization_report(streamer.quantized, spec, verified, tolerance, streamer.coder,
                                        rounding, dense, plan)
            if prequant is not None and prequant.spec is not None:
                quant["checkpoint_format"] = prequant.format
            if pruning is not None:  # one fp32 reference out of core: the unpruned model (in memory: the pruned one)
                quant["logits_vs_fp32_against"] = "the unpruned full-precision model (pruning and quantization together)"
                if plan is not None:  # what the budget bounds: the search's measure, against the pruned model
                    quant["auto"]["measured_against"] = "the pruned full-precision model"
            budget = options.extra.get("accuracy_budget")
            if budget is not None and verified.vs_fp32 is not None:  # as in memory: the logits against fp32
                quant["accuracy_budget"] = budget
                if not verified.vs_fp32["rel_l2"] <= budget and pruning is None:  # pruned: its check says both
                    from moec.report import auto_over_budget, over_budget

                    over = over_budget(budget, spec.name, verified.vs_fp32["rel_l2"],
                                       quant["layers"] + quant.get("dense", {}).get("layers", [])) if plan is None \
                        else auto_over_budget(budget, plan.plan.measured, verified.vs_fp32["rel_l2"])
        # the whole artifact in one session, once the layer-by-layer check passed (its failure says more)
        fp16_off = half == torch.float16 and spec is None and verified.vs_fp32["rel_l2"] > tolerance
        whole = (run_end_to_end(model_path, weights_bytes, verified, tolerance, options.log,
                                widened=half == torch.bfloat16)
                 if verified.passed(tolerance) and not fp16_off else None)
        # the calibration data's routing: measured as the writer carried it, or (--quant auto) before the search
        routing = plan.routing if plan is not None and plan.routing is not None else \
            streamer.calibration.routing if streamer.calibration is not None else None
        report = {
            "source": source, "target": "onnxruntime", "out_of_core": True, "dtype": dtype_of(options),
            "model": {"source": source, "identity": f"hf:{os.path.abspath(source)}",
                      "checkpoint_headers_sha256": identity["checkpoint_headers_sha256"]},
            "capture": {"method": "torch.export (non-strict) on the meta device", "notes": notes},
            "graph": graph, "moe_layers": layers, "quantization": quant, "pruning": pruning, "generation": generation,
            "calibration": None if calibrated is None else {"data": calibrated.description,
                                                            "tokens": calibrated.tokens},
            "routing": None if routing is None else [l.to_dict() for l in routing],
            "numerics": {**verified.numerics(tolerance),
                         "end_to_end": whole.to_dict() if whole else {"ran": False,
                                                                      "why": "the layer-by-layer check failed first"}},
            "weights_bytes": weights_bytes,
            "checkpoint": {"parameters": ck.numel, "stored_bytes": ck.nbytes, "files": identity["files"]},
            "memory": {**memory.to_dict(), **fit},
            # the process's peak resident memory as each stage ended, and the stage that raised it last
            "compile_memory": {"peak_rss_bytes_after": dict(stage.peaks), "peak_stage": stage.peak_stage()},
            "files": sorted(os.path.relpath(f, tmp) for f in files) + ["golden/"],
        }
        from moec.report import moec_version, versions

        report.update(moec_version=moec_version(), versions=versions())
        if not report["numerics"]["passed"]:
            first = verified.first_failing(tolerance)
            report["numerics"]["first_failing_layer"] = first.layer if first else None
            from moec.targets.base import rounding_hint

            hint = rounding_hint(quant, max(p.rel_l2 for p in verified.probes))
            raise VerificationError(verified.failure(tolerance) + hint + " " + keep_failed(tmp, options, report))
        if over is not None:  # once the artifact is known right: a wrong one is a VerificationError, above
            raise over
        if fp16_off:
            report["numerics"]["passed"] = False
            raise VerificationError(f"in fp16 the logits move by relative L2 {verified.vs_fp32['rel_l2']:.3g} from the "
                                    f"fp32 model (tolerance {tolerance:g}): this model does not hold in fp16; compile "
                                    "it in fp32. " + keep_failed(tmp, options, report))
        if half:  # as the in-memory report has it
            report["numerics"]["vs_fp32"] = {"against": "eager PyTorch in fp32, layer by layer", "inputs": [
                {"input": p.name, **p.vs_fp32} for p in verified.probes]}
        if half == torch.bfloat16:
            report["numerics"]["evaluated_as"] = (
                "each segment (and the whole artifact, where it ran) widened to fp32 for ONNX Runtime's CPU provider "
                "(no bf16 kernels), against eager PyTorch in fp32 on the same bf16 weights; bf16 arithmetic itself "
                "is not run here (the in-memory compile reports eager bf16's distance from fp32)")
        if not whole.passed(tolerance):
            report["numerics"]["passed"] = False
            raise VerificationError(f"the whole artifact in one ONNX Runtime session differs from the eager reference "
                                    f"by relative L2 {whole.rel_l2:.3g} (tolerance {tolerance:g}), though every "
                                    f"segment run alone is within it. " + keep_failed(tmp, options, report))
        else:
            from moec.golden import Probe, recorded_tolerance, write_golden

            write_golden(os.path.join(tmp, "golden"),
                         [Probe(f"probe{i}", p.feeds, p.outputs) for i, p in enumerate(verified.probes)],
                         model=report["model"], precision=("auto" if plan is not None else f"int{spec.bits}")
                         if spec else dtype_of(options),
                         tolerance=recorded_tolerance(dtype_of(options), spec is not None, tolerance),
                         versions=versions())
        from moec.pipeline import package
        from moec.targets.base import ArtifactContext

        artifact = ArtifactContext(tmp, model_path, files, report, options, [], options.log)
        triton_dir = stage("package", "writing the artifact", package, artifact, target, stage.timings, t0)
    return CompileResult(os.path.abspath(options.out), report, triton_dir)


def index_checkpoint(source: str, method: Optional[str], options: CompileOptions):
    """(the checkpoint's index, its config (moec.miniature.read_config), for a pre-quantized checkpoint what
    streams its codes (moec.mxfp4_stream.Mxfp4Stream, its experts scanned; moec.packed_stream.PackedStream), else
    None, and the checkpoint's identity as stored: headers hash, files, stored bytes). The index then lists the
    quantized tensors as the weights they stand for, decoded when read. An MXFP4 checkpoint is checked from its
    headers and config (re-quantizing flags, shapes, experts left unquantized, fp16's scale range) before its
    experts are read."""
    from moec.miniature import read_config

    ck = LazyCheckpoint(source)
    identity = {"checkpoint_headers_sha256": headers_sha256(ck), "files": len(set(ck.files.values()))}
    hf = read_config(source)
    if method is None:
        return ck, hf, None, identity
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config  # moec folds the codes; transformers' quantizer must not wrap layers
    if method != "mxfp4":
        from moec.fold_checkpoint import READERS
        from moec.packed_stream import PackedStream

        stream = PackedStream(ck, READERS[method]()(source))
        stream.check_act_order()
        stream.decode_in()
        return ck, hf, stream, identity
    from moec.mxfp4_stream import Mxfp4Stream
    from moec.pipeline import dtype_of, refuse_requantizing

    # what the scan can't change (its block size it decides): conflicting flags refused before it reads anything
    refuse_requantizing("MXFP4, folded as int8 codes", {"quant": "int8", "asymmetric": False}, options)
    prequant = Mxfp4Stream(ck)
    prequant.check_model(ck.skeleton(hf.config))  # on the meta device: shapes only
    prequant.scan(options.log, fp16_scales=dtype_of(options) == "fp16")
    return ck, hf, prequant, identity


def on_bf16_weights(prepare: Callable[[nn.Module, str], None]) -> Callable[[nn.Module, str], None]:
    """A layer group read as `prepare` reads it, its floating-point weights then rounded to bf16 as cast_precision
    rounds them and widened back: the eager model in fp32 arithmetic on the artifact's bf16 weights."""
    def read(model: nn.Module, key: str, skip=None) -> None:
        prepare(model, key, skip=skip)
        model.to(torch.bfloat16).float()

    return read


def in_fp16(prepare: Callable[[nn.Module, str], None]) -> Callable[[nn.Module, str], None]:
    """A layer group read as `prepare` reads it, then cast to fp16 as cast_precision casts the in-memory model
    (every floating-point parameter and buffer; the layers still on the meta device stay there)."""
    def read(model: nn.Module, key: str, skip=None) -> None:
        prepare(model, key, skip=skip)
        model.to(torch.float16)

    return read


def run_end_to_end(model_path: str, weights_bytes: int, verified, tolerance: float, log: Callable[[str], None],
                   widened: bool = False):
    """After the layer-by-layer check, the whole artifact in one ONNX Runtime session where memory allows it
    (moec.verify_whole, in a child process); the report says whether it ran, and why not. `widened`: a bf16
    artifact, run as fp32."""
    from moec.verify_whole import WholeRun, fits, run_whole

    ok, why = fits(weights_bytes, _available_memory(), widened)
    if not ok:
        log(f"  end to end: not run ({why})")
        return WholeRun(False, why)
    log(f"  end to end: the whole artifact in one ONNX Runtime session (a child process), "
        f"{len(verified.probes)} input(s)")
    whole = run_whole(model_path, verified.probes, tolerance)
    if whole.ran:
        log(f"  end to end: relative L2 {whole.rel_l2:.2e} against the eager reference, {whole.vs_segmented:.1e} "
            f"against the layer-by-layer run; the session's process peaked at {whole.peak_rss_bytes / 2**30:.2f} GiB")
    else:
        log(f"  end to end: not run ({whole.why})")
    return whole


def refuse_quantized_checkpoint(source: str) -> None:
    """A checkpoint whose weights are neither plain floats nor a format folded as it streams (moec-packed, fp8,
    bitsandbytes ...) is named before any work: streaming it as floats would fail at its first layer with a
    confusing message."""
    from moec.checkpoint import is_packed

    from moec.fold_checkpoint import quant_method, quantization_config

    qc = quantization_config(source)
    if quant_method(source) is not None and not is_packed(source):
        return  # folded as it streams (moec.mxfp4_stream, moec.packed_stream)
    what = "a moec-packed" if is_packed(source) else (
        f"a {qc.get('quant_method', 'quantized')}" if isinstance(qc, dict) and qc else None)
    if what:
        raise MoecError(f"'{source}' is {what} checkpoint: an out-of-core compile streams float weights and the "
                        "pre-quantized formats moec folds (MXFP4, compressed-tensors, GPTQ, AWQ), not this one yet; "
                        "compile it with --out-of-core off. Nothing was written.")


def keep_failed(tmp: str, options: CompileOptions, report: dict) -> str:
    """With --keep-failed, the failing artifact and its report move to OUT.failed; the sentence saying where."""
    if not options.keep_failed:
        return "Nothing was written; rerun with --keep-failed to inspect the artifact."
    import shutil

    from moec.pipeline import _write_json

    _write_json(os.path.join(tmp, "report.json"), report)
    kept = os.path.abspath(options.out) + ".failed"
    shutil.rmtree(kept, ignore_errors=True)
    os.rename(tmp, kept)
    return f"The failing artifact and its report are in {kept}."


def wrapper_of(graph_module: nn.Module) -> Callable[[nn.Module], nn.Module]:
    """How the captured graph wrapped the transformers model (logits, or the KV-cache decoder), to wrap another."""
    from moec.generation import CausalLMDecoder
    from moec.sources import CausalLMLogits

    if isinstance(graph_module, CausalLMDecoder):
        return lambda model: CausalLMDecoder(model, graph_module.layers).eval()
    return lambda model: CausalLMLogits(model).eval()


def quantization_report(layers: list[dict], spec, verified, tolerance: float, coder,
                        rounding, dense=None, auto=None) -> dict:
    """The report's quantization entry, in the in-memory compile's terms (the CLI prints both alike); `coder`
    chose the codes (moec.quantize_streamed); `dense` (--quant-dense) quantized the other Linears; `auto`
    (--quant auto: a StreamedChoice) the precision of each layer, those kept at full precision listed too."""
    if auto is not None:
        from moec.mixed_precision import FULL
        from moec.passes.outcomes import QuantizationOutcome

        kept = [QuantizationOutcome(path, FULL, auto.plan.weight_bytes[path][FULL], auto.plan.weight_bytes[path][FULL],
                                    0.0, 1.0, method="kept at full precision").to_dict()
                for path, precision in auto.plan.choice.items() if precision == FULL]
        order = list(auto.plan.choice)
        layers = sorted(layers + kept, key=lambda l: order.index(l["path"]) if l["path"] in order else len(order))
    every = layers + (dense.layers if dense is not None else [])
    report = {"spec": spec.name, "precision": "auto" if auto is not None else f"int{spec.bits}",
              "method": coder.method, "layers": layers,
              **rounding_fields(rounding),
              "weight_bytes_fp32": sum(l["weight_bytes_fp32"] for l in every),
              "weight_bytes_quantized": sum(l["weight_bytes_quantized"] for l in every),
              "logits_vs_fp32": verified.vs_fp32, "tolerance_vs_dequantized": tolerance,
              "reference": coder.reference}
    if dense is not None:
        report["dense"] = dense.report()
    if auto is not None:
        report["auto"] = {**auto.plan.to_dict(), "passes": auto.passes, "measured_on": auto.measured_on}
    return report


@dataclass
class StreamedChoice:
    """--quant auto out of core: the search's plan, the per-layer specs it gives, and what measuring it took."""

    plan: object  # moec.mixed_precision.MixedPlan
    specs: object  # moec.mixed_precision.LayerSpecs
    passes: int
    measured_on: str
    codes: object  # moec.precision_codes.PrecisionCodes: the chosen precision's codes, for the writer
    calibrated: bool  # the codes are GPTQ's (--calibration)
    routing: Optional[list] = None  # --calibration: each fused layer's LayerRouting, measured while solving
    # --prune-experts FRACTION: the experts each layer loses (moec.prune_streamed.StreamedPruning, chosen before
    # the search, which measured the pruned model) and the pruned model's distance from the unpruned one
    pruning: object = None
    vs_unpruned: object = None  # passes.prune_experts.Distance, on the calibration data

    def coder(self):
        """The writer's coder: the search's codes at the chosen precisions (moec.precision_codes.KeptCodes)."""
        from moec.calibrate_streamed import CalibratedCodes
        from moec.mixed_precision import FULL
        from moec.precision_codes import KeptCodes
        from moec.quantize_streamed import RoundToNearest

        choice = {p: c for p, c in self.plan.choice.items() if c != FULL}
        if self.calibrated:
            return KeptCodes(self.codes, choice, CalibratedCodes.method,
                             "the dequantized model, layer by layer (each layer's experts calibrated on the "
                             "calibration data and dequantized: the codes the search measured, as written)")
        return KeptCodes(self.codes, choice, RoundToNearest.method, RoundToNearest.reference)


def choose_streamed(ck: LazyCheckpoint, hf, kinds: dict, lowering: list, options: CompileOptions,
                    build_source) -> StreamedChoice:
    """--quant auto: each fused layer's precision (moec.mixed_precision.choose_batched), its errors measured on the
    verification inputs a pass over the checkpoint at a time (moec.measure_precision_streamed), before the graph
    is captured with the chosen bit widths. `build_source(spec)`: the meta model as the task's source."""
    from moec.measure_precision_streamed import StreamedErrors
    from moec.mixed_precision import FULL, PRECISIONS, LayerSpecs, choose_batched, describe
    from moec.passes.quantize_experts import spec_from_options
    from moec.precision_codes import PrecisionCodes
    from moec.quantize_streamed import RoundToNearest
    from moec.quant import packed_shapes, quantized_shape

    meta, src = build_source(None)
    specs = {p: spec_from_options({**options.extra, "quant": p}) for p in PRECISIONS if p != FULL}
    paths = [p.path for p in meta.planned if p.fused]
    removed = meta.pruned or {}  # --prune-experts FRACTION: the experts each layer loses (the graph keeps the rest)
    weight_bytes: dict[str, dict[str, int]] = {}
    for planned in (p for p in meta.planned if p.fused):  # from shapes: what each precision would write
        x = planned.spec.experts
        n = x.num_experts - removed.get(planned.path, (0, ""))[0]
        entry = weight_bytes[planned.path] = {FULL: 0, **{p: 0 for p in specs}}
        for name, shape in (("w_gate_up", (n, x.intermediate * (2 if x.gated else 1), x.hidden)),
                            ("w_down", (n, x.hidden, x.intermediate))):
            entry[FULL] += math.prod(shape) * 4
            for precision, spec in specs.items():
                w = torch.empty(shape, device="meta")
                weight, scales, zps = packed_shapes(quantized_shape(w, spec, f"{planned.path}.{name}"))
                entry[precision] += math.prod(weight) + 4 * math.prod(scales) + (math.prod(zps) if zps else 0)
    # a streamer only for reading layers at full precision, fused (experts one at a time where they can be)
    reader = LayerStreamer(ck, ck.skeleton(hf.config), meta.planned, kinds, specs["int8"], lowering, options.extra,
                           lambda msg: None)
    pruning = vs_unpruned = None
    if meta.pruned is not None:  # chosen in the calibration run below, before the search measures the pruned model
        from moec.prune_streamed import StreamedPruning

        pruning = reader.pruning = StreamedPruning.from_meta(meta.pruned, options.extra)
    inputs = src.verification_inputs(options.verify_seq_len)
    wrap = wrapper_of(src.module)
    calibration = options.extra.get("calibration")
    if calibration:
        refuse_calibrating_whole([p for p in paths if not reader.streaming.streams(p)])
    parent = os.path.dirname(os.path.abspath(options.out))  # the codes kept between passes: beside the artifact
    # round-to-nearest's made when first asked for, int2's kept (its clipping search is what costs); calibrated
    # ones solved first, every precision kept
    codes = PrecisionCodes(specs, parent, options.log, make=None if calibration else
                           lambda path, precision, e, w: RoundToNearest(specs[precision]).codes(None, path, e, {}, w),
                           kept=("int2",))
    routing = None
    try:
        if calibration:  # each layer's GPTQ codes at every precision first, from the full-precision model's data
            from moec.calibrate_precisions_streamed import CalibratedPrecisions
            from moec.calibrate_streamed import LayerInputs
            from moec.calibration import load_calibration

            carried = LayerInputs(wrap(ck.skeleton()), load_calibration(calibration, src).batches, ck,
                                  reader.prepare_calibration, paths, options.log)
            # pruned: each layer ranked on its unpruned routing and pruned, the codes solved on the pruned model's
            # states (carried beside the unpruned ones), as in memory
            carried.pruned_states = pruning is not None
            try:
                CalibratedPrecisions(codes, calibration, options.log).solve(carried, None if pruning is None else (
                    lambda key: lambda model, routing: reader._prune_calibrated(model, key, routing)))
                if pruning is not None:
                    vs_unpruned = carried.pruning_distance()
                routing = carried.routing
            finally:
                carried.done()
        if pruning is not None:
            check_pruning(options.extra, pruning, vs_unpruned, options.log)
        errors = StreamedErrors(lambda: wrap(ck.skeleton()), inputs, ck,
                                reader.prepare_calibration if pruning is None else reader.prepare_pruned, paths,
                                options.extra, options.log, codes.dequantized)
        plan = choose_batched(paths, weight_bytes, errors, float(options.extra["accuracy_budget"]), options.log)
        codes.keep_only(plan.choice)  # the writer's, from here on (closed by the compile)
    except BaseException:
        codes.close()
        raise
    finally:
        if reader.streaming is not None:
            reader.streaming.done()
    chosen = LayerSpecs({p: None if c == FULL else specs[c] for p, c in plan.choice.items()})
    options.log(f"  quant auto: {describe(plan.choice)} (relative L2 {plan.measured:.3g} within "
                f"{plan.budget:g}; {errors.passes} pass(es) over the checkpoint)")
    return StreamedChoice(plan, chosen, errors.passes,
                          f"the logits on the {len(inputs)} verification inputs, a decoder layer at a time"
                          + (" (GPTQ's codes at each precision, solved first)" if calibration else "")
                          + (", the pruned model" if pruning is not None else ""), codes, bool(calibration), routing,
                          pruning, vs_unpruned)


def check_pruning(extra: dict, pruning, d, log: Callable[[str], None]) -> None:
    """--prune-experts FRACTION: the pruning's distance from the unpruned model on the calibration data (`d`, a
    passes.prune_experts.Distance), logged and held to --accuracy-budget as the in-memory pass holds it, as soon as
    it is known (with --quant auto before the search spends passes over the checkpoint; otherwise once the writer
    carried the data through every layer, before the verification): AccuracyBudgetError naming the layers losing
    the most, nothing written."""
    from moec.passes.prune_experts import over_budget

    gone = sum(len(r) for r in pruning.removed.values())
    log(f"  pruned {gone} experts (by {pruning.by}); logits vs unpruned on the calibration data: relative L2 "
        f"{d.rel_l2:.3g}, top-1 agreement {d.top1_agreement:.1%}")
    budget = extra.get("accuracy_budget")
    if budget is not None and not d.rel_l2 <= float(budget):
        worst = sorted(pruning.shares, key=lambda p: -pruning.shares[p])[:3]
        raise over_budget(budget, f"pruning {pruning.fraction:g} of the experts (by {pruning.by})", d,
                          "the calibration data", worst, "a smaller fraction")


def refuse_calibrating_whole(whole: list[str]) -> None:
    """--calibration with --quant out of core: calibrated codes are read back expert by expert as written, so a
    quantized layer whose experts are read whole can't be calibrated."""
    if whole:
        raise MoecError(f"{whole[0]}: its experts are read whole, not one at a time; --calibration with --quant "
                        "calibrates only layers whose experts stream out of core. Compile with --out-of-core off. "
                        "Nothing was written.")


def _layer_report(planned, lowered) -> dict:
    by_path = {o.path: o for o in lowered}
    layers = []
    for p in planned:
        entry = {"path": p.path, "fused": p.fused}
        if p.reason:
            entry["reason"] = p.reason
        if p.spec is not None:
            entry["spec"] = p.spec.to_dict()
        o = by_path.get(p.path)
        if o is not None:
            entry["lowered_to"] = o.lowered_to
            if o.reason:
                entry["lowering_note"] = o.reason
        layers.append(entry)
    return {"fused": sum(l["fused"] for l in layers), "unfused": sum(not l["fused"] for l in layers),
            "layers": layers, "note": "" if layers else "no MoE layer found; compiled as a dense model"}


def headers_sha256(ck: LazyCheckpoint) -> str:
    """The checkpoint's identity without reading its weights: tensor names, files and sizes."""
    h = hashlib.sha256()
    for name in sorted(ck.files):
        h.update(f"{name}\0{os.path.basename(ck.files[name])}\0".encode())
    for file in sorted(set(ck.files.values())):
        h.update(f"{os.path.basename(file)}:{os.path.getsize(file)}\n".encode())
    return h.hexdigest()


class LayerStreamer:
    """write_streamed's `fill`: a layer group's artifact tensors, made from the checkpoint when they are asked for;
    and `prepare`, the same group as the exact reference (fused, and with --quant dequantized) for verification."""

    def __init__(self, ck: LazyCheckpoint, model: nn.Module, planned: list, kinds: dict, spec, lowering: list,
                 extra: dict, log: Callable[[str], None], prefix: str = WRAPPER, coder=None, dense=None):
        self.ck, self.model, self.planned, self.kinds, self.log = ck, model, planned, kinds, log
        self.dense = dense  # --quant-dense: moec.quantize_dense_streamed.StreamedDense
        self._dense_tensors: dict[str, torch.Tensor] = {}  # the head's MatMulNBits tensors, while its group is read
        self.prefix = prefix  # what the graph's wrappers put before the transformers model's tensor names
        self.spec, self.lowering, self.extra = spec, lowering, extra
        self.fused_paths = [p.path for p in planned if p.fused]
        self.quantized: list[dict] = []  # per layer: its quantization error on probe inputs, bytes before/after
        self.streaming = None  # with --quant: the layers quantized one expert at a time (their fp32 experts
        if spec is not None:   # never all in memory); the others are read whole
            from moec.quantize_streamed import StreamedQuantizer

            self.streaming = StreamedQuantizer(ck, ck.config(), model, planned, kinds, spec, log, coder)
            if coder is not None and coder.exact:  # a checkpoint's own codes
                unstreamed = [p for p in self.fused_paths if not self.streaming.streams(p)]
                if unstreamed:  # the fallback below (self.quantize) would re-quantize the checkpoint's weights
                    raise MoecError(f"{unstreamed[0]}: its experts can't be read one at a time, so their checkpoint "
                                    "codes can't be folded as they stream; compile with --out-of-core off. Nothing "
                                    "was written.")
                coder.check_folded(self.fused_paths)  # an unfused layer would be written as its decoded fp32 stack
        self.coder = self.streaming.coder if self.streaming is not None else None
        self.calibration = None  # --calibration: moec.calibrate_streamed.LayerInputs, carried along as layers stream
        self.pruning = None  # --prune-experts FRACTION: moec.prune_streamed.StreamedPruning
        if self.coder is not None and self.coder.calibrated:  # (--quant auto: those it keeps at fp32 aside)
            refuse_calibrating_whole([p for p in self.fused_paths
                                      if spec_at(spec, p) is not None and not self.streaming.streams(p)])

    @property
    def calibrates_head(self) -> bool:
        """--calibration with --quant-dense and a head among the dense Linears: the head is solved after the data
        went through every layer, so its group is written last."""
        return self.calibration is not None and self.dense is not None and bool(self.dense.in_group(""))

    def _prune_calibrated(self, model: nn.Module, key: str, routing: dict) -> bool:
        """LayerInputs.advance's `prune`: rank the group's fused layers on the routing the calibration data just had
        through them unpruned, and slice them in the calibration's model; whether any expert went."""
        for planned in self.planned:
            if planned.fused and _group_of(planned.path) == key:
                self.pruning.choose(planned.path, planned.spec, routing.get(planned.path))
        return self._prune(model, key)

    def _prune(self, model: nn.Module, key: str) -> bool:
        """The group's fused layers in `model` sliced to the experts chosen to stay; whether any expert went."""
        from moec.moe_layer import FusedMoE

        removed = False
        for planned in self.planned:
            if planned.fused and _group_of(planned.path) == key:
                fused = next(m for m in model.get_submodule(planned.path).modules() if isinstance(m, FusedMoE))
                removed |= len(self.pruning.apply(fused, planned.path, record=False)) < planned.spec.experts.num_experts
        return removed

    def _streamed(self, key: str) -> list[str]:
        return [p for p in self.fused_paths if _group_of(p) == key and self.streaming is not None
                and self.streaming.streams(p)]

    def prepare(self, model: nn.Module, key: str, record: bool = False, skip=None,
                calibration: Optional[dict] = None) -> None:
        """Read the group into `model` (but the checkpoint tensors `skip` names), fuse its MoE layers on their real
        weights and, with --quant, quantize their experts (the FusedMoE then computes with the dequantized
        weights: the artifact's exact reference); `calibration`: the fused layers' calibration inputs."""
        streamed = self._streamed(key)
        if streamed:
            self.streaming.materialise(model, key)
        else:
            self.ck.materialise(model, key, skip=skip)
        if not key and hasattr(model, "tie_weights"):
            model.tie_weights()
        if self.dense is not None:  # where each Linear was read, before fusion moves shared experts
            self.dense.remember(model, key)
        for path in self.fused_paths:
            if _group_of(path) != key:
                continue
            if path in streamed:
                planned = next(p for p in self.planned if p.path == path)
                prune = None if self.pruning is None else (lambda fused, path=path: self.pruning.apply(fused, path,
                                                                                                        record))
                outcome = self.streaming.fuse(model, path, "codes" if record else "dequantized", self.probe(planned),
                                              (calibration or {}).get(path) if record else None, prune)
                if outcome is not None:
                    self.quantized.append(outcome)
                continue
            fused = self.fuse_real(model, path, record)
            if self.pruning is not None:  # before quantization, as the passes run in memory
                self.pruning.apply(fused, path, record)
            if spec_at(self.spec, path) is not None:  # --quant auto: each layer at its own precision, or none
                self.quantize(path, fused, record)
        if self.dense is not None and not record:  # the reference: what MatMulNBits computes with
            self.dense.dequantize(model, key)

    def prepare_fp32(self, model: nn.Module, key: str, skip=None) -> None:
        """The group at full precision, as the checkpoint has it (layers streamed expert by expert run fused, from
        their fp32 experts read one at a time): the reference for the quantized artifact's error vs fp32."""
        streamed = self._streamed(key)
        if not streamed:
            self.ck.materialise(model, key, skip=skip)
        else:
            self.streaming.materialise(model, key)
        if self.dense is not None:  # calibration's too: which Linears have the checkpoint's codes, by where read
            self.dense.remember(model, key)
        for path in streamed:
            self.streaming.fuse(model, path, "fp32", self.probe(next(p for p in self.planned if p.path == path)))

    def prepare_calibration(self, model: nn.Module, key: str) -> None:
        """The group at full precision with its MoE layers fused, as the in-memory compile runs its calibration."""
        self.prepare_fp32(model, key)
        streamed = self._streamed(key)
        for path in self.fused_paths:
            if _group_of(path) == key and path not in streamed:
                self.fuse_real(model, path, record=False)

    def prepare_pruned(self, model: nn.Module, key: str) -> None:
        """prepare_calibration's group, its fused layers then pruned to the experts already chosen: --quant auto's
        search measures the pruned full-precision model and its quantized variants, as in memory."""
        self.prepare_calibration(model, key)
        self._prune(model, key)

    def fill(self, key: str, values: list) -> Iterator[tuple]:
        from moec.passes.base import PassContext

        if not key:
            if self.calibrates_head:  # the data went through every layer: the head's codes, before it is written
                self.calibration.calibrate_head()
            yield from self._fill_embeddings(values)
            return
        try:
            inputs = None if self.calibration is None else self.calibration.advance(
                key, None if self.pruning is None else lambda model, routing: self._prune_calibrated(model, key, routing))
            self.prepare(self.model, key, record=True,  # calibrated codes need the inputs; routing alone not
                         calibration=inputs if self.coder is not None and self.coder.calibrated else None)
            del inputs  # the codes are solved: the layer's calibration inputs are not kept while it is written
            if self.dense is not None:  # before the experts' lowering, as in memory (the paths are its)
                self.dense.quantize(self.model, key, swap=True)
            layer = self.model.get_submodule(_layer_path(self.model, key))
            for p in self.lowering:
                if p.name != "quantize_dense":  # done just above, from the weights
                    p(layer, PassContext(probes=[], options=self.extra))
            for path in self._streamed(key):
                self.streaming.fill_lowered(self.model, path)
            yield from self._bytes(values, key)
        finally:  # its lowered modules' buffers (packed codes) go too: nothing of a written layer stays
            release(self.model.get_submodule(_layer_path(self.model, key)), buffers=True)
            if self.streaming is not None:
                self.streaming.done()
            trim()

    def _fill_embeddings(self, values: list) -> Iterator[tuple]:
        """The embeddings-and-head group, one checkpoint tensor at a time where each reads on its own
        (LazyCheckpoint.one_by_one): with a large vocabulary each is more than a decoder layer, and the group whole
        would set the compile's peak (GPT-OSS: 2.2 GiB apiece in fp32)."""
        names = self.ck.one_by_one(self.model, "")
        passes = names if names and len(names) > 1 and not self._streamed("") else [None]  # None: the group whole
        todo = list(values)
        try:
            for name in passes:
                self.prepare(self.model, "", record=True, skip=None if name is None else (lambda n, name=name: n != name))
                if self.dense is not None:  # the head read now: its MatMulNBits tensors (it stays a Linear)
                    self._dense_tensors = self.dense.quantize(self.model, "", swap=False)
                ready = self._filled(todo)
                yield from self._bytes(ready, "")
                done = {v.name for v in ready}
                todo = [v for v in todo if v.name not in done]
                self._dense_tensors = {}
                release(self.model)
                trim()
            yield from self._bytes(todo, "")  # a value no tensor filled: named
        finally:
            self._dense_tensors = {}
            release(self.model)
            if self.streaming is not None:
                self.streaming.done()
            trim()

    def _filled(self, values: list) -> list:
        """The values whose tensors the model holds now (the tensors are not kept: they go at the next release)."""
        real = {n for n, t in self._tensors().items() if not t.is_meta}
        return [v for v in values if self._name(v) in real]

    def _name(self, value) -> str:
        return value.name[len(self.prefix):] if value.name.startswith(self.prefix) else value.name

    def _tensors(self) -> dict:
        tensors = dict(self.model.named_parameters(remove_duplicate=False))
        tensors.update(self.model.named_buffers(remove_duplicate=False))
        tensors.update(self._dense_tensors)
        return tensors

    def _bytes(self, values: list, key: str) -> Iterator[tuple]:
        """(value, its bytes in the graph's dtype) for each value, from the model's tensor of its name."""
        import numpy as np

        tensors = self._tensors()
        for v in values:
            t = tensors.get(self._name(v))
            if t is None or t.is_meta:
                raise MoecError(f"out-of-core compile: the graph's initializer '{v.name}' has no tensor in "
                                f"{key or 'the embeddings and head'} after streaming (a module the graph reads "
                                "outside its layer); compile with --out-of-core off.")
            want = tuple(v.const_value.shape.numpy())
            if tuple(t.shape) != want:
                raise MoecError(f"out-of-core compile: '{v.name}' is {tuple(t.shape)} from the checkpoint, the "
                                f"graph captured {want}.")
            source = t.detach().contiguous().numpy()
            with np.errstate(over="ignore"):  # a value beyond fp16's range is named just below
                array = source.astype(v.const_value.dtype.numpy(), copy=False)
            if array.dtype == np.float16 and source.dtype != np.float16:
                check_fp16(v.name, source, array)
            # its own bytes, no copy (as uint8: a buffer of ml_dtypes' bfloat16 has no format memoryview takes)
            yield v, memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))

    def fuse_real(self, model: nn.Module, path: str, record: bool = True):
        """Fuse one MoE layer on its real weights, as the miniature taught: same spec, or an error naming it."""
        from moec.passes.fuse_moe import CalledLike, analyze, match_layer
        from moec.passes.layers import LayerCall, set_submodule
        from moec.plan_model import layer_kind

        sub = model.get_submodule(path)
        mini = self.kinds[layer_kind(sub)]
        anatomy = analyze(sub)
        planned = next(p for p in self.planned if p.path == path)
        outcome, fused = match_layer(path, sub, anatomy, self.probe(planned), LayerCall(mini.tensor_index or 0))
        if fused is None:
            raise PassValidationError(f"{path}: fused on the miniature, but on its real weights {outcome.reason}; "
                                      "compile with --out-of-core off to see the whole model's fusion report.")
        if fused.spec != planned.spec:
            raise PassValidationError(f"{path}: on its real weights the layer fuses as {fused.spec}, the miniature "
                                      f"(whose graph was captured) as {planned.spec}; compile with --out-of-core off.")
        call = LayerCall(mini.tensor_index) if mini.tensor_index is not None else None
        set_submodule(model, path, fused if call is None else CalledLike(fused, call))
        if record:
            self.log(f"  {path}: fused on its real weights (validated, {outcome.candidates_tried} readings tried)")
        return fused

    @staticmethod
    def probe(planned) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(1, 16, planned.spec.experts.hidden, generator=gen)

    def quantize(self, path: str, fused, record: bool) -> None:
        """Round-to-nearest codes for the experts, given to the layer as quantize_experts gives them without
        calibration. `record`: keep the codes for the lowering, and the layer's error for the report."""
        from moec.passes.quantize_experts import give_codes
        from moec.quant import quantize

        spec = spec_at(self.spec, path)
        q1 = quantize(fused.w_gate_up, spec, f"{path}.w_gate_up")
        q2 = quantize(fused.w_down, spec, f"{path}.w_down")
        x = self.probe(next(p for p in self.planned if p.path == path)) if record else None
        outcome = give_codes(path, fused, spec, q1, q2, x)
        if not record:  # the exact reference needs the dequantized weights only; the codes would outlive the layer
            fused.quantized = None
            return
        self.quantized.append(outcome.to_dict())


def check_fp16(name: str, source, array) -> None:
    """A tensor converted to fp16 keeps its values finite: a value beyond fp16's range (65504) would be inf."""
    import numpy as np

    bad = int((np.isinf(array) & np.isfinite(source)).sum())
    if bad:
        raise MoecError(f"--dtype fp16: '{name}' has {bad} value(s) beyond fp16's range (largest magnitude "
                        f"{float(np.abs(source).max()):.4g} > 65504); this model does not hold in fp16, compile it in "
                        "fp32. Nothing was written.")


def _group_of(path: str) -> str:
    from moec.external_data import layer_key

    return layer_key(path + ".")


def _layer_path(model: nn.Module, key: str) -> str:
    from moec.lazy_checkpoint import decoder_layers

    name, _ = decoder_layers(model)
    return f"{name}.{key.split('.')[1]}"


def summary_lines(report: dict) -> list[str]:
    n = report["numerics"]
    worst = max(n["layers"], key=lambda l: l["rel_l2"]) if n.get("layers") else None
    lines = [f"out of core: {report['checkpoint']['parameters'] / 1e9:.3f}B parameters streamed a layer at a time; "
             f"{report['weights_bytes'] / 2**30:.2f} GiB of weights in "
             f"{sum(f.endswith('.data') for f in report['files'])} file(s)"]
    if worst is not None:
        lines.append(f"verified layer by layer: worst layer {worst['layer']} relative L2 {worst['rel_l2']:.2e}")
    whole = n.get("end_to_end") or {}
    if whole.get("ran"):
        lines.append(f"verified end to end (one ONNX Runtime session): relative L2 {whole['rel_l2']:.2e}")
    elif whole:
        lines.append(f"not verified end to end: {whole['why']}")
    return lines



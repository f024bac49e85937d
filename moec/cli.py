"""`moec` command line: compile, verify, inspect, golden record."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional, Sequence

from moec import targets
from moec.errors import MoecError


def _progress(quiet: bool):
    start = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def cmd_compile(args: argparse.Namespace) -> int:
    from moec.pipeline import CompileOptions, compile

    from moec.validate import check_model_name

    if args.model_name is not None:  # it names the Triton model and the default --out: one path component
        check_model_name(args.model_name)
    name = args.model_name if args.model_name is not None else "moe_model"
    for flag, value in (("--out", args.out), ("--triton-repo", args.triton_repo)):
        if value is not None and not value.strip():
            raise MoecError(f"{flag} is empty; give a directory.")
    out = args.out if args.out is not None else os.path.join("moec-out", "mixtral-demo" if args.source is None else name)
    extra = {}
    if args.max_shape is not None:
        extra["max_shape"] = parse_dims(args.max_shape)
    if args.shard_size is not None:
        from moec.memory import parse_size

        extra["shard_size"] = parse_size(args.shard_size, "--shard-size")
        if extra["shard_size"] <= 0:
            raise MoecError(f"--shard-size {args.shard_size}: a shard must hold at least one byte.")
    for key in ("quant", "block_size", "asymmetric", "accuracy_budget", "device_memory", "accuracy_level",
                "tensorrt_aot", "quant_dense", "calibration", "prune_by", "static", "task", "dtype"):
        value = getattr(args, key, None)
        if value is not None and value is not False:  # 0 and "" are given values, checked as such
            extra[key] = value
    if args.prune_experts is not None:
        extra["prune_experts"] = parse_prune(args.prune_experts)
    opts = CompileOptions(
        out=out, target=args.target, force=args.force, validate=not args.no_validate,
        fuse=not args.no_fusion, require_fusion=args.require_fusion, disabled_passes=args.no_pass or (),
        triton_repo=args.triton_repo, model_name=name, model_version=args.model_version,
        max_batch_size=args.max_batch_size, instances=1 if args.instances is None else args.instances, log=_progress(args.quiet), extra=extra,
        keep_failed=args.keep_failed, tolerance=args.tolerance, instances_given=args.instances is not None,
    )
    from moec.compile_out_of_core import compile_out_of_core, summary_lines, wants_out_of_core

    if wants_out_of_core(args.source, args.out_of_core, opts.log):
        result = compile_out_of_core(args.source, opts)
    else:
        result = compile(source=args.source, options=opts)
    r = result.report
    layers = r["moe_layers"]
    worst = max(r["numerics"]["inputs"], key=lambda x: x["rel_l2"])
    against = r["numerics"].get("against") or "eager PyTorch"
    print(f"wrote {result.out_dir}/model.onnx  (report: {result.out_dir}/report.json)")
    print(f"MoE layers: {layers['fused']} fused, {layers['unfused']} unfused" +
          (f" — {layers['note']}" if layers.get("note") else ""))
    for path in layers.get("never_called", []):
        print(f"  note: {path} is shaped like a MoE layer, but the model never calls it as one (kept as written)")
    for l in layers["layers"]:
        if not l["fused"]:
            print(f"  warning: {l['path']} left unfused: {l.get('reason', '')}")
            for t in l.get("rules", []):  # the fusion rules tried, in order, and what came of each
                print(f"    {t['stage']} rule '{t['rule']}': {t['result']}" + (f" ({t['detail']})" if t["detail"] else ""))
        elif l.get("lowering_note"):
            print(f"  note: {l['path']} fused, lowered to dense ops: {l['lowering_note']}")
    print(f"numerics vs {against}: worst relative L2 {worst['rel_l2']:.2e}, max abs {worst['max_abs']:.2e} "
          f"(tolerance {r['numerics']['tolerance_rel_l2']:g}) — {'PASS' if r['numerics']['passed'] else 'FAIL'}")
    if r.get("dtype", "fp32") != "fp32":
        cast = next((p["details"] for p in r.get("passes", []) if p["name"] == "cast_precision"), None)
        vs = max(x["rel_l2"] for x in r["numerics"]["vs_fp32"]["inputs"])
        size = (f"{cast['bytes_before'] / 2**20:.1f} MiB -> {cast['bytes_after'] / 2**20:.1f} MiB" if cast else
                f"{r['weights_bytes'] / 2**20:.1f} MiB of weights, converted as they were streamed")
        if r["dtype"] == "bf16":  # verified in fp32 arithmetic on the bf16 weights (moec.widen_bf16)
            arithmetic = r["numerics"].get("bf16_arithmetic")
            print(f"bf16 weights and arithmetic (fp32 inputs and outputs): {size}; checked in fp32 arithmetic (no bf16 "
                  f"kernels on the CPU provider): vs eager fp32 {vs:.2e}"
                  + (f"; eager bf16 vs fp32 {arithmetic['worst_rel_l2']:.2e}" if arithmetic else ""))
        else:
            print(f"{r['dtype']} weights and arithmetic (fp32 inputs and outputs): {size}; vs eager fp32: relative L2 "
                  f"{vs:.2e}")
    gen = r["numerics"].get("generation")
    if gen:
        print(f"text generation: KV-cache decoder; greedy {gen['new_tokens']} tokens on prompt sets "
              f"{gen['prompt_sets']} vs {gen['reference']}:")
        for c in gen["checks"]:
            print(f"  {c['description']}")
        if gen["genai"] != "checked":
            print(f"  onnxruntime-genai: {gen['genai']}")
    if result.triton_model_dir:
        serving = (r.get("triton") or {}).get("serving")
        print(f"Triton model: {result.triton_model_dir}" + (f" — {serving}" if serving else ""))
    for line in targets.get(r["target"]).summary(r, result.out_dir):
        print(line)
    for line in summary_lines(r) if r.get("out_of_core") else []:
        print(line)
    p = r.get("pruning")
    if p:
        d = p["vs_unpruned"]
        how = (f"auto within budget {p['auto']['budget']:g} (a uniform fraction would prune "
               f"{p['auto']['uniform_removed']})" if p["mode"] == "auto" else f"{p['fraction']:g} per layer")
        print(f"pruned experts: {p['experts_before']} -> {p['experts_after']} by {p['by']}, {how}; expert weights "
              f"{p['weight_bytes_before'] / 2**20:.1f} MiB -> {p['weight_bytes_after'] / 2**20:.1f} MiB; vs the unpruned "
              f"model on {p.get('vs_unpruned_on', 'the calibration data')}: relative L2 {d['rel_l2']:.3g}, top-1 agreement {d['top1_agreement']:.1%}")
        for l in p["layers"]:
            if l.get("reason") and not l["removed"]:
                print(f"  note: {l['path']}: {l['reason']}")
    q = r.get("quantization")
    if q:
        dense = q.get("dense")
        what = "experts" if dense is None else (f"experts + {len(dense['layers'])} dense layers ({dense['spec']}; "
                                                f"{len(dense['kept_fp32'])} kept fp32)")
        print(f"quantized {what}: {q['spec']}, {q['weight_bytes_fp32'] / 2**20:.1f} MiB -> "
              f"{q['weight_bytes_quantized'] / 2**20:.1f} MiB; logits vs fp32: relative L2 "
              f"{q['logits_vs_fp32']['rel_l2']:.3g}, cosine {q['logits_vs_fp32']['cosine']:.5f}"
              + (f" (against {q['logits_vs_fp32_against']})" if q.get("logits_vs_fp32_against") else ""))
        auto = q.get("auto")
        if auto:
            from moec.mixed_precision import describe

            int8 = next((u for u in auto["uniform"] if u["precision"] == "int8"), None)
            print(f"  --quant auto (budget {auto['budget']:g}): layers at {describe(auto['choice'])}"
                  + (f"; uniform int8 would write {int8['weight_bytes'] / 2**20:.1f} MiB at relative L2 "
                     f"{int8['rel_l2']:.3g}" if int8 else "") + " (moec inspect DIR --quant)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from moec.junit import write_junit
    from moec.verify import raise_if_failed, verify

    from moec.validate import check_destination, check_positive

    check_positive(args.tolerance, "--tolerance")
    if args.junit:
        check_destination(args.junit, "--junit", force=True)
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.junit))):
            raise MoecError(f"--junit '{args.junit}': its directory does not exist.")
    result = verify(args.dir, args.golden, server=args.server, model_name=args.model_name, tolerance=args.tolerance,
                    engine=args.engine, segmented=True if args.segmented else None)
    from moec.golden import format_table

    print(f"verifying with {result.runner}")
    print(format_table(result.checks, result.tolerance))
    for g in result.generation:
        print(f"greedy generation ({'PASS' if g.passed else 'FAIL'}): {g.describe()}")
    if args.junit:
        write_junit(args.junit, "moec.verify", result.checks, result.seconds)
    raise_if_failed(result)
    print("PASS")
    return 0


def cmd_golden_record(args: argparse.Namespace) -> int:
    import torch

    from moec.validate import check_destination

    if args.seq_len < 1:
        raise MoecError(f"--seq-len {args.seq_len}: the second probe needs at least one token.")
    if args.precision == "auto" and args.tolerance is None:
        raise MoecError("golden record --precision auto: a mixed-precision artifact has no default tolerance; give "
                        "--tolerance (the --accuracy-budget it was compiled with).")
    if args.tolerance is not None and not args.tolerance > 0:
        raise MoecError(f"--tolerance {args.tolerance}: the relative L2 tolerance must be positive.")
    if os.path.exists(args.out) and not args.force:
        from moec.errors import OutputExistsError

        raise OutputExistsError(f"golden directory '{args.out}' already exists; pass --force to re-record it.")
    check_destination(args.out, "--out", force=args.force)

    from moec import golden
    from moec.report import versions
    from moec.passes.base import flatten_outputs
    from moec.route_margins import conditioned_draw
    from moec.sources import load_source

    src = load_source(args.source)

    def make_inputs(seed: int) -> list:
        inputs = [src.make_inputs(seed=seed)]
        if src._is_dynamic(0, 1) if src.example_args else False:
            inputs.append(src.make_inputs(seed=seed + 1, seq_len=args.seq_len,
                                          batch=1 if src._is_dynamic(0, 0) else None))
        return inputs

    def run(inputs: list) -> list:
        with torch.no_grad():
            return [flatten_outputs(src.module(*a)) for a in inputs]

    # inputs whose routing sits on a tie would make the golden depend on rounding: drawn again (moec.route_margins)
    draw = conditioned_draw(make_inputs, run, lambda m: print(f"golden {m}", file=sys.stderr))
    names = src.input_names or [f"input_{i}" for i in range(len(src.example_args))]
    out_names = src.output_names
    probes = []
    for i, (args_, outs) in enumerate(zip(draw.inputs, draw.outputs)):
        onames = out_names if len(out_names) == len(outs) else [f"output_{j}" for j in range(len(outs))]
        probes.append(golden.Probe(f"probe{i}", {n: a.numpy() for n, a in zip(names, args_)},
                                   {n: o.detach().numpy() for n, o in zip(onames, outs)}))
    model = {"source": args.source or "builtin:mixtral-demo", "identity": src.identity,
             "weights_sha256": golden.weights_sha256(src.module)}
    path = golden.record(args.out, probes, model=model, force=args.force, precision=args.precision,
                         tolerance=args.tolerance, versions=versions())
    print(f"recorded {len(probes)} probes in {path}")
    return 0


def parse_prune(text: str):
    """--prune-experts: 'auto' or a fraction (checked against (0, 1) by the compile)."""
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        from moec.passes.prune_experts import PruneError

        raise PruneError(f"--prune-experts '{text}': expected a fraction of each layer's experts (e.g. 0.25) or auto.")


def parse_dims(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise MoecError(f"--max-shape '{text}': expected NAME=INT pairs separated by commas, e.g. batch=8,seq=2048")


def cmd_plan(args: argparse.Namespace) -> int:
    from moec.memory import parse_size
    from moec.plan_model import format_plan, plan_model

    budget = parse_size(args.device_memory) if args.device_memory else None
    max_shape = parse_dims(args.max_shape) if args.max_shape else None
    plan = plan_model(args.source, args.task, max_shape, budget, _progress(args.quiet))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import onnx

    from moec.memory import format_table, render_plot
    from moec.analysis.plan_memory import PlanHooks, plan_memory

    report_path = os.path.join(args.dir, "report.json")
    if not os.path.isfile(report_path):
        raise MoecError(f"no report.json in '{args.dir}'; is it a moec artifact directory?")
    try:
        with open(report_path) as f:
            report = json.load(f)
    except ValueError as exc:
        from moec.errors import ArtifactError

        raise ArtifactError(f"'{report_path}' is not valid JSON ({exc}); recompile the artifact.") from exc
    if args.routing:
        return show_routing(report, report_path, args)
    if args.quant:
        return show_quantization(report, report_path, args)
    if not args.memory:
        print(json.dumps({k: report[k] for k in ("source", "target", "moe_layers", "numerics") if k in report},
                         indent=2, default=str))
        return 0
    mem = report.get("memory")
    if not mem:
        raise MoecError(f"'{report_path}' has no memory plan (compiled by an older moec?); recompile it.")
    profiles = {name: mem["profiles"][name]["dims"] for name in ("min", "opt", "max") if name in mem["profiles"]}
    hooks = PlanHooks.of(targets.get(report["target"])) if report.get("target") in targets.names() else None
    plan = plan_memory(onnx.load(os.path.join(args.dir, "model.onnx"), load_external_data=False), profiles,
                       hooks=hooks, base_dir=args.dir)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(format_table(plan))
    if args.plot:
        render_plot(plan, args.profile, args.plot)
        print(f"plot of profile '{args.profile}' written to {args.plot}", file=sys.stderr)
    return 0


def show_quantization(report: dict, report_path: str, args: argparse.Namespace) -> int:
    from moec.analysis.quant_choice import format_table, render_plot

    q = report.get("quantization")
    if not q:
        raise MoecError(f"'{report_path}' has no quantized experts: compile with --quant int8|int4|int2|auto.")
    print(json.dumps(q, indent=2) if args.json else format_table(q), flush=True)
    if args.plot:
        render_plot(q, args.plot)
        print(f"bytes-vs-error plot written to {args.plot}", file=sys.stderr)
    return 0


def show_routing(report: dict, report_path: str, args: argparse.Namespace) -> int:
    from moec.analysis.routing_stats import LayerRouting, format_table, render_heatmap

    if not report.get("routing"):
        raise MoecError(f"'{report_path}' has no routing statistics: compile with --calibration FILE|random:N "
                        "(and MoE fusion) to measure them.")
    layers = [LayerRouting.from_dict(l) for l in report["routing"]]
    if args.json:
        print(json.dumps({"routing": report["routing"], "pruning": report.get("pruning")}, indent=2))
    else:
        print(format_table(layers))
        pruning = report.get("pruning")
        if pruning:
            for l in pruning["layers"]:
                print(f"{l['path']}: pruned {len(l['removed'])} of {l['experts_before']} experts "
                      f"({', '.join(f'e{e}' for e in l['removed']) or 'none'})")
    if args.plot:
        pruned = {l["path"]: l["removed"] for l in (report.get("pruning") or {}).get("layers", [])}
        render_heatmap(layers, args.plot, pruned=pruned)
        print(f"routing heat map written to {args.plot}", file=sys.stderr)
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from moec.targets.tensorrt.artifact import build_and_verify_engine

    result = build_and_verify_engine(args.dir, log=lambda m: print(m, file=sys.stderr),
                                     imoe=False if args.no_imoe else None, cache_dir=args.cache_dir)
    print(f"engine: {os.path.join(args.dir, result['path'])} (cache {result['cache']}); goldens: worst relative "
          f"L2 {result['verified']['worst_rel_l2']:.3g} <= {result['verified']['tolerance']:g}")
    imoe = result["imoe"]
    if imoe["swapped"]:
        print(f"IMoELayer: {', '.join(imoe['swapped'])}")
    for node, why in imoe["refused"].items():
        print(f"experts plugin kept for {node}: {why}")
    if imoe["why_not"] or imoe["fallback"]:
        print(f"IMoELayer not used: {imoe['fallback'] or imoe['why_not']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moec", description="Compile Mixture-of-Experts models to verified "
                                "ONNX / TensorRT / Triton artifacts.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model (default: the built-in demo MoE)")
    c.add_argument("source", nargs="?", default=None,
                   help="package.module:factory | file.pt2 | Hugging Face model dir (default: built-in demo)")
    c.add_argument("--out", help="output directory (default: moec-out/<name>)")
    c.add_argument("--target", default="onnxruntime", choices=targets.names(),
                   help="what the artifact runs on (default onnxruntime)")
    c.add_argument("--force", action="store_true", help="replace an existing output dir / model version")
    c.add_argument("--triton-repo", help="also write a Triton model repository entry here")
    c.add_argument("--model-name", help="Triton model name (default: moe_model)")
    c.add_argument("--model-version", type=int, default=1)
    c.add_argument("--max-batch-size", type=int, default=None,
                   help="Triton max_batch_size (default 8 when the model has a dynamic batch dim, else 0)")
    c.add_argument("--instances", type=int, default=None,
                   help="Triton instance count (default 1, or derived from the plan with --device-memory)")
    c.add_argument("--device-memory", help="fail unless the model fits in SIZE (e.g. 80GiB) at the max profile")
    c.add_argument("--max-shape", help="max profile for dynamic dims, e.g. batch=8,seq=2048")
    c.add_argument("--shard-size", help="write the weights as external data in files of at most SIZE (e.g. 2GB, "
                                        "500MiB), one layer never split (default: inline under 256 MiB, else 2 GiB "
                                        "shards)")
    c.add_argument("--static", action="store_true",
                   help="keep the example's shapes: a factory that gives no dynamic shapes otherwise gets batch "
                        "(dim 0) and seq (dim 1) inferred by probing, listed in the report; a Hugging Face "
                        "directory compiles as the logits graph at its example's shapes")
    c.add_argument("--task", choices=["text-generation", "logits"], default=None,
                   help="for causal LMs: text-generation (a decoder with a KV cache that onnxruntime-genai loads, "
                        "with genai_config.json; the default for Hugging Face directories and transformers "
                        "factories) or logits (input_ids -> logits, no cache; the default for the built-in demo)")
    c.add_argument("--out-of-core", choices=["auto", "on", "off"], default="auto",
                   help="stream a Hugging Face safetensors checkpoint a layer at a time: bounded memory whatever the "
                        "model's size (auto: when its fp32 weights would take over 30%% of available memory)")
    c.add_argument("--no-validate", action="store_true", help="skip per-pass translation validation")
    c.add_argument("--no-fusion", action="store_true", help="compile without MoE fusion (reference export)")
    c.add_argument("--require-fusion", action="store_true", help="fail if any MoE layer stays unfused")
    c.add_argument("--no-pass", action="append", help="disable a pass by name (repeatable)")
    c.add_argument("--tensorrt-aot", action="store_true",
                   help="mark the experts plugin nodes for TensorRT's AOT implementation (one embedded kernel; "
                        "engines run without Python)")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="the artifact's float precision (default fp32); fp16 halves the weights and runs in fp16 "
                        "with fp32 inputs and outputs (gated against eager fp16, and fp32 unless --quant, within "
                        "1e-2); bf16 artifacts run on GPU providers and are checked here widened to fp32 on their bf16 weights")
    c.add_argument("--quant", choices=["int8", "int4", "int2", "auto"],
                   help="quantize expert weights (ONNX Runtime QMoE, or the TensorRT plugin's packed variant); auto: "
                        "each MoE layer at the cheapest of int2/int4/int8/full precision within --accuracy-budget")
    c.add_argument("--quant-dense", action="store_true",
                   help="also quantize the other Linear layers (ONNX Runtime MatMulNBits; routers stay fp32)")
    c.add_argument("--block-size", type=int, choices=[16, 32, 64, 128],
                   help="quantization block along the input dim (default: one scale per row)")
    c.add_argument("--asymmetric", action="store_true", help="quantize with zero points")
    c.add_argument("--accuracy-level", type=int, choices=[0, 4], default=None,
                   help="QMoE accuracy_level: 4 lets ONNX Runtime use int8 activations for block-wise int4 "
                        "(several times faster, ~1%% more error; verified with a looser tolerance)")
    c.add_argument("--accuracy-budget", type=float,
                   help="fail if quantization moves the logits by more than this relative L2 against the "
                        "full-precision model, or pruning moves them by more than this against the unpruned model "
                        "(on the calibration data); with --prune-experts auto, the budget pruning fills")
    c.add_argument("--calibration", metavar="FILE|random:N",
                   help="calibration data: token ids as .npy [N, S] or .jsonl (one list per line), or random:N; "
                        "measures each MoE layer's routing (report 'routing', moec inspect --routing); with --quant, "
                        "the expert codes come from GPTQ on the tokens each expert receives (with --quant-dense, "
                        "the dense Linears' too, where that lowers the error on held-out calibration data; out of "
                        "core, not the output head's)")
    c.add_argument("--prune-experts", metavar="FRACTION|auto",
                   help="remove this fraction of every MoE layer's experts, lowest ranked first (needs "
                        "--calibration); auto: as many as --accuracy-budget allows, per layer")
    c.add_argument("--prune-by", choices=["contribution", "count", "random"],
                   help="how experts are ranked for pruning (default contribution: routing weight x output norm)")
    c.add_argument("--tolerance", type=float, default=1e-4,
                   help="max relative L2 error of the artifact vs eager PyTorch (default 1e-4, fp32); where ONNX Runtime "
                        "rounds activations (int2 in blocks of 32+, block-wise int8, --accuracy-level 4) the check is "
                        "3e-2, and a larger --tolerance accepts more of that rounding")
    c.add_argument("--keep-failed", action="store_true",
                   help="if verification fails, keep the artifact in OUT.failed for inspection")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=cmd_compile)

    v = sub.add_parser("verify", help="check an artifact against golden outputs (exit 0 only if all pass)")
    v.add_argument("dir", nargs="?", help="artifact directory (model.onnx); not needed with --server")
    v.add_argument("--golden", help="golden directory (default: DIR/golden)")
    v.add_argument("--junit", help="write JUnit XML here")
    where = v.add_mutually_exclusive_group()
    where.add_argument("--server", help="verify through a running Triton server at HOST:PORT (HTTP)")
    v.add_argument("--model-name", help="model name on the server (default: moe_model)")
    v.add_argument("--tolerance", type=float, help="override the golden manifest's relative-L2 tolerance")
    where.add_argument("--segmented", action="store_true",
                       help="run the artifact in ONNX Runtime one decoder layer at a time (the default for an "
                            "out-of-core compile's artifact): one layer's weights in memory")
    where.add_argument("--engine", action="store_true",
                   help="run DIR/model.plan (the TensorRT engine; needs TensorRT and a GPU) instead of model.onnx")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("build-engine", help="build the TensorRT engine for a --target tensorrt artifact")
    b.add_argument("dir")
    b.add_argument("--cache-dir", help="engine and timing cache (default ~/.cache/moec/engines)")
    b.add_argument("--no-imoe", action="store_true",
                   help="keep every MoE layer on moec's experts plugin (default: TensorRT's IMoELayer where the "
                        "GPU (SM100/103/110), TensorRT (>= 10.16) and the layer allow it)")
    b.set_defaults(func=cmd_build_engine)

    pl = sub.add_parser("plan", help="a model's structure from its config.json alone: MoE layers, memory plan, "
                                     "weight bytes per precision, devices needed")
    pl.add_argument("source", help="a Hugging Face config.json, or a directory holding one (no weights needed)")
    pl.add_argument("--task", choices=["text-generation", "logits"],
                    help="the graph to plan (default: text-generation, as compile makes for a causal LM)")
    pl.add_argument("--max-shape", help="max profile for dynamic dims, e.g. batch=1,seq=4096,past=4096")
    pl.add_argument("--device-memory", help="place the model on devices of this size, e.g. 80GiB")
    pl.add_argument("--json", action="store_true", help="the plan as JSON on stdout")
    pl.add_argument("--quiet", action="store_true", help="no progress on stderr")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="show what a compiled artifact is made of")
    i.add_argument("dir")
    i.add_argument("--memory", action="store_true", help="the memory plan as a table")
    i.add_argument("--routing", action="store_true",
                   help="routing statistics per layer and expert (compiled with --calibration) and what was pruned")
    i.add_argument("--quant", action="store_true",
                   help="each MoE layer's precision, bytes and error; for --quant auto the bytes-vs-error curve")
    i.add_argument("--json", action="store_true", help="with --memory, --routing or --quant: as JSON")
    i.add_argument("--plot", help="with --memory: render the arena as a PNG (tensors over time x offset); with "
                                  "--routing: a layers x experts heat map of the contributions; with --quant: bytes "
                                  "against error")
    i.add_argument("--profile", default="max", choices=["min", "opt", "max"])
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("golden", help="golden outputs")
    gsub = g.add_subparsers(dest="golden_command", required=True)
    r = gsub.add_parser("record", help="record fixed-seed inputs and eager outputs for SOURCE")
    r.add_argument("source", nargs="?", default=None)
    r.add_argument("--out", required=True)
    r.add_argument("--force", action="store_true")
    r.add_argument("--seq-len", type=int, default=13, help="sequence length of the second probe")
    r.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int4", "int2", "auto"],
                   help="precision of the artifacts this golden checks (sets the default tolerance; auto, for "
                        "--quant auto artifacts, takes --tolerance)")
    r.add_argument("--tolerance", type=float, default=None,
                   help="relative L2 the artifact's outputs may differ by (default: the precision's)")
    r.set_defaults(func=cmd_golden_record)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify" and not args.dir and not args.server:
        parser.error("verify needs DIR or --server")
    if args.command == "inspect" and sum(map(bool, (args.memory, args.routing, args.quant))) > 1:
        parser.error("inspect: give --memory or --routing or --quant, one of them")
    if args.command == "verify" and args.server and not args.golden and not args.dir:
        parser.error("verify --server needs --golden (or DIR, whose golden/ is used)")
    previous = _terminate_as_interrupt()
    try:
        return args.func(args)
    except MoecError as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"moec: {'terminated' if terminated else 'interrupted'}; nothing was written", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # a bug of ours, not the user's input: its own exit code and the traceback kept
        path = _save_traceback(argv)
        print(f"moec: internal error: {type(exc).__name__}: {str(exc)[:300]}. This is a bug in moec, not in your "
              f"input; nothing was written. The traceback is in {path}; please attach it to a report.",
              file=sys.stderr)
        return INTERNAL_ERROR
    finally:
        if previous is not False:  # None: the previous handler was not Python's; the default stands for it
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


INTERNAL_ERROR = 70  # EX_SOFTWARE


def _save_traceback(argv) -> str:
    """Write the current exception's traceback (and the command line) to a file; returns its path."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="moec-internal-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("moec " + " ".join(sys.argv[1:] if argv is None else list(argv)) + "\n\n")
            traceback.print_exc(file=f)
        return path
    except OSError:  # nowhere to write it: show it instead
        traceback.print_exc()
        return "the output above (no writable temporary directory)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup runs (the temporary directory goes)."""


def _terminate_as_interrupt():
    """Make SIGTERM unwind like Ctrl-C (main thread only); returns the handler to restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False

    def raise_terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, raise_terminated)


if __name__ == "__main__":
    sys.exit(main())

"""`moec` command line: compile, verify, inspect, golden record."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from moec.errors import MoecError


def _progress(quiet: bool):
    start = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def cmd_compile(args: argparse.Namespace) -> int:
    from moec.pipeline import CompileOptions, compile

    name = args.model_name or "moe_model"
    out = args.out or os.path.join("moec-out", "mixtral-demo" if args.source is None else name)
    extra = {}
    for key in ("quant", "block_size", "asymmetric", "quant_dense", "accuracy_budget", "device_memory"):
        if getattr(args, key, None) not in (None, False):
            extra[key] = getattr(args, key)
    opts = CompileOptions(
        out=out, target=args.target, force=args.force, validate=not args.no_validate,
        fuse=not args.no_fusion, require_fusion=args.require_fusion, disabled_passes=args.no_pass or (),
        triton_repo=args.triton_repo, model_name=name, model_version=args.model_version,
        max_batch_size=args.max_batch_size, instances=args.instances, log=_progress(args.quiet), extra=extra,
        keep_failed=args.keep_failed, tolerance=args.tolerance,
    )
    result = compile(source=args.source, options=opts)
    r = result.report
    layers = r["moe_layers"]
    worst = max(r["numerics"]["inputs"], key=lambda x: x["rel_l2"])
    print(f"wrote {result.out_dir}/model.onnx  (report: {result.out_dir}/report.json)")
    print(f"MoE layers: {layers['fused']} fused, {layers['unfused']} unfused" +
          (f" — {layers['note']}" if layers.get("note") else ""))
    for l in layers["layers"]:
        if not l["fused"]:
            print(f"  warning: {l['path']} left unfused: {l.get('reason', '')}")
        elif l.get("lowering_note"):
            print(f"  note: {l['path']} fused, lowered to dense ops: {l['lowering_note']}")
    print(f"numerics vs eager PyTorch: worst relative L2 {worst['rel_l2']:.2e}, max abs {worst['max_abs']:.2e} "
          f"(tolerance {r['numerics']['tolerance_rel_l2']:g}) — {'PASS' if r['numerics']['passed'] else 'FAIL'}")
    if result.triton_model_dir:
        print(f"Triton model: {result.triton_model_dir}")
    trt = r.get("tensorrt")
    if trt:
        print(f"TensorRT plugin: {trt['plugin']} (definitions in {result.out_dir}/plugins.json)")
        engine = trt["engine"]
        if not engine["built"]:
            print(f"TensorRT engine: skipped — {engine['reason']}; to build it: {engine['how_to_build']}")
    for line in r.get("summary_lines", []):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moec", description="Compile Mixture-of-Experts models to verified "
                                "ONNX / TensorRT / Triton artifacts.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model (default: the built-in demo MoE)")
    c.add_argument("source", nargs="?", default=None,
                   help="package.module:factory | file.pt2 | Hugging Face model dir (default: built-in demo)")
    c.add_argument("--out", help="output directory (default: moec-out/<name>)")
    c.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    c.add_argument("--force", action="store_true", help="replace an existing output dir / model version")
    c.add_argument("--triton-repo", help="also write a Triton model repository entry here")
    c.add_argument("--model-name", help="Triton model name (default: moe_model)")
    c.add_argument("--model-version", type=int, default=1)
    c.add_argument("--max-batch-size", type=int, default=None,
                   help="Triton max_batch_size (default 8 when the model has a dynamic batch dim, else 0)")
    c.add_argument("--instances", type=int, default=1, help="Triton instance count")
    c.add_argument("--no-validate", action="store_true", help="skip per-pass translation validation")
    c.add_argument("--no-fusion", action="store_true", help="compile without MoE fusion (reference export)")
    c.add_argument("--require-fusion", action="store_true", help="fail if any MoE layer stays unfused")
    c.add_argument("--no-pass", action="append", help="disable a pass by name (repeatable)")
    c.add_argument("--tolerance", type=float, default=1e-4,
                   help="max relative L2 error of the artifact vs eager PyTorch (default 1e-4, fp32)")
    c.add_argument("--keep-failed", action="store_true",
                   help="if verification fails, keep the artifact in OUT.failed for inspection")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=cmd_compile)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoecError as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("moec: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

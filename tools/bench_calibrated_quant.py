"""Benchmark: calibrated (GPTQ) vs round-to-nearest expert quantization, error against fp32, side by side.

How much GPTQ can give depends on how correlated a layer's inputs are, and seeded Gaussian weights make them
nearly isotropic. So every model runs at several weight spectra (`--spectrum`, moec.demo.shape_spectrum_:
each matrix's singular values falling as i^-alpha; 0 is the seeded Gaussian model as it is, 1 makes a few
directions dominate, as in trained models' hidden states).

- Qwen3-MoE, DeepSeek-V3 and Mixtral (transformers classes, tiny configs widened to 128 so that blocks of 32 and
  128 divide them, random weights), each at int4 block 32, int4 block 128 and int2 per row: `moec compile --task
  logits --quant ...` without and with `--calibration` (default random:512, 4096 tokens), and the relative L2 of
  the logits of the dequantized model against fp32 on the verification inputs (the report's
  quantization.logits_vs_fp32; the artifact equals the dequantized model, tested), the mean of the MoE layers'
  own error (quantization.layers[].rel_l2_vs_fp32), the ratios calibrated / round-to-nearest, and what GPTQ
  chose per layer; and the same logits' error over 2048 held-out tokens (8 batches of 8 random sequences of 32
  tokens, seeds neither the calibration nor the verification draws), the artifact run by ONNX Runtime against
  the fp32 eager model, as one relative L2: the report's figure is the worse of 2 verification inputs (29
  tokens), where one flipped routing decision moves it. `--specs` picks other precisions and block sizes
  (int2:16, int2:32 ...), `:asym` after one quantizes with zero points (`--asymmetric`; int2:16:asym). Where
  ONNX Runtime rounds activations (int2 in blocks of 32+) the artifact's own distance from the dequantized
  reference is recorded too (`artifact_vs_reference`, nearest and calibrated); it does not stop the run.
- `--layer`: the Qwen3-30B-A3B-shaped layer of tools/bench_quant.py (H=2048, I=768, E=64, k=8), its matrices
  shaped by the same spectrum and its inputs drawn with the same spectrum (random rotation), calibrated on
  8192 tokens and measured on 512 others, in PyTorch on the dequantized weights (what the artifact computes).

    OMP_WAIT_POLICY=passive .venv/bin/python tools/bench_calibrated_quant.py [--families qwen3_moe mixtral]
        [--spectrum 0 0.5 1] [--specs int4:32 int2:16 int2:row int2:16:asym] [--layer] [--json FILE]
    .venv/bin/python tools/bench_calibrated_quant.py --render RUN.json [RUN.json ...] [--json MERGED.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WIDE = dict(hidden_size=128, head_dim=32, intermediate_size=256)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=128),
    "deepseek_v3": dict(moe_intermediate_size=128, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32),
    "mixtral": dict(intermediate_size=128),
}
SPECS = [("int4", 32, False), ("int4", 128, False), ("int2", None, False)]  # (precision, block or None: per row,
# asymmetric)


def parse_spec(text: str) -> tuple[str, "int | None", bool]:
    """--specs' PRECISION:BLOCK[:asym] (int4:32, int2:16, int2:row, int2:16:asym)."""
    parts = text.split(":")
    quant, block, rest = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    if quant not in ("int4", "int2") or not (block == "row" or block.isdigit()) or rest not in ([], ["asym"]):
        raise argparse.ArgumentTypeError(f"{text}: expected int4|int2:BLOCK or int4|int2:row, optionally followed "
                                         "by :asym (e.g. int2:16, int2:16:asym)")
    return quant, None if block == "row" else int(block), rest == ["asym"]


def quant_spec(quant: str, block, asymmetric: bool):
    """A --specs entry as moec.quant's QuantSpec."""
    from moec.quant import QuantSpec

    return QuantSpec({"int4": 4, "int2": 2}[quant], block, symmetric=not asymmetric)
LAYER_CALIBRATION, LAYER_TEST = 8192, 512  # tokens


HELD_OUT = (8, 8, 32)  # batches of (sequences, tokens): 2048 tokens no compile saw, for held_out_rel_l2


def run(family: str, quant: str, block, asymmetric: bool, calibration, spectrum: float) -> dict:
    from moec.pipeline import CompileOptions, compile
    from moec.sources import causal_lm_source
    from moec.zoo import build_hf_model

    def source():  # seeded: the same weights each time (the compile's passes rewrite the module they are given)
        return causal_lm_source(build_hf_model(family, spectrum=spectrum, **{**WIDE, **FAMILIES[family]}), family)

    src = source()
    extra = {"quant": quant, "block_size": block, "asymmetric": asymmetric, "task": "logits"}
    if calibration:
        extra["calibration"] = calibration
    with tempfile.TemporaryDirectory() as d:  # what is measured is the dequantized model; ONNX Runtime's rounding of
        # activations (int2 in blocks of 32+) is accepted whatever it is, and reported beside it
        out = os.path.join(d, "a")
        report = compile(src.module, src.example_args, src.dynamic_shapes,
                         options=CompileOptions(out=out, extra=extra, tolerance=10.0)).report
        held_out = held_out_error(source(), os.path.join(out, "model.onnx"))
    r = report["quantization"]
    layers = [l["rel_l2_vs_fp32"] for l in r["layers"] if l.get("rel_l2_vs_fp32") is not None]
    vs_reference = max(float(i["rel_l2"]) for i in report["numerics"]["vs_dequantized_reference"]["inputs"])
    return {"rel_l2": r["logits_vs_fp32"]["rel_l2"], "layer_rel_l2": sum(layers) / max(len(layers), 1),
            "held_out_rel_l2": held_out,
            "methods": [l.get("method", "") for l in r["layers"]], "artifact_vs_reference": vs_reference}


def held_out_error(src, model_path: str) -> float:
    """The artifact's logits against the fp32 eager model's (`src`, a fresh copy) on HELD_OUT's random token
    sequences (seeds no compile draws from), as one relative L2 over all of them: the verification inputs are 2
    sequences (29 tokens) and the report's figure is the worse of the two, so a routing decision flipped on one
    token moves it; over 2048 tokens it is the error's typical size. It is the artifact's own: where ONNX
    Runtime rounds activations (int2 in blocks of 32+) that rounding is in it."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    diff = ref = 0.0
    batches, sequences, tokens = HELD_OUT
    for batch in range(batches):
        inputs = src.make_inputs(seed=5000 + batch, seq_len=tokens, batch=sequences)
        with torch.no_grad():
            want = src.module(*inputs)
        want = (want[0] if isinstance(want, (tuple, list)) else want).float().numpy()
        got = session.run(None, {arg.name: a.numpy() for arg, a in zip(session.get_inputs(), inputs)})[0]
        diff += float(np.square(got.astype(np.float64) - want).sum())
        ref += float(np.square(want.astype(np.float64)).sum())
    return (diff / ref) ** 0.5


def correlated_inputs(tokens: int, hidden: int, spectrum: float, seed: int, rotation):
    """[tokens, hidden] Gaussian inputs whose covariance has eigenvalues i^-2*spectrum in `rotation`'s basis,
    scaled to unit mean square."""
    import torch

    z = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    power = torch.arange(1, hidden + 1, dtype=torch.float64) ** -spectrum
    x = (z * power) @ rotation
    return (x / x.square().mean().sqrt()).float()


def layer_rows(spectrum: float, specs: list, log) -> list[dict]:
    """Round-to-nearest vs GPTQ on the benchmark layer at each of SPECS (one spectrum)."""
    import torch
    from torch import nn

    from bench_fusion import H, Flat, build_block
    from moec.demo import shape_spectrum_
    from moec.gptq import quantize_layer
    from moec.passes.base import PassContext, PassManager
    from moec.passes.fuse_moe import FuseMoE
    from moec.passes.layers import iter_fused
    from moec.quant import dequantize, quantize

    model = Flat(build_block()[0])
    shape_spectrum_(model, spectrum)
    model, _ = PassManager([FuseMoE()], validate=False).run(model, PassContext(probes=[(torch.randn(8, H),)],
                                                                               options={}))
    path, fused = next(iter_fused(model))
    rotation = torch.linalg.qr(torch.randn(H, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    x_cal = correlated_inputs(LAYER_CALIBRATION, H, spectrum, 1, rotation)
    x_test = correlated_inputs(LAYER_TEST, H, spectrum, 2, rotation)
    full = fused.w_gate_up, fused.w_down
    with torch.no_grad():
        ref = model(x_test)

    def error(q_gate_up, q_down) -> float:
        fused.w_gate_up = nn.Parameter(dequantize(q_gate_up), requires_grad=False)
        fused.w_down = nn.Parameter(dequantize(q_down), requires_grad=False)
        with torch.no_grad():
            got = model(x_test)
        fused.w_gate_up, fused.w_down = full
        return float((got - ref).norm() / ref.norm())

    rows = []
    for quant, block, asymmetric in specs:
        spec = quant_spec(quant, block, asymmetric)
        log(f"layer spectrum {spectrum} {quant} block {block} asymmetric {asymmetric}: GPTQ on 64 experts ...")
        rtn = error(quantize(full[0], spec, "w_gate_up"), quantize(full[1], spec, "w_down"))
        q_gate_up, q_down, choice = quantize_layer(fused, x_cal, spec, path)
        rows.append({"family": "layer", "spectrum": spectrum, "quant": quant, "block": block,
                     "asymmetric": asymmetric, "rtn": rtn,
                     "calibrated": error(q_gate_up, q_down), "chosen": [choice.describe()]})
        rows[-1]["ratio"] = rows[-1]["calibrated"] / rtn
        log(json.dumps(rows[-1]))
    return rows


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--spectrum", nargs="+", type=float, default=[0.0, 0.5, 1.0],
                    help="singular-value exponents alpha to run every model at (0: the seeded Gaussian weights)")
    ap.add_argument("--calibration", default="random:512")
    ap.add_argument("--layer", action="store_true", help="also the Qwen3-30B-A3B-shaped benchmark layer")
    ap.add_argument("--specs", nargs="+", type=parse_spec, default=SPECS, metavar="PRECISION:BLOCK[:asym]",
                    help="what to quantize at (default: int4:32 int4:128 int2:row; :asym with zero points); int2 "
                         "rows are compared with symmetric round-to-nearest int4 b32 when it is among them")
    ap.add_argument("--json")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="run nothing: print the table of these runs' --json files together (and write them as one "
                         "to --json)")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render, args.json)
    torch.set_num_threads(2)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for spectrum in args.spectrum:
        for family in args.families:
            for quant, block, asymmetric in args.specs:
                rtn = run(family, quant, block, asymmetric, None, spectrum)
                cal = run(family, quant, block, asymmetric, args.calibration, spectrum)
                rows.append({"family": family, "spectrum": spectrum, "quant": quant, "block": block,
                             "asymmetric": asymmetric,
                             "rtn": rtn["rel_l2"], "calibrated": cal["rel_l2"], "ratio": cal["rel_l2"] / rtn["rel_l2"],
                             "held_out_rtn": rtn["held_out_rel_l2"], "held_out_calibrated": cal["held_out_rel_l2"],
                             "layer_rtn": rtn["layer_rel_l2"], "layer_calibrated": cal["layer_rel_l2"],
                             "chosen": cal["methods"], "artifact_vs_reference": [rtn["artifact_vs_reference"],
                                                                                 cal["artifact_vs_reference"]]})
                log(json.dumps(rows[-1]))
        if args.layer:
            rows += layer_rows(spectrum, args.specs, log)
    print_table(rows, args.calibration)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calibration": args.calibration, "held_out_tokens": HELD_OUT[0] * HELD_OUT[1] * HELD_OUT[2],
                       "rows": rows}, f, indent=1)
    return 0


def isotropic_floor(specs: list) -> list[str]:
    """What calibration can give where the inputs are independent and of equal size (H = I, the limit alpha 0
    approaches): each weight's error is then its own, round-to-nearest is the best code for a given scale, and
    only the scales can improve. Gaussian weights [256, 1024] through gptq_quantize with H = I (its clipped
    ranges and refitted scales), against round-to-nearest: the least error rounding onto QMoE's grid of that
    precision reaches there (a search of 400 clip ratios, each refitted, gave the same to 3 digits), as a
    fraction of round-to-nearest's (and, for int2, of int4 block 32's)."""
    import torch

    from moec.gptq import gptq_quantize
    from moec.quant import QuantSpec, dequantize, quantize

    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(1024, dtype=torch.float64)

    def err(q) -> float:
        return float((dequantize(q)[0] - w).norm() / w.norm())

    int4_b32 = err(quantize(w.unsqueeze(0), QuantSpec(4, 32), "w"))
    lines = []
    for quant, block, asymmetric in specs:
        spec = quant_spec(quant, block, asymmetric)
        best, nearest = err(gptq_quantize(w, eye, spec, "w")), err(quantize(w.unsqueeze(0), spec, "w"))
        lines.append(f"{spec.name}: {best / nearest:.2f}x round-to-nearest"
                     + (f", {best / int4_b32:.2f}x round-to-nearest int4 block 32" if quant == "int2" else ""))
    return lines


def render(paths: list[str], out) -> int:
    """The table of several runs' json files, rows ordered by spectrum, then family (the layer last), then as
    each run listed them; a spec run twice keeps its last run's row."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    if len({r["calibration"] for r in runs}) > 1:
        raise SystemExit(f"{paths}: runs with different calibration data ({sorted({r['calibration'] for r in runs})})")
    rows = {}
    for run_ in runs:
        for r in run_["rows"]:
            rows[(r["family"], r["spectrum"], r["quant"], r["block"], r.get("asymmetric", False))] = r
    order = list(FAMILIES) + ["layer"]
    ordered = sorted(rows.values(), key=lambda r: (r["spectrum"], order.index(r["family"])))
    print_table(ordered, runs[0]["calibration"])
    if out:
        with open(out, "w") as f:
            json.dump({**{k: v for k, v in runs[0].items() if k != "rows"}, "rows": ordered}, f, indent=1)
    return 0


def print_table(rows: list[dict], calibration: str) -> None:
    print(f"calibration {calibration} (the layer: {LAYER_CALIBRATION} tokens); error = relative L2 vs fp32 of "
          "the logits (the layer: its output): the worse of the 2 verification inputs (29 tokens), and over "
          f"{HELD_OUT[0] * HELD_OUT[1] * HELD_OUT[2]} held-out tokens (the artifact's own)")
    print(f"{'family':<12} {'alpha':>5} {'quant':<9} {'nearest':>8} {'calibrated':>10} {'ratio':>6} {'int2/b32':>8}   "
          f"{'held-out: nearest':>17} {'calibrated':>10} {'ratio':>6} {'int2/b32':>8}")
    for r in rows:
        spec = f"{r['quant']} " + (f"b{r['block']}" if r["block"] else "row") + ("a" if r.get("asymmetric") else "")
        int2_vs = held_vs = ""
        b32 = next((o for o in rows if o["family"] == r["family"] and o["spectrum"] == r["spectrum"]
                    and o["quant"] == "int4" and o["block"] == 32 and not o.get("asymmetric")), None)
        if r["quant"] == "int2" and b32 is not None:  # the target: calibrated int2 <= round-to-nearest int4
            int2_vs = f"{r['calibrated'] / b32['rtn']:.2f}"
            if "held_out_rtn" in b32:
                held_vs = f"{r['held_out_calibrated'] / b32['held_out_rtn']:.2f}"
        held = (f"{r['held_out_rtn']:17.4f} {r['held_out_calibrated']:10.4f} "
                f"{r['held_out_calibrated'] / r['held_out_rtn']:6.2f}" if "held_out_rtn" in r else "")
        print(f"{r['family']:<12} {r['spectrum']:>5.2f} {spec:<9} {r['rtn']:8.4f} {r['calibrated']:10.4f} "
              f"{r['ratio']:6.2f} {int2_vs:>8}   {held} {held_vs:>8}")
    specs = sorted({(r["quant"], r["block"], r.get("asymmetric", False)) for r in rows},
                   key=lambda t: (t[0] == "int2", t[2], t[1] or 1 << 20))
    print("independent inputs (H = I), Gaussian weights: the least error on the grid, " + "; ".join(
        isotropic_floor(specs)))


if __name__ == "__main__":
    sys.exit(main())

"""Survey: every MoE model type in the installed transformers, built tiny, fused and compiled.

The families are enumerated from transformers' own registry (causal-LM model types whose config
has an experts setting). Each is built from its default config shrunk to test size (the keys below,
where the config has them) with seeded random weights, in a subprocess of its own (a family that
crashes or hangs costs only itself), then:
  - fuse: moec's fuse_moe with translation validation — MoE layers found, fused, and why not;
  - compile (unless --fuse-only): the whole `input_ids -> logits` artifact, verified in ONNX Runtime
    at two sequence lengths — the worst logits relative L2, or the stage and error that stopped it.

    OMP_WAIT_POLICY=passive .venv/bin/python tools/survey_families.py [--families a b ...] [--fuse-only]
        [--jobs 2] [--timeout 300] [--json out.json] [--markdown out.md]
    ... --families a b --update tools/results/survey_families.json   # rerun a few, keep the other rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moec.miniature import WIDTHS, keep_each_kind, width_overrides  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
               "moe_topk", "moe_k")

# widths from moec.miniature (the plan's miniatures); the survey also shrinks experts, top-k and layers
TINY = {
    **WIDTHS, "num_hidden_layers": 2, "num_layers": 2, "num_experts": 8, "num_local_experts": 8,
    "n_routed_experts": 8, "moe_num_experts": 8, "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_start_index": 0,
    "decoder_sparse_step": 1, "mlp_only_layers": [],
}

# what a family's own config insists on, past the generic shrink (its validator or its modeling code)
FAMILY_CONFIG = {
    "dots1": {"n_shared_experts": 1},
    "gemma4_text": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32},  # off by default  # defaults to None, which its MoE block multiplies by
    "kolibri1_1": {"index_num_heads": 1},  # at most the query heads per key head (4 // 2 here)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},  # no default layout
    "zaya": {"num_experts_per_tok": 1},  # top-1 only
}



def moe_families() -> list[str]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        name = CONFIG_MAPPING_NAMES.get(model_type)
        if not name or not hasattr(transformers, name):
            continue
        try:
            keys = getattr(transformers, name)().to_dict()
        except Exception:
            continue
        if any(any(k in key for k in EXPERT_KEYS) for key in keys):
            out.append(model_type)
    return sorted(out)


def tiny_config(model_type: str):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    cls = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
    defaults = cls().to_dict()
    # keys under the family's own names too (BailingHybrid stores n_group as num_expert_group)
    overrides = width_overrides(defaults, TINY, aliases=dict(getattr(cls, "attribute_map", {}) or {}),
                                include_none=True)
    if isinstance(defaults.get("layer_types"), list):  # per-layer lists must match the layer count
        overrides["layer_types"] = defaults["layer_types"][: overrides.get("num_hidden_layers", 2)]
    for key in ("mlp_layer_types", "moe_layer_types"):
        if isinstance(defaults.get(key), list):
            overrides[key] = keep_each_kind(defaults[key], overrides.get("num_hidden_layers", 2))
    overrides.update(FAMILY_CONFIG.get(model_type, {}))
    try:
        return cls(**overrides)
    except Exception as exc:  # some configs insist on plain multi-head attention
        if "num_key_value_heads" not in str(exc):
            raise
        return cls(**{**overrides, "num_key_value_heads": overrides.get("num_attention_heads", 4)})


def run_one(model_type: str, fuse_only: bool) -> dict:
    """In this process: build, fuse, compile one family; a dict of what happened."""
    import torch

    from moec.passes.base import PassContext, PassManager
    from moec.passes.fuse_moe import NOT_CALLED, FuseMoE
    from moec.sources import causal_lm_source

    torch.set_num_threads(1)
    row: dict = {"family": model_type}
    t0 = time.perf_counter()
    try:
        model = build(model_type)
    except Exception as exc:
        return {**row, "stage": "build", "error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    src = causal_lm_source(model, f"survey:{model_type}")
    try:
        ctx = PassContext(probes=[src.example_args, src.make_inputs(7, seq_len=5, batch=1)])
        t = time.perf_counter()
        module, records = PassManager([FuseMoE()], validate=True).run(src.module, ctx)
        fuse_s = time.perf_counter() - t
    except Exception as exc:
        return {**row, "stage": "fuse", "error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    details = records[0].details
    # A module shaped like a MoE layer whose forward the model never calls is not one of its layers
    # (JetMoE's attention experts: the attention calls their map/reduce methods); counted apart.
    found = details.get("layers", [])
    layers = [l for l in found if l.get("reason") != NOT_CALLED]
    row.update(layers=len(layers), fused=sum(l["fused"] for l in layers), fuse_seconds=round(fuse_s, 2),
               reasons=sorted({l.get("reason", "") for l in layers if not l["fused"]}),
               never_called=[l["path"] for l in found if l.get("reason") == NOT_CALLED])
    unfused = [l for l in layers if not l["fused"]]
    if unfused:  # the fusion rules tried on the first unfused layer, and why each failed
        row["rules_tried"] = [f"{t['stage']} '{t['rule']}': {t['result']}" + (f" ({t['detail']})" if t["detail"] else "")
                              for t in unfused[0].get("rules", [])]
    if not fuse_only:
        from moec.errors import MoecError
        from moec.pipeline import CompileOptions, compile

        fresh = causal_lm_source(build(model_type), f"survey:{model_type}")  # fusion rewrote the first in place
        with tempfile.TemporaryDirectory() as d:
            try:
                r = compile(fresh.module, fresh.example_args, fresh.dynamic_shapes,
                            options=CompileOptions(out=os.path.join(d, "a"))).report
                rows = r["numerics"]["inputs"]
                row.update(stage="compiled", rel_l2=max(float(x["rel_l2"]) for x in rows),
                           shapes=sorted({x["input"] for x in rows}),
                           lowered=sorted({l.get("lowered_to", "") for l in r["moe_layers"]["layers"] if l["fused"]}))
            except MoecError as exc:
                row.update(stage="compile", exit=exc.exit_code, error=str(exc)[:600])
            except Exception as exc:
                row.update(stage="compile", exit=70, error=f"{type(exc).__name__}: {str(exc)[:600]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def build(model_type: str):
    """The family's causal LM from its tiny config, with seeded random weights (the same each call)."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moec.demo import randomize_

    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(tiny_config(model_type)).eval()
    randomize_(model, 0)
    return model


def survey(families: list[str], fuse_only: bool, jobs: int, timeout: float, log=print) -> list[dict]:
    def one(family: str) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", family] + (["--fuse-only"] if fuse_only else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"family": family, "stage": "timeout", "error": f"more than {timeout:g} s"}
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            return {"family": family, "stage": "crash", "error": f"exit {p.returncode}: {tail[:200]}"}
        row = json.loads(lines[-1])
        log(f"{family}: {verdict(row)}")
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, families))


def verdict(row: dict) -> str:
    if row.get("stage") in ("build", "timeout", "crash", "fuse"):
        return f"not surveyed ({row['stage']}: {row['error']})"
    fused = f"{row['fused']}/{row['layers']} MoE layers fused"
    if row.get("stage") == "compiled":
        ok = row["rel_l2"] <= 1e-4
        return f"{fused}; compiled, logits rel L2 {row['rel_l2']:.1e}" + ("" if ok else " (over 1e-4)")
    if row.get("stage") == "compile":
        return f"{fused}; compile failed (exit {row['exit']}): {row['error']}"
    return fused


def exact(row: dict) -> bool:
    """Fused exactly: every MoE layer found was fused, at least one, and the artifact within 1e-4."""
    return (row.get("layers", 0) > 0 and row.get("fused") == row.get("layers") and row.get("stage") == "compiled"
            and row["rel_l2"] <= 1e-4)


def _cell(text: str, width: int) -> str:
    return " ".join(str(text).split())[:width].replace("|", "/")


def markdown(rows: list[dict]) -> str:
    out = ["| family | MoE layers fused | compiled (logits rel L2, 2 shapes) | lowered to / why not |",
           "|---|---|---|---|"]
    for r in rows:
        if r.get("stage") in ("build", "timeout", "crash", "fuse"):
            out.append(f"| {r['family']} | — | not built ({r['stage']}) | {_cell(r['error'], 120)} |")
            continue
        comp = (f"{r['rel_l2']:.1e}" if r.get("stage") == "compiled" else
                f"exit {r.get('exit')}: {_cell(r.get('error', ''), 100)}" if r.get("stage") == "compile" else "—")
        why = _cell("; ".join(x for x in r.get("reasons", []) if x), 140) or _cell(", ".join(r.get("lowered", [])), 140)
        if r.get("never_called"):
            why += f" ({len(r['never_called'])} MoE-shaped modules never called as layers)"
        out.append(f"| {r['family']} | {r['fused']}/{r['layers']} | {comp} | {why} |")
    return "\n".join(out)


def summarize(rows: list[dict], fuse_only: bool) -> dict:
    built = [r for r in rows if r.get("stage") not in ("build", "timeout", "crash", "fuse")]
    summary = {"families": len(rows), "built": len(built), "with_moe_layers": sum(r.get("layers", 0) > 0 for r in built),
               "all_layers_fused": sum(r.get("layers", 0) > 0 and r["fused"] == r["layers"] for r in built)}
    per_layer = sorted(r["fuse_seconds"] / r["layers"] for r in built if r.get("layers") and "fuse_seconds" in r)
    if per_layer:  # fuse_moe's whole run (recognition, probes, validation) per MoE layer found
        summary.update(recognition_s_per_layer_median=round(per_layer[len(per_layer) // 2], 3),
                       recognition_s_per_layer_max=round(per_layer[-1], 3))
    if not fuse_only:
        summary.update(compiled=sum(r.get("stage") == "compiled" for r in built),
                       fused_exactly=sum(exact(r) for r in rows))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+")
    ap.add_argument("--fuse-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--update", metavar="JSON",
                    help="rerun only --families and replace their rows in this earlier full run's JSON (rewritten)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.fuse_only)))
        return 0
    if args.update and (not args.families or args.fuse_only):
        ap.error("--update reruns the families named by --families, compiled (not --fuse-only)")
    families = args.families or moe_families()
    rows = survey(families, args.fuse_only, args.jobs, args.timeout, log=lambda m: print(m, file=sys.stderr))
    if args.update:
        with open(args.update) as f:
            fresh = {r["family"]: r for r in rows}
            rows = [fresh.pop(r["family"], r) for r in json.load(f)["rows"]] + list(fresh.values())
        args.json = args.json or args.update
    summary = summarize(rows, args.fuse_only)
    print(markdown(rows))
    print("\n" + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in summary.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The compile report's sections, built from typed records (never from pass names)."""

from __future__ import annotations

import platform
from typing import Optional

import numpy as np
import torch

from moec.passes.base import PassRecord, compare_outputs, worst
from moec.passes.conditions import DENSE_QUANTIZED, EXPERTS_PRUNED, EXPERTS_QUANTIZED
from moec.passes.fuse_moe import NOT_CALLED
from moec.passes.outcomes import FoldOutcome, FusionOutcome, LoweringOutcome, PruneOutcome, QuantizationOutcome
from moec.targets.base import rounding_fields

FP32_REL_L2 = 1e-4


def layer_summary(records: list[PassRecord]) -> dict:
    """Every MoE-shaped layer: fused or not (why), and what its target made of it."""
    outcomes = [o for r in records for o in r.layers]
    # a MoE-shaped module the model never calls as a layer (JetMoE's attention experts: the attention calls
    # their methods) is listed apart: nothing of it runs as a layer, so it can't be left unfused
    never = [o.path for o in outcomes if isinstance(o, FusionOutcome) and o.reason == NOT_CALLED]
    layers = [o.to_dict() for o in outcomes if isinstance(o, FusionOutcome) and o.reason != NOT_CALLED]
    fused_paths = {l["path"] for l in layers}
    # experts fused on their own are lowered inside their ExpertsOnly wrapper, one level down
    lowered = {(o.path[: -len(".layer")] if o.path.endswith(".layer") and o.path[: -len(".layer")] in fused_paths
                else o.path): o for o in outcomes if isinstance(o, LoweringOutcome)}
    for l in layers:
        if l["path"] in lowered:
            l["lowered_to"] = lowered[l["path"]].lowered_to
            if lowered[l["path"]].reason:
                l["lowering_note"] = lowered[l["path"]].reason
    summary = {"fused": sum(l["fused"] for l in layers), "unfused": sum(not l["fused"] for l in layers),
               "layers": layers, "note": "" if layers else "no MoE layer found; compiled as a dense model"}
    if never:
        summary["never_called"] = never
    return summary


def folded_qdq(records: list[PassRecord]) -> Optional[dict]:
    """The Q/DQ fold's record, when it folded anything."""
    for r in records:
        folded = [o for o in r.layers if isinstance(o, FoldOutcome)]
        if folded:
            return {"format": r.details["format"], "spec": r.details["spec"], "layers": [o.path for o in folded]}
    return None


def quantization_summary(records: list[PassRecord], extra: dict, rounding, eager: list,
                         dequantized: list, tolerance: float = FP32_REL_L2) -> Optional[dict]:
    """Per-layer and logits error against full precision, sizes, and the accuracy budget check. `rounding`: why
    ONNX Runtime rounds activations on the artifact's path (moec.targets.base.ActivationRounding), or None; then
    the check against the dequantized reference is ACTIVATIONS_ROUNDED_TOLERANCE, or `tolerance` (--tolerance)
    where larger.

    The logits' error is the whole quantized model's (experts and, with --quant-dense, the dense
    layers) against `eager`, the full-precision model it quantized (the pruned one when pruned), on the
    verification inputs."""
    experts = next((r for r in records if EXPERTS_QUANTIZED.name in r.ensures), None)
    if experts is None:
        return None
    dense_rec = next((r for r in records if DENSE_QUANTIZED.name in r.ensures), None)
    from moec.golden import TOLERANCES

    precision = extra["quant"]
    layers = [o.to_dict() for o in experts.layers if isinstance(o, QuantizationOutcome)]
    dense = dense_rec.details if dense_rec is not None else None
    all_layers = layers + (dense["layers"] if dense else [])
    logits = worst(compare_outputs(eager, dequantized)).to_dict() if dequantized else None
    summary = {
        "precision": precision, "spec": experts.details["spec"], "layers": layers,
        "logits_vs_fp32": logits,
        "weight_bytes_fp32": sum(l["weight_bytes_fp32"] for l in all_layers),
        "weight_bytes_quantized": sum(l["weight_bytes_quantized"] for l in all_layers),
        **rounding_fields(rounding),
        # informational: vs_fp32["passed"] in the numerics; --quant auto's own bound is its budget
        "tolerance_vs_fp32": TOLERANCES[precision] if precision in TOLERANCES else extra.get("accuracy_budget"),
        "tolerance_vs_dequantized": rounding.tolerance(tolerance) if rounding is not None else FP32_REL_L2,
    }
    if dense is not None:
        summary["dense"] = dense
    if "auto" in experts.details:  # --quant auto: the precision each layer got, and the curve it was chosen from
        summary["auto"] = experts.details["auto"]
    folded = folded_qdq(records)
    if folded:
        summary["folded_qdq"] = folded
    budget = extra.get("accuracy_budget")
    if budget is not None and logits is not None and not (logits["rel_l2"] <= budget):
        if "auto" in summary:
            raise auto_over_budget(budget, summary["auto"]["measured_rel_l2"], logits["rel_l2"])
        raise over_budget(budget, summary["spec"], logits["rel_l2"], all_layers)
    return summary


def auto_over_budget(budget: float, measured: float, rel_l2: float):
    """--accuracy-budget exceeded by the artifact though --quant auto's own measurement was within it."""
    from moec.errors import AccuracyBudgetError

    return AccuracyBudgetError(
        f"--accuracy-budget {budget:g}: the precisions --quant auto chose (relative L2 {measured:.3g} on the inputs "
        f"it measured) move the verification inputs' logits by {rel_l2:.3g}; give a budget above the fp32 compile's "
        "own error or loosen it. Nothing was written.")


def over_budget(budget: float, spec: str, rel_l2: float, layers: list[dict]):
    """--accuracy-budget exceeded by a fixed --quant: the error to raise, naming the worst layers."""
    from moec.errors import AccuracyBudgetError

    worst_layers = sorted(layers, key=lambda l: -l.get("rel_l2_vs_fp32", 0))[:3]
    names = ", ".join(f"{l['path']} ({l.get('rel_l2_vs_fp32', float('nan')):.3g})" for l in worst_layers)
    return AccuracyBudgetError(
        f"--accuracy-budget {budget:g}: {spec} quantization moves the logits by relative L2 {rel_l2:.3g} against "
        f"the full-precision model it quantized. Worst layers: {names}. Try int8, a smaller --block-size, or "
        "--asymmetric; nothing was written.")


def pruning_summary(records: list[PassRecord]) -> Optional[dict]:
    """Which experts each layer lost, the bytes, and the pruned model's distance from the unpruned one."""
    rec = next((r for r in records if EXPERTS_PRUNED.name in r.ensures), None)
    if rec is None:
        return None
    layers = [o.to_dict() for o in rec.layers if isinstance(o, PruneOutcome)]
    summary = {k: v for k, v in rec.details.items() if k != "layers"}
    summary.update(pruning_totals(layers))
    return summary


def pruning_totals(layers: list[dict]) -> dict:
    """The pruning entry's layers (PruneOutcome.to_dict) and their totals."""
    return {"layers": layers, **{k: sum(l[k] for l in layers) for k in
                                 ("experts_before", "experts_after", "weight_bytes_before", "weight_bytes_after")}}


def versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def moec_version() -> str:
    try:
        from importlib.metadata import version

        return version("moec")
    except Exception:
        return "0.0.0+local"

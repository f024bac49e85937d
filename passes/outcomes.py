"""What a pass did to each layer, as typed records: the report reads these, not pass names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moec.moe_layer import LayerSpec
from moec.quant import QuantSpec


@dataclass(frozen=True)
class LayerOutcome:
    path: str

    def to_dict(self) -> dict:
        return {"path": self.path}


@dataclass(frozen=True)
class RuleTrial:
    """One fusion rule tried on a layer (passes/fusion_rules.py): what it was, and what came of it."""

    stage: str  # "router" | "experts" | "routing" | "joint" (experts and routing checked together)
    rule: str
    result: str  # "matched" | "failed" | "not applicable"
    detail: str = ""

    def to_dict(self) -> dict:
        return {"stage": self.stage, "rule": self.rule, "result": self.result, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.stage} rule '{self.rule}' {self.result}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class FusionOutcome(LayerOutcome):
    """A MoE-shaped layer: fused into a FusedMoE (with its spec), or left as written (with why), and the
    fusion rules tried on it in order."""

    fused: bool = False
    reason: str = ""
    spec: Optional[LayerSpec] = None
    candidates_tried: int = 0  # readings checked against the layer's outputs (rules expand to one or more each)
    closest_error: Optional[float] = None
    rules: tuple[RuleTrial, ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "fused": self.fused, "candidates_tried": self.candidates_tried}
        if self.reason:
            d["reason"] = self.reason
        if self.spec is not None:
            d["spec"] = self.spec.to_dict()
        if self.closest_error is not None:
            d["closest_error"] = self.closest_error
        if self.rules:
            d["rules"] = [t.to_dict() for t in self.rules]
        return d


@dataclass(frozen=True)
class LoweringOutcome(LayerOutcome):
    """A fused layer in its target's form: what it became, and why when it fell back."""

    lowered_to: str = ""
    reason: str = ""

    def to_dict(self) -> dict:
        d = {"path": self.path, "lowered_to": self.lowered_to}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True)
class QuantizationOutcome(LayerOutcome):
    """A layer's weights quantized: the spec, the bytes, and the layer's error against full precision."""

    quantization: str = ""
    weight_bytes_fp32: int = 0
    weight_bytes_quantized: int = 0
    rel_l2_vs_fp32: Optional[float] = None
    cosine_vs_fp32: Optional[float] = None
    experts: bool = True  # False: a dense Linear (--quant-dense)
    method: str = ""  # how the codes were chosen: round-to-nearest, gptq, the checkpoint's

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "quantization": self.quantization,
                             "weight_bytes_fp32": self.weight_bytes_fp32,
                             "weight_bytes_quantized": self.weight_bytes_quantized}
        if self.method:
            d["method"] = self.method
        if self.rel_l2_vs_fp32 is not None:
            d.update(rel_l2_vs_fp32=self.rel_l2_vs_fp32, cosine_vs_fp32=self.cosine_vs_fp32)
        return d


@dataclass(frozen=True)
class FoldOutcome(LayerOutcome):
    """A Linear whose weight Q/DQ pair was folded: its codes go to the artifact unchanged."""

    spec: Optional[QuantSpec] = None

    def to_dict(self) -> dict:
        return {"path": self.path, "quantization": self.spec.name if self.spec else None}


@dataclass(frozen=True)
class PruneOutcome(LayerOutcome):
    """A fused layer's experts after pruning: which were removed (by original index) and the bytes saved;
    `reason` says why a layer was left whole."""

    experts_before: int = 0
    removed: tuple[int, ...] = ()
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    removed_share: float = 0.0  # of the layer's total ranking score (contribution, count ...)
    reason: str = ""

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "experts_before": self.experts_before,
                             "experts_after": self.experts_before - len(self.removed), "removed": list(self.removed),
                             "weight_bytes_before": self.weight_bytes_before,
                             "weight_bytes_after": self.weight_bytes_after,
                             "removed_share": round(self.removed_share, 6)}
        if self.reason:
            d["reason"] = self.reason
        return d

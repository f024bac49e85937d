"""What a compile target is: one object that owns everything target-specific in a compile.

The pipeline never compares target names; it asks the target (moec/targets/<name>/__init__.py):
  - `check_options`: refuse options the target can't honour, before any work;
  - `lowering_passes`: the passes after fuse_moe / quantize_experts that put every FusedMoE in the
    target's form (they must ensure `experts_lowered`);
  - `translations`: torch op -> ONNX translation for the target's ops (their schemas registered);
  - `graph_passes`: rewrites of the exported ONNX graph into the target's fused ops (after
    simplify_graph and rewrite_rsqrt; each one `--no-pass` can name);
  - `evaluable_model` / `write_evaluable`: a copy of the artifact ONNX Runtime can run, for
    verification and memory planning (the artifact itself, or one with the target's custom nodes
    expanded to reference subgraphs; `describe_evaluation` says so in the report);
  - `expert_nodes`: how its fused-experts nodes look in ONNX, for the memory planner's workspace;
  - `write_extras`: files written beside model.onnx, and their report entry (`summary`: the CLI's lines);
  - `triton_model`: what it puts in a Triton model repository;
  - `activation_rounding`: why its runtime rounds activations on the artifact's path, and the exact path
    instead (None: it computes with the weights as the dequantized reference does); `quantizes_activations`,
    whether it does (a looser exact check).
Subclasses override what differs; the defaults describe a target whose artifact ONNX Runtime runs
as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

from moec.errors import MoecError


# An artifact whose runtime rounds activations is checked against the dequantized reference within this (the
# rounding is the runtime's: measured 0.3-3.3e-2 relative L2); --tolerance may only loosen it.
ACTIVATIONS_ROUNDED_TOLERANCE = 3e-2


@dataclass(frozen=True)
class ActivationRounding:
    """Why a runtime rounds activations on an artifact's path (`why`), and the exact path to ask for instead."""

    why: str
    instead: str

    def to_dict(self) -> dict:
        return {"why": self.why, "exact_instead": self.instead}

    def tolerance(self, asked: float) -> float:
        """The check against the dequantized reference on this path: ACTIVATIONS_ROUNDED_TOLERANCE, or `asked`
        (--tolerance) where larger: it may only loosen it."""
        return max(ACTIVATIONS_ROUNDED_TOLERANCE, asked)

    def hint(self, measured: float) -> str:
        """What to do about an artifact that failed its check against the dequantized reference."""
        return (f" ONNX Runtime rounds the activations here ({self.why}), which the dequantized reference does not "
                f"model; for an exact artifact use {self.instead}, or accept its rounding with --tolerance "
                f"{_above(measured)}.")


def rounding_fields(rounding: Optional[ActivationRounding]) -> dict:
    """The report's quantization fields saying whether ONNX Runtime rounds activations on the artifact's path, and
    why (in memory and out of core alike)."""
    return {"onnxruntime_quantizes_activations": rounding is not None,
            **({"activations_rounded": rounding.to_dict()} if rounding is not None else {})}


def rounding_hint(quant: Optional[dict], measured: float) -> str:
    """ActivationRounding.hint for a report's quantization entry: "" where ONNX Runtime computes exactly."""
    d = (quant or {}).get("activations_rounded")
    return "" if d is None else ActivationRounding(d["why"], d["exact_instead"]).hint(measured)


def _above(x: float) -> str:
    """A round tolerance above a measured error (0.0327 -> 0.04)."""
    import math

    step = 10 ** math.floor(math.log10(x)) if x > 0 else 1e-4
    return f"{math.floor(x / step + 1) * step:.2g}"


@dataclass(frozen=True)
class ExpertNode:
    """A target's fused-experts node in ONNX: per routed token-slot its kernel keeps one fc1 output row
    and one fc2 output row as scratch (the memory planner's workspace)."""

    domain: str
    op_type: str
    fc1_input: int  # index of the [E, rows, H] first-projection weight input
    top_k_attribute: str  # the node attribute holding k


@dataclass(frozen=True)
class TritonModel:
    """What a compile puts in a Triton model repository, and why."""

    model_path: str
    files: list
    platform: str = "onnxruntime_onnx"  # | tensorrt_plan
    kind: str = "KIND_CPU"
    extra: str = ""  # config.pbtxt additions
    note: str = ""  # one line for the user and the report ("" : nothing to say)
    max_batch_cap: Optional[int] = None  # a tensorrt_plan can't batch past its profile's first dim


@dataclass(frozen=True)
class GraphPass:
    """A target's rewrite of the exported ONNX graph (an onnx_ir model, in place)."""

    name: str  # for --no-pass and the report's graph entry
    run: Callable[[Any], int]  # how many matches it rewrote
    what: str  # what one match becomes, for the log line


@dataclass
class ArtifactContext:
    """The artifact being built, as a target's artifact hooks see it."""

    workdir: str  # the temporary directory that becomes OUT
    model_path: str
    files: list[str]
    report: dict
    options: Any  # moec.pipeline.CompileOptions
    evaluable_files: list[str] = field(default_factory=list)  # from `evaluable`, model first; [] = the artifact
    log: Callable[[str], None] = lambda msg: None


class Target:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Options only this target takes (CompileOptions.extra keys) -> what they do, for the refusal elsewhere.
    own_options: ClassVar[Mapping[str, str]] = {}

    def check_options(self, options) -> None:
        """Refuse options this target can't honour (MoecError, before anything runs)."""

    def lowering_passes(self, options) -> Sequence:
        raise NotImplementedError

    def translations(self) -> Mapping[Callable, Callable]:
        return {}

    def graph_passes(self) -> Sequence[GraphPass]:
        return ()

    def expert_nodes(self) -> Sequence[ExpertNode]:
        return ()

    def evaluable_model(self, model):
        """(a model ONNX Runtime can run with the same outputs, how many nodes were expanded)."""
        return model, 0

    def write_evaluable(self, model_path: str, workdir: str) -> list[str]:
        """Files of an ONNX Runtime-runnable copy of the artifact (`evaluable_model` applied), model first,
        kept out of it in workdir/.reference/; [] when the artifact itself runs (nothing to expand)."""
        import onnx

        if type(self).evaluable_model is Target.evaluable_model:  # nothing to expand: don't even read the graph
            return []
        _, expanded = self.evaluable_model(onnx.load(model_path, load_external_data=False))
        if not expanded:  # decided on the graph alone: the weights are not read for nothing
            return []
        model, _ = self.evaluable_model(onnx.load(model_path))
        out_dir = os.path.join(workdir, ".reference")
        os.makedirs(out_dir)
        out = os.path.join(out_dir, "model.onnx")
        external = model.ByteSize() > 1 << 30
        onnx.save_model(model, out, save_as_external_data=external, location="model.onnx.data")
        return [out] + ([out + ".data"] if external else [])

    def activation_rounding(self, options) -> Optional["ActivationRounding"]:
        return None

    def quantizes_activations(self, options) -> bool:
        return self.activation_rounding(options) is not None

    def write_extras(self, artifact: ArtifactContext) -> Optional[dict]:
        """Write files beside the model; returns the report entry (under the target's name), or None."""
        return None

    def triton_model(self, artifact: ArtifactContext) -> TritonModel:
        return TritonModel(artifact.model_path, list(artifact.files))

    def describe_evaluation(self) -> str:
        """How `evaluable` verified the artifact, for the report ("" when it ran as it is)."""
        return ""

    def summary(self, report: dict, out_dir: str) -> list[str]:
        """Lines `moec compile` prints about what the target wrote beside the model."""
        return []


def refuse_foreign_options(target: Target, extra: Mapping[str, Any], others: Sequence[Target]) -> None:
    """An option another target owns is an error naming that target, not silently ignored."""
    for other in others:
        if other.name == target.name:
            continue
        for key, what in other.own_options.items():
            if key in target.own_options or extra.get(key) is None or extra.get(key) is False:
                continue
            flag = "--" + key.replace("_", "-")
            raise MoecError(f"{flag} {what}; it is an option of --target {other.name}, not {target.name}. Use "
                            f"--target {other.name}, or drop {flag}.")


def evaluable_by(chosen: Sequence[Target]) -> Callable:
    """model -> (a model ONNX Runtime runs, nodes expanded): each chosen target's `evaluable_model` in turn
    (each expands only its own nodes)."""

    def evaluable(model):
        total = 0
        for t in chosen:
            model, n = t.evaluable_model(model)
            total += n
        return model, total

    return evaluable

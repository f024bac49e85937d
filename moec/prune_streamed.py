"""--prune-experts FRACTION in an out-of-core compile: which experts each layer loses, chosen from its routing on the
calibration data as its weights stream.

Matches: an out-of-core compile given --prune-experts FRACTION and --calibration; the fused layers
  passes.prune_experts can prune (moec's own routing, no router outputs returned by the layer).
Produces: the graph is captured with each layer's kept count (plan_model.build_on_meta, by
  prune_experts.prune_shapes: the count depends on the config only). When the writer reaches a decoder layer, the
  calibration batches have just been carried through it unpruned (moec.calibrate_streamed), so its routing
  statistics are the in-memory compile's: `choose` ranks the layer's experts by them (prune_experts.plan_of,
  --prune-by, the same seed per layer) and `apply` removes the lowest-ranked from the fused layer (router rows,
  selection bias, experts; a layer streaming its experts reads only those kept) in the calibration's model (whose
  pruned states then give GPTQ its inputs, as in memory), in the layer written (with --quant, only the kept
  experts are coded) and in the verification's reference. `report` is the report's `pruning` in the in-memory
  compile's terms.
  With --quant auto the choice is made earlier, in the run that solves the calibrated codes at every precision
  before the search (moec.calibrate_precisions_streamed): the search then measures the pruned model, as in
  memory, and the writer keeps that choice.
  The pruned model's distance from the unpruned one is measured as in memory: the calibration data is carried
  through the pruned layers beside the unpruned ones (a second set of states once a layer lost experts, each layer's
  batches run twice), and once it went through every layer both models' logits are compared
  (LayerInputs.pruning_distance; with --quant auto in the run before the search).
Refuses (PruneError, naming the layer): a layer the calibration data never reached (its graph already has the kept
  count; in memory such a layer is left whole). --prune-experts auto is refused by the compile before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moec.analysis.routing_stats import LayerRouting
from moec.moe_layer import FusedMoE
from moec.passes.outcomes import PruneOutcome
from moec.passes.prune_experts import PruneError, _assign, _sliced, expert_bytes, group_limits, plan_of
from moec.stream_experts import StreamedExperts


@dataclass
class StreamedPruning:
    fraction: float
    by: str
    counts: dict[str, tuple[int, str]]  # per fused layer: (experts removed, why left whole), as the graph has them
    seeds: dict[str, int]  # --prune-by random: the layer's index among the fused layers, as the pass seeds it
    removed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # chosen, by original index
    shares: dict[str, float] = field(default_factory=dict)
    outcomes: list[PruneOutcome] = field(default_factory=list)

    @classmethod
    def from_meta(cls, counts: dict[str, tuple[int, str]], extra: dict) -> "StreamedPruning":
        """`counts`: plan_model.MetaModel.pruned (per fused layer's path, in module order, as the pass seeds)."""
        return cls(float(extra["prune_experts"]), extra.get("prune_by") or "contribution", dict(counts),
                   {path: i for i, path in enumerate(counts)})

    def choose(self, path: str, spec, stats: Optional[LayerRouting]) -> None:
        """Rank the layer's experts (`spec`: its unpruned MoESpec) by its routing statistics and pick those to go;
        a layer chosen already keeps its choice (--quant auto chose before its search measured the pruned model)."""
        n, _ = self.counts.get(path, (0, ""))
        if not n or path in self.removed:
            return
        if stats is None or stats.tokens == 0:
            raise PruneError(f"--prune-experts: the calibration data never reached {path}, so its experts can't be "
                             f"ranked; out of core its graph already keeps {spec.experts.num_experts - n} of them. "
                             "Give calibration data that reaches every layer, or compile with --out-of-core off (which "
                             "leaves such a layer whole). Nothing was written.")
        plan = plan_of(spec, stats, self.by, self.seeds[path])
        units = n // group_limits(spec)[0]
        self.removed[path] = plan.removed(units)
        self.shares[path] = sum(plan.shares[:units])

    def apply(self, fused: FusedMoE, path: str, record: bool) -> list[int]:
        """Slice the fused layer (real, or streaming its experts) to the experts kept and return their original
        indices; `record`: as written (the report's outcome)."""
        n, why = self.counts.get(path, (0, ""))
        gone = self.removed.get(path, ())
        if len(gone) != n:
            raise RuntimeError(f"{path}: pruned before its experts were ranked")
        before_bytes, before = expert_bytes(fused), fused.spec.experts.num_experts
        keep = [i for i in range(before) if i not in set(gone)]
        if gone:
            stream = fused.stream  # experts read one at a time: the kept ones, by their original index
            _assign(fused, _sliced(fused, keep))
            if stream is not None:
                fused.stream = StreamedExperts(fused, lambda index: stream.fetch(keep[index]))
        if record:
            self.outcomes.append(PruneOutcome(path, before, gone, before_bytes, expert_bytes(fused),
                                              self.shares.get(path, 0.0), why))
        return keep

    def report(self, vs_unpruned: dict) -> dict:
        """`vs_unpruned`: the pruned full-precision model's distance from the unpruned one on the calibration data
        (LayerInputs.pruning_distance; rel_l2, top1_agreement), the in-memory measure."""
        from moec.report import pruning_totals

        on = "the calibration data (pruning alone, as in memory)"
        return {"by": self.by, "mode": "fraction", "fraction": self.fraction,
                "vs_unpruned": {"rel_l2": float(f"{vs_unpruned['rel_l2']:.6g}"),
                                "top1_agreement": round(vs_unpruned["top1_agreement"], 6)},
                "vs_unpruned_on": on, **pruning_totals([o.to_dict() for o in self.outcomes])}

"""simplify_graph: fold the exported graph's shape arithmetic before the artifact is saved.

Matches: the whole ONNX model torch.onnx exported, after every moec pass has run on the torch side.
Produces: the same model through onnxscript's optimizer: constant subgraphs folded (above all the
  Shape/Gather/Concat/Reshape chains torch.onnx emits for symbolic sizes, and no-op Cast, Identity
  and CastLike nodes), unused nodes and functions removed, functions inlined. Folding is bounded
  (inputs of at most 8192 elements, outputs of at most 256K), so no weight is ever copied or
  re-materialised. Returns the node counts before and after, for the report. Every runtime pays a
  fixed cost per node on each call, and a small model's decode step pays it hundreds of times
  (GPT-OSS-shaped decoder: 1,167 nodes that run before, 651 after).
  Values the folding makes stay in the graph as Constant nodes, not initializers, so that external data
  holds the model's weights only (a graph-only copy, as the memory planner reads, keeps its shapes).
Refuses: nothing. Ops the optimizer does not know (moec's com.microsoft and TensorRT plugin nodes)
  pass through unchanged. The saved model is verified against eager PyTorch as always.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir


@dataclass(frozen=True)
class Simplified:
    """nodes_*: nodes a runtime executes (not Constant); by_op_*: every node by op type."""

    nodes_before: int
    nodes_after: int
    by_op_before: dict[str, int]
    by_op_after: dict[str, int]

    def to_dict(self) -> dict:
        return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "by_op_before": self.by_op_before, "by_op_after": self.by_op_after}


def op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def simplify_graph(model: ir.Model, weights_known: bool = True) -> Simplified:
    """Optimise `model` in place; the counts of nodes before and after. `weights_known=False`: the
    initializers are shapes only (an out-of-core compile's meta tensors); folding treats them as inputs."""
    import onnxscript.optimizer

    before = op_counts(model)
    weights = set(model.graph.initializers)
    hidden = {}
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup.level
    if not weights_known:
        dedup.setLevel(logging.ERROR)  # it would warn about every hidden weight
        for name, v in model.graph.initializers.items():
            hidden[name], v.const_value = v.const_value, None
    try:
        onnxscript.optimizer.optimize_ir(model)
    finally:
        dedup.setLevel(level)
        for name, value in hidden.items():
            if name in model.graph.initializers:
                model.graph.initializers[name].const_value = value
    _folded_to_constants(model, weights)
    after = op_counts(model)
    return Simplified(_executed(before), _executed(after), dict(before.most_common()), dict(after.most_common()))


def counted(model: ir.Model, when: str) -> dict:
    """The report's `nodes_<when>` and `by_op_<when>` entries for `model` as it is now."""
    counts = op_counts(model)
    return {f"nodes_{when}": _executed(counts), f"by_op_{when}": dict(counts.most_common())}


def _executed(counts: Counter) -> int:
    """Nodes a runtime executes: ONNX Runtime turns Constant nodes into initializers when it loads a model."""
    return sum(counts.values()) - counts.get("Constant", 0)


def _folded_to_constants(model: ir.Model, weights: set[str]) -> None:
    """Initializers the optimizer made (not among `weights`) become Constant nodes at the graph's start."""
    graph = model.graph
    for name in [n for n in graph.initializers if n not in weights]:
        value = graph.initializers.pop(name)
        node = ir.node("Constant", inputs=[], attributes={"value": value.const_value}, name=f"folded/{name}")
        out = node.outputs[0]
        out.name, out.shape, out.type = name, value.shape, value.type
        ir.convenience.replace_all_uses_with(value, out)
        if value in graph.outputs:  # a graph output folded to a constant keeps its name
            graph.outputs[graph.outputs.index(value)] = out
        if len(graph):
            graph.insert_before(graph[0], node)
        else:
            graph.append(node)

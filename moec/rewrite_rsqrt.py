"""rewrite_rsqrt: write ``x * (1 / sqrt(v))`` as ``x / sqrt(v)``, the form runtimes fuse into RMSNorm.

Matches: in the exported ONNX graph, a ``Reciprocal`` whose input is a ``Sqrt`` and whose only
  consumer is a ``Mul``. torch.onnx lowers ``torch.rsqrt`` (every transformers RMSNorm:
  ``hidden * torch.rsqrt(variance + eps)``) to exactly that chain.
Produces: ``Div(x, Sqrt(v))`` in place of the Reciprocal and the Mul, the Mul's output name kept.
  ONNX Runtime's SimplifiedLayerNormFusion recognises Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul
  and runs the whole norm as one SimplifiedLayerNormalization kernel; it does not recognise the
  Reciprocal form, so without this rewrite each norm stays 7 kernels (a Qwen3-MoE decoder layer has
  four norms). The division rounds once where the reciprocal and the product rounded twice, so the
  values move by at most an ulp or so; the artifact is verified against eager PyTorch as always.
Refuses: nothing. A Reciprocal used elsewhere too, or a Sqrt in another domain, is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir

from moec.onnx_match import producer, take_over

NAME = "rewrite_rsqrt"


def rewrite_rsqrt(model: ir.Model) -> int:
    """Rewrite `model`'s graph in place; how many ``x * reciprocal(sqrt(v))`` became divisions."""
    graph = model.graph
    done = 0
    for node in list(graph):
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        sqrt = producer(node.inputs[0], "Sqrt")
        if sqrt is None:
            continue
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or node.outputs[0] in graph.outputs:
            continue
        mul, index = uses[0].node, uses[0].idx
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or mul.graph is not graph:
            continue
        old = mul.outputs[0]
        div = ir.node("Div", inputs=[mul.inputs[1 - index], sqrt.outputs[0]], name=f"{mul.name or node.name}/div")
        new = div.outputs[0]
        graph.insert_before(mul, div)
        take_over(old, new)
        graph.remove([mul, node], safe=True)
        done += 1
    return done

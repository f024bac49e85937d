"""fuse_skip_norm: a residual add and the RMSNorm after it as ``com.microsoft.SkipSimplifiedLayerNormalization``.

Matches, in the exported ONNX graph (top level, after rewrite_rsqrt), a decoder's residual connection
followed by an RMSNorm, as transformers writes every one of them in fp32:
  ``s = a + b;  y = w * (s / sqrt(mean(s ** 2, axis=-1) + eps))``  (``Mul(y, w)`` either way round),
where ``a`` and ``b`` have the same 3-D shape ``[batch, seq, hidden]`` (hidden known), ``w`` is
``[hidden]``, ``eps`` a constant scalar, and ``s`` is read again later (the residual stream goes on).
Produces: one ``SkipSimplifiedLayerNormalization(a, b, w)`` node (epsilon=eps) whose first output is
  ``y`` and whose fourth (``input_skip_bias_sum``) is ``s`` for its other uses, in place of 7 nodes.
  ONNX Runtime fuses the norm alone (SimplifiedLayerNormalization) when it loads a model but not the add
  before it in moec's graphs, so without this each decoder layer runs two more kernels. The kernel
  computes the same sum and norm (values move by rounding: < 1e-6 relative); the artifact is verified
  against eager PyTorch as always.
Refuses (leaves as it is): a norm without an add before it (ONNX Runtime fuses that one itself), inputs
  of different or unknown shapes (broadcasting adds), norms over other axes, fp16 graphs' casting norms,
  and a sum the norm alone reads (the last decoder layer's output before the final norm: fused, it would
  exist nowhere as a tensor, and layer-by-layer verification compares each layer's output).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from moec.onnx_match import DEFAULT_DOMAINS, const_ints, const_scalar, producer, same_dims, take_over

NAME = "fuse_skip_norm"


def _only_use(value: ir.Value, graph: ir.Graph) -> Optional[ir.Node]:
    uses = list(value.uses())
    if len(uses) != 1 or value in graph.outputs:
        return None
    return uses[0].node


def _same_3d(a: ir.Value, b: ir.Value) -> Optional[int]:
    """hidden, when a and b are both [batch, seq, hidden] with the same dims and hidden known."""
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return None
    if not same_dims(a.shape, b.shape):
        return None
    hidden = a.shape[2]
    if not isinstance(hidden, int) or a.dtype != ir.DataType.FLOAT or b.dtype != ir.DataType.FLOAT:
        return None
    return hidden


def _match(div: ir.Node, graph: ir.Graph):
    """(add, mul, weight, eps) for ``w * (s / sqrt(mean(s**2) + eps))`` ending at `div`, s = Add(a, b)."""
    if div.op_type != "Div" or div.domain not in DEFAULT_DOMAINS:
        return None
    s = div.inputs[0]
    add = producer(s, "Add")
    sqrt = producer(div.inputs[1], "Sqrt")
    if add is None or sqrt is None or len(add.inputs) != 2:
        return None
    if len(list(s.uses())) < 3 and s not in graph.outputs:  # Pow and Div only: nothing reads the sum on
        return None
    hidden = _same_3d(add.inputs[0], add.inputs[1])
    if hidden is None:
        return None
    plus = producer(sqrt.inputs[0], "Add")
    if plus is None:
        return None
    for mean_at in (0, 1):
        mean = producer(plus.inputs[mean_at], "ReduceMean")
        eps = const_scalar(plus.inputs[1 - mean_at])
        if mean is None or eps is None:
            continue
        axes = (const_ints(mean.inputs[1]) if len(mean.inputs) > 1 and mean.inputs[1] is not None
                else list(mean.attributes.get_ints("axes", [])))
        if axes not in ([-1], [2]) or mean.attributes.get_int("keepdims", 1) != 1:
            return None
        pow_ = producer(mean.inputs[0], "Pow")
        if pow_ is None or pow_.inputs[0] is not s or const_scalar(pow_.inputs[1]) != 2.0:
            return None
        if _only_use(pow_.outputs[0], graph) is not mean or _only_use(mean.outputs[0], graph) is not plus:
            return None
        if _only_use(plus.outputs[0], graph) is not sqrt or _only_use(sqrt.outputs[0], graph) is not div:
            return None
        mul = _only_use(div.outputs[0], graph)
        if mul is None or mul.op_type != "Mul" or mul.domain not in DEFAULT_DOMAINS:
            return None
        weight = mul.inputs[1] if mul.inputs[0] is div.outputs[0] else mul.inputs[0]
        if weight.shape is None or list(weight.shape) != [hidden] or weight.dtype != ir.DataType.FLOAT:
            return None
        return add, mul, weight, eps
    return None


def fuse_skip_norm(model: ir.Model) -> int:
    """Rewrite `model`'s graph in place; how many add + RMSNorm pairs became SkipSimplifiedLayerNormalization."""
    graph = model.graph
    found = [m for node in graph if (m := _match(node, graph)) is not None]
    for add, mul, weight, eps in found:
        node = ir.node("SkipSimplifiedLayerNormalization", inputs=[add.inputs[0], add.inputs[1], weight],
                       domain="com.microsoft", attributes={"epsilon": float(np.float32(eps))}, num_outputs=4,
                       name=f"{add.name or 'residual'}/{NAME}")
        graph.insert_before(add, node)  # its inputs are the add's; every use of the sum comes after
        out, mean, inv_std, total = node.outputs
        mean.name, inv_std.name = "", ""  # optional outputs left out
        take_over(mul.outputs[0], out)
        take_over(add.outputs[0], total)
    if found:
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault("com.microsoft", 1)
    return len(found)

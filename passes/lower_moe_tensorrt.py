"""lower_moe_tensorrt: rewrite each FusedMoE for TensorRT: routing as ONNX ops, experts as one plugin.

Matches: every `FusedMoE` left by fuse_moe.
Produces: a `TrtMoE` whose routing runs as ops TensorRT's ONNX parser supports (MatMul, Softmax or
  Sigmoid, TopK, GatherElements, ReduceSum, Div ...) and whose experts are one ``moec::experts`` op,
  exported as one plugin node (see `PLUGIN`): ``op_type`` = plugin name, attributes
  ``plugin_namespace`` / ``plugin_version`` plus the plugin fields, weights as inputs in moec's
  canonical layout (``w_gate_up [E, 2I, H]`` gate rows then up rows, ``w_down [E, H, I]``), expert
  ids as int32 (TensorRT's TopK index type).
Refuses: nothing — every activation moec recognizes, biases and input-weighted routing (Llama4)
  are plugin fields. The plugin's kernels and TensorRT registration live in plugins/.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from moec.moe_layer import FusedMoE, LoweredMoE
from moec.plugin_spec import PLUGIN, PluginSpec  # noqa: F401  (re-exported)
from moec.passes.base import PassContext, PassResult
from moec.passes.fuse_moe import iter_fused, set_submodule
from moec.passes.lower_moe_onnxruntime import _route_outside




class TrtMoE(LoweredMoE):
    def __init__(self, fused: FusedMoE):
        super().__init__(fused, keep_experts=True)
        # The plugin takes both biases or neither.
        if (self.b_gate_up is None) != (self.b_down is None):
            e, rows, h = self.w_gate_up.shape
            if self.b_gate_up is None:
                self.b_gate_up = nn.Parameter(torch.zeros(e, rows, dtype=self.w_gate_up.dtype), requires_grad=False)
            else:
                self.b_down = nn.Parameter(torch.zeros(e, h, dtype=self.w_down.dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor):
        flat = hidden.reshape(-1, self.spec.experts.hidden)
        ids, weights, logits = _route_outside(self, flat)
        x = self.spec.experts
        out = torch.ops.moec.experts(
            flat, ids.to(torch.int32), weights.to(flat.dtype), self.w_gate_up, self.w_down, self.b_gate_up,
            self.b_down, x.activation, x.gated, x.alpha, x.beta, x.limit, x.weight_on_input,
        )
        s = self.shared_output(flat)
        if s is not None:
            out = out + s
        return self.finish(hidden, out, ids, weights, logits)


class LowerMoEForTensorRT:
    name = "lower_moe_tensorrt"

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        layers = []
        for path in [p for p, _ in iter_fused(module)]:
            set_submodule(module, path, TrtMoE(module.get_submodule(path)))
            layers.append({"path": path, "lowered_to": f"{PLUGIN.namespace}::{PLUGIN.name} plugin "
                                                      f"v{PLUGIN.version}"})
        return PassResult(module, bool(layers), {"layers": layers, "plugin": PLUGIN.describe()})


def experts_plugin_translation(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                               activation, gated, alpha, beta, limit, weight_on_input):
    """torch.onnx translation of moec::experts for the tensorrt target: one plugin node."""
    import onnxscript

    from moec.onnx_schemas import register_plugin_schema

    register_plugin_schema(PLUGIN)
    op = onnxscript.values.Opset(PLUGIN.domain, 1)
    e, rows, h = w_gate_up.shape
    inter = w_down.shape[2]
    has_bias = b_gate_up is not None
    args = [hidden, topk_ids, topk_weights, w_gate_up, w_down] + ([b_gate_up, b_down] if has_bias else [])
    return getattr(op, PLUGIN.name)(
        *args, plugin_namespace=PLUGIN.namespace, plugin_version=PLUGIN.version,
        num_experts=int(e), top_k=int(topk_ids.shape[1]), hidden_size=int(h), intermediate_size=int(inter),
        activation=activation, gated=int(bool(gated)), alpha=float(alpha), beta=float(beta),
        limit=float(limit) if math.isfinite(limit) else 0.0, weight_on_input=int(bool(weight_on_input)),
        has_bias=int(has_bias),
    )

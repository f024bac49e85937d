"""``moec::trt_experts``: the TensorRT experts plugin's contract as a torch.library custom op.

The reference kernel computes what the plugin computes (moec/targets/tensorrt/plugin_spec.py), so a
lowered graph stays runnable for validation; moec/targets/tensorrt/translations.py exports it as one
plugin node.
"""

from __future__ import annotations

import torch

from moec.ops import experts_reference

@torch.library.custom_op("moec::trt_experts", mutates_args=())
def trt_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor,
    b_down: torch.Tensor,
    s_gate_up: torch.Tensor,
    z_gate_up: torch.Tensor,
    s_down: torch.Tensor,
    z_down: torch.Tensor,
    accumulator: torch.Tensor,
    activation: str,
    gated: bool,
    alpha: float,
    beta: float,
    limit: float,
    weight_on_input: bool,
    has_bias: bool,
    quant_bits: int,
    has_zero_points: bool,
    aot: bool,
) -> torch.Tensor:
    """The TensorRT experts plugin's contract (moec/targets/tensorrt/plugin_spec.py): accumulator + experts, in fp32.

    Unused inputs are 1-element placeholders; quantized weights are packed codes (moec.quant.dequantize_codes).
    `aot` only marks the exported node for TensorRT's AOT implementation."""
    from moec.quant import dequantize_codes

    hsize = hidden.shape[-1]
    if quant_bits:
        inter = w_down.shape[2] * 8 // quant_bits
        w1 = dequantize_codes(w_gate_up, s_gate_up, z_gate_up if has_zero_points else None, quant_bits, hsize)
        w2 = dequantize_codes(w_down, s_down, z_down if has_zero_points else None, quant_bits, inter)
    else:
        w1, w2 = w_gate_up, w_down
    out = experts_reference(
        hidden.float(), topk_ids, topk_weights, w1.float(), w2.float(), b_gate_up.float() if has_bias else None,
        b_down.float() if has_bias else None, activation, gated, alpha, beta, limit, weight_on_input,
    )
    return accumulator + out


@trt_experts.register_fake
def _trt_experts_fake(hidden, *args):
    return torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)

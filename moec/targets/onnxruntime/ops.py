"""ONNX Runtime's contrib ops as torch.library custom ops: reference kernels with ORT's exact semantics.

- ``moec::ort_moe``  ``com.microsoft.MoE``: softmax over all experts, top-k, optional renormalization,
  fc1 rows interleaved gate/up for swiglu.
- ``moec::ort_qmoe`` ``com.microsoft.QMoE``: the same over packed int4/int8 expert weights, experts
  selected by a 0/1 mask and mixed with explicit weights.
- ``moec::matmul_nbits`` ``com.microsoft.MatMulNBits``: x @ dequantize(W).T for dense layers.
- ``moec::ort_group_query_attention`` ``com.microsoft.GroupQueryAttention`` (causal=0): attention of new
  queries over the cache and the new keys, under an additive bias that carries the whole mask.
Lowering for the onnxruntime target produces them; moec/targets/onnxruntime/translations.py exports
each as one node.
"""

from __future__ import annotations

from typing import Optional

import torch

from moec.ops import deinterleave_gate_up, experts_reference

@torch.library.custom_op("moec::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """ONNX Runtime's com.microsoft.MatMulNBits: x @ dequantize(W).T (+ bias), W [N, K] block-quantized.

    packed ``uint8 [N, K/block, block*bits/8]``, scales ``[N * K/block]``, zero points ``uint8
    [N * ceil(K/block * bits/8)]`` packed like the codes (None: 2^(bits-1))."""
    from moec.quant import CHUNK_ELEMENTS, matmul_nbits_dequantize

    # a chunk of output rows dequantized at a time: a large-vocabulary head's weight is never whole in fp32
    groups, step = in_features // block_size, max(1, CHUNK_ELEMENTS // in_features)
    zp_row = None if zero_points is None else zero_points.numel() // out_features
    parts = []
    for r0 in range(0, out_features, step):
        r1 = min(r0 + step, out_features)
        zp = None if zero_points is None else zero_points[r0 * zp_row:r1 * zp_row]
        w = matmul_nbits_dequantize(packed[r0:r1], scales[r0 * groups:r1 * groups], zp, bits, block_size,
                                    in_features, r1 - r0)
        parts.append(x.float() @ w.T)
    y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, packed, scales, zero_points, bias, in_features, out_features, bits, block_size,
                       accuracy_level):
    return x.new_empty(x.shape[:-1] + (out_features,))


def ort_moe_reference(
    hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize, activation_type,
    alpha, beta, limit,
) -> torch.Tensor:
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    gated = activation_type == "swiglu"
    # ONNX Runtime's "gelu" expert activation is the tanh approximation.
    activation = "gelu_tanh" if activation_type == "gelu" else activation_type
    w_gate_up = deinterleave_gate_up(fc1) if gated else fc1
    b_gate_up = None
    if fc1_bias is not None:
        b_gate_up = deinterleave_gate_up(fc1_bias.unsqueeze(-1)).squeeze(-1) if gated else fc1_bias
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = experts_reference(
        flat, ids, weights, w_gate_up, fc2, b_gate_up, fc2_bias,
        activation, gated, alpha, beta, limit, False,
    )
    return out.reshape(hidden.shape)


@torch.library.custom_op("moec::ort_moe", mutates_args=())
def ort_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    fc1: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    k: int,
    normalize: bool,
    activation_type: str,
    alpha: float,
    beta: float,
    limit: float,
) -> torch.Tensor:
    return ort_moe_reference(
        hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize, activation_type,
        alpha, beta, limit,
    )


@ort_moe.register_fake
def _ort_moe_fake(hidden, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, normalize,
                  activation_type, alpha, beta, limit):
    return torch.empty_like(hidden)


# ----------------------------------------------------------------------------- ort_qmoe


@torch.library.custom_op("moec::ort_qmoe", mutates_args=())
def ort_qmoe(
    hidden: torch.Tensor,
    router_probs: torch.Tensor,
    router_weights: torch.Tensor,
    fc1: torch.Tensor,
    fc1_scales: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2: torch.Tensor,
    fc2_scales: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    fc1_zero_points: Optional[torch.Tensor],
    fc2_zero_points: Optional[torch.Tensor],
    k: int,
    activation_type: str,
    alpha: float,
    beta: float,
    limit: float,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """ONNX Runtime's QMoE with router_weights: top-k on router_probs, weights gathered from router_weights.

    The reference computes with fp32 activations; `accuracy_level` 4 lets ORT quantize them (faster,
    ~1% further error), which only the artifact's verification tolerance accounts for."""
    from moec.quant import qmoe_dequantize

    hidden_size = hidden.shape[-1]
    inter = fc2.shape[-1] * 8 // bits
    w1 = qmoe_dequantize(fc1, fc1_scales, fc1_zero_points, bits, block_size, hidden_size)
    w2 = qmoe_dequantize(fc2, fc2_scales, fc2_zero_points, bits, block_size, inter)
    ids = torch.topk(router_probs.float(), k, dim=-1)[1]
    weights = router_weights.float().gather(1, ids)
    gated = activation_type == "swiglu"
    activation = "gelu_tanh" if activation_type == "gelu" else activation_type
    w_gate_up = deinterleave_gate_up(w1) if gated else w1
    b_gate_up = None
    if fc1_bias is not None:
        b_gate_up = deinterleave_gate_up(fc1_bias.unsqueeze(-1)).squeeze(-1) if gated else fc1_bias
    flat = hidden.reshape(-1, hidden_size)
    out = experts_reference(flat, ids, weights, w_gate_up, w2, b_gate_up, fc2_bias, activation, gated,
                            alpha, beta, limit, False)
    return out.reshape(hidden.shape)


@ort_qmoe.register_fake
def _ort_qmoe_fake(hidden, *args):
    return torch.empty_like(hidden)


# ----------------------------------------------------------------------------- ort_group_query_attention


def group_query_attention_reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                    attention_bias, head_sink, num_heads: int, kv_num_heads: int, scale: float):
    """GroupQueryAttention with causal=0 and every cache position valid (seqlens_k = total - 1 for every row,
    which is what moec feeds, so the reference does not read them): the bias is the only mask.
    query [B, S, H*D], key/value [B, S, KV*D] (packed heads), past [B, KV, P, D]; returns
    (output [B, S, H*D], present key, present value [B, KV, P+S, D]). Query head h reads kv head
    h // (H/KV) (transformers' repeat_kv); a head sink joins each row's softmax as one more logit."""
    batch, seq = query.shape[0], query.shape[1]
    head = query.shape[-1] // num_heads
    q = query.reshape(batch, seq, num_heads, head).transpose(1, 2)
    present_key = torch.cat([past_key, key.reshape(batch, seq, kv_num_heads, head).transpose(1, 2)], dim=2)
    present_value = torch.cat([past_value, value.reshape(batch, seq, kv_num_heads, head).transpose(1, 2)], dim=2)
    group = num_heads // kv_num_heads
    keys = present_key.repeat_interleave(group, dim=1)
    values = present_value.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale + attention_bias
    if head_sink is not None:
        sinks = head_sink.reshape(1, -1, 1, 1).expand(batch, -1, seq, 1).to(scores.dtype)
        logits = torch.cat([scores, sinks], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(values.dtype), values).transpose(1, 2).reshape(batch, seq, num_heads * head)
    return out, present_key, present_value


@torch.library.custom_op("moec::ort_group_query_attention", mutates_args=())
def ort_group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    attention_bias: torch.Tensor,
    head_sink: Optional[torch.Tensor],
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's com.microsoft.GroupQueryAttention as moec emits it (see the reference)."""
    return group_query_attention_reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                           attention_bias, head_sink, num_heads, kv_num_heads, scale)


@ort_group_query_attention.register_fake
def _ort_group_query_attention_fake(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                    attention_bias, head_sink, num_heads, kv_num_heads, scale):
    batch, seq = query.shape[0], query.shape[1]
    total = past_key.shape[2] + seq
    return (torch.empty_like(query), past_key.new_empty(batch, kv_num_heads, total, past_key.shape[3]),
            past_value.new_empty(batch, kv_num_heads, total, past_value.shape[3]))

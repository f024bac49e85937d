"""The canonical moec ops: torch.library custom ops with reference and fake kernels.

Two ops, each opaque to torch.export (so a fused layer survives capture as one
node) and each with a plain PyTorch reference implementation (so every graph
that contains them stays runnable and can be validated against the original):

- ``moec::route``   logits -> (topk_ids, topk_weights). Softmax or sigmoid scores,
  optional selection bias, grouped top-k, renormalization, routed scaling.
- ``moec::experts`` hidden, ids, weights, stacked expert weights -> output.
  Canonical weight layout: ``w_gate_up [E, 2I, H]`` (gate rows, then up rows) or
  ``[E, I, H]`` for plain FFNs; ``w_down [E, H, I]``.
Targets add their own ops beside their lowering (moec/targets/<name>/ops.py); the
layout helpers below convert between the canonical weight layout and interleaved ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moec.activations import activate

# ----------------------------------------------------------------------------- route


def route_reference(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    scoring: str,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scale: float,
    select_on_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over scores (+ selection bias), or over raw logits when `select_on_logits`.

    Both orders agree in exact arithmetic; in fp32 saturated scores tie (sigmoid(20) ==
    sigmoid(35) == 1.0), so the rule must be the model's own (Llama4 picks on logits).
    """
    logits = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"moec.route: unknown scoring {scoring!r} (softmax|sigmoid)")
    choice = logits if select_on_logits else scores
    if bias is not None:
        choice = choice + bias.float()
    if n_group > 1:
        num_experts = logits.shape[-1]
        grouped = choice.view(-1, n_group, num_experts // n_group)
        # DeepSeek-V3 ranks groups by the sum of their two best scores.
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights = weights * scale
    return ids, weights


@torch.library.custom_op("moec::route", mutates_args=())
def route(
    logits: torch.Tensor,
    bias: Optional[torch.Tensor],
    scoring: str,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scale: float,
    select_on_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return route_reference(logits, bias, scoring, top_k, renormalize, n_group, topk_group, scale, select_on_logits)


@route.register_fake
def _route_fake(logits, bias, scoring, top_k, renormalize, n_group, topk_group, scale, select_on_logits):
    tokens = logits.shape[0]
    return (
        logits.new_empty((tokens, top_k), dtype=torch.int64),
        logits.new_empty((tokens, top_k), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- experts


def experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    alpha: float,
    beta: float,
    limit: float,
    weight_on_input: bool,
) -> torch.Tensor:
    """Loop over the experts that received tokens; exact in fp32 (no weight gathering)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    num_experts = w_gate_up.shape[0]
    x_all = hidden.float()
    weights = topk_weights.float()
    for e in torch.unique(topk_ids).tolist():
        if e < 0 or e >= num_experts:
            continue
        token_idx, slot = torch.where(topk_ids == e)
        w = weights[token_idx, slot].unsqueeze(-1)
        x = x_all[token_idx]
        if weight_on_input:
            x = x * w
        u = F.linear(x, w_gate_up[e].float(), None if b_gate_up is None else b_gate_up[e].float())
        h = activate(u, activation, gated, alpha, beta, limit)
        y = F.linear(h, w_down[e].float(), None if b_down is None else b_down[e].float())
        if not weight_on_input:
            y = y * w
        out.index_add_(0, token_idx, y)
    return out.to(hidden.dtype)


@torch.library.custom_op("moec::experts", mutates_args=())
def experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    alpha: float,
    beta: float,
    limit: float,
    weight_on_input: bool,
) -> torch.Tensor:
    return experts_reference(
        hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
        activation, gated, alpha, beta, limit, weight_on_input,
    )


@experts.register_fake
def _experts_fake(hidden, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down,
                  activation, gated, alpha, beta, limit, weight_on_input):
    return torch.empty_like(hidden)


# ----------------------------------------------------------------------------- layouts


def interleave_gate_up(w_gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] gate rows then up rows -> rows interleaved (gate_0, up_0, gate_1, ...)."""
    e, two_i = w_gate_up.shape[:2]
    gate, up = w_gate_up[:, : two_i // 2], w_gate_up[:, two_i // 2:]
    return torch.stack([gate, up], dim=2).reshape(w_gate_up.shape)


def deinterleave_gate_up(fc1: torch.Tensor) -> torch.Tensor:
    return torch.cat([fc1[:, 0::2], fc1[:, 1::2]], dim=1)



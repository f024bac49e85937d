"""Recover the weight a MoE layer gave each expert, token by token, from its output alone.

For a reading of the experts (weights, layout, activation) every expert's output E_e(x_t) is known, and a layer
that mixes its experts computes

    y_t = sum_e s_te * E_e(x_t) + c_t * S(x_t)        (S: the shared expert, if any; c_t its gate)

which is linear in the unknown weights s_t (zero for the experts a token did not pick). Least squares per
token recovers them. A residual at rounding level says the reading is right whatever the routing is, so
fuse_moe tries expert readings and routing rules one after the other instead of every pair: the routing rules
are then checked against the recovered weights, without running experts again.

The system has H equations and E (+1) unknowns per token: it says something only when H exceeds them
(`solvable`). Experts that scale their input by the routing weight (Llama 4), and a norm on the layer's
output, are not linear in the weights: fuse_moe checks those jointly instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moec.activations import activate
from moec.numerics import compare_tensors

SCREEN_TOKENS = 64  # per probe: enough rows to tell readings and routings apart, few enough to stay cheap
MARGIN = 2  # equations beyond the unknowns before a small residual means anything


def solvable(hidden: int, num_experts: int, shared: bool) -> bool:
    return hidden >= num_experts + int(shared) + MARGIN


@dataclass
class Mixture:
    """A reading's expert outputs on the screening tokens, and how well some mixture of them gives the layer's."""

    bases: list[torch.Tensor]  # per probe, [T, E, H]: every expert on every token
    shared: list[Optional[torch.Tensor]]  # per probe, [T, H]: the shared expert, or None
    targets: list[torch.Tensor]  # per probe, [T, H]: the layer's output (less any output bias)
    residual: float  # worst relative L2 over the probes of the output the best weights leave unexplained


@torch.no_grad()
def expert_outputs(flat: torch.Tensor, w_gate_up, w_down, b_gate_up, b_down, activation: str, gated: bool,
                   alpha: float, beta: float, limit: float) -> torch.Tensor:
    """Every expert on every token: [T, E, H], in fp32 as the fused op computes."""
    x = flat.float()
    u = torch.einsum("th,exh->tex", x, w_gate_up.float())
    if b_gate_up is not None:
        u = u + b_gate_up.float()
    h = activate(u, activation, gated, alpha, beta, limit)
    y = torch.einsum("tei,ehi->teh", h, w_down.float())
    if b_down is not None:
        y = y + b_down.float()
    return y


@torch.no_grad()
def solve(bases: list[torch.Tensor], shared: list[Optional[torch.Tensor]], targets: list[torch.Tensor]) -> Mixture:
    """bases[p] [T, E, H] expert outputs, shared[p] [T, H] or None, targets[p] [T, H] the layer's output (less any
    output bias) for probe p. An expert whose output is zero on a token (ReLU) leaves its weight there unknown:
    the SVD solver copes, and routings are judged by the output they give, not by the weights."""
    worst = 0.0
    for basis, s, y in zip(bases, shared, targets):
        a = _columns(basis, s)
        sol = torch.linalg.lstsq(a, y.double().unsqueeze(-1), driver="gelsd").solution
        worst = max(worst, compare_tensors(y.double(), (a @ sol).squeeze(-1)).rel_l2)
    return Mixture(bases, shared, targets, worst)


def _columns(basis: torch.Tensor, shared: Optional[torch.Tensor]) -> torch.Tensor:
    a = basis.double().transpose(1, 2)  # [T, H, E]
    return a if shared is None else torch.cat([a, shared.double().unsqueeze(-1)], dim=-1)


def dense(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(ids [T, k], weights [T, k]) as [T, E]; a repeated id sums its weights, an id out of range is no expert."""
    valid = (ids >= 0) & (ids < num_experts)
    w = torch.where(valid, weights.double(), 0.0)
    return torch.zeros(ids.shape[0], num_experts, dtype=torch.float64).scatter_add(1, torch.where(valid, ids, 0), w)


@torch.no_grad()
def routing_error(mixture: Mixture, decided: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int) -> float:
    """The layer's output under a routing's (ids, weights) per probe, from the experts' outputs already computed
    (the shared expert's gate solved per token), against the layer's own: worst relative L2."""
    worst = 0.0
    for basis, s, y, (ids, w) in zip(mixture.bases, mixture.shared, mixture.targets, decided):
        rest = y.double() - torch.einsum("te,teh->th", dense(ids, w, num_experts), basis.double())
        if s is not None:
            s = s.double()
            rest = rest - s * ((rest * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True).clamp_min(1e-300))
        worst = max(worst, float(rest.norm() / y.double().norm().clamp_min(1e-300)))
    return worst


def shared_output(shared: Optional[torch.nn.Module], flat: torch.Tensor) -> Optional[torch.Tensor]:
    if shared is None:
        return None
    with torch.no_grad():
        return shared(flat).float()

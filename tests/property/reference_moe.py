"""A configurable MoE written independently of moec.ops: the oracle for property tests.

Experts are computed densely (every expert on every token) with einsum and combined with a
[T, E] weight matrix, so it shares no code path with moec's reference kernels. Weights are
stored transposed ([E, H, X], [E, I, H]) to exercise layout recognition.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoEConfig:
    experts: int
    top_k: int
    hidden: int
    inter: int
    scoring: str = "softmax"
    renormalize: bool = True
    router_bias: bool = False
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    shared: bool = False
    shared_gate: bool = False
    activation: str = "silu"  # silu | relu | gelu_tanh
    gated: bool = True
    expert_bias: bool = False


_ACT = {"silu": F.silu, "relu": F.relu, "gelu_tanh": lambda u: F.gelu(u, approximate="tanh")}


class Act(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, u):
        return _ACT[self.name](u)


class ReferenceMoE(nn.Module):
    def __init__(self, cfg: MoEConfig, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        e, h, i = cfg.experts, cfg.hidden, cfg.inter
        x = 2 * i if cfg.gated else i
        self.cfg = cfg
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.renormalize
        self.routed_scaling_factor = cfg.scale
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.router = nn.Linear(h, e, bias=cfg.router_bias)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(e, h, generator=g) * 0.5)
            if cfg.router_bias:
                self.router.bias.copy_(torch.randn(e, generator=g) * 0.3)
        if cfg.selection_bias:
            self.register_buffer("correction", torch.randn(e, generator=g) * 0.2)
        self.act_fn = Act(cfg.activation)
        self.w_in = nn.Parameter(torch.randn(e, h, x, generator=g) / h ** 0.5)
        self.w_out = nn.Parameter(torch.randn(e, i, h, generator=g) / i ** 0.5)
        if cfg.expert_bias:
            self.b_in = nn.Parameter(torch.randn(e, x, generator=g) * 0.1)
            self.b_out = nn.Parameter(torch.randn(e, h, generator=g) * 0.1)
        if cfg.shared:
            self.shared = nn.Sequential(nn.Linear(h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h))
            for p in self.shared.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(h, 1, bias=False)
                with torch.no_grad():
                    self.shared_gate.weight.copy_(torch.randn(1, h, generator=g) * 0.3)

    def zero_router_(self):
        with torch.no_grad():
            self.router.weight.zero_()
            if self.router.bias is not None:
                self.router.bias.zero_()
        return self

    def routing(self, flat):
        cfg = self.cfg
        logits = self.router(flat)
        scores = torch.softmax(logits, -1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
        choice = scores + self.correction if cfg.selection_bias else scores
        if cfg.n_group > 1:
            per = cfg.experts // cfg.n_group
            gs = choice.reshape(-1, cfg.n_group, per).topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(gs).scatter(1, gs.topk(cfg.topk_group, -1).indices, 1.0)
            keep = keep.repeat_interleave(per, dim=1)
            choice = torch.where(keep > 0, choice, torch.full_like(choice, float("-inf")))
        idx = choice.topk(cfg.top_k, -1).indices
        w = scores.gather(1, idx)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True)
        w = w * cfg.scale
        return torch.zeros_like(scores).scatter(1, idx, w)  # [T, E]

    def forward(self, x):
        cfg = self.cfg
        flat = x.reshape(-1, cfg.hidden)
        combine = self.routing(flat)
        u = torch.einsum("th,ehx->etx", flat, self.w_in)
        if cfg.expert_bias:
            u = u + self.b_in[:, None, :]
        if cfg.gated:
            gate, up = u.chunk(2, dim=-1)
            hmid = self.act_fn(gate) * up
        else:
            hmid = self.act_fn(u)
        y = torch.einsum("eti,eih->eth", hmid, self.w_out)
        if cfg.expert_bias:
            y = y + self.b_out[:, None, :]
        out = torch.einsum("te,eth->th", combine, y)
        if cfg.shared:
            s = self.shared(flat)
            if cfg.shared_gate:
                s = torch.sigmoid(self.shared_gate(flat)) * s
            out = out + s
        return out.reshape(x.shape)


class Residual(nn.Module):
    """x + moe(x): a MoE layer as a model's residual block."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x) + x

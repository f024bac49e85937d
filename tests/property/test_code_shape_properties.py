"""Property tests over a layer's *code shape*: where its parameters sit, how they are oriented, stacked, nested
and named. Every drawn shape computes the same MoE (softmax, top-k, renormalised; SwiGLU experts); fuse_moe
must find it, fuse it into one FusedMoE that reproduces it (translation validation, 1e-5), and read the same
routing and experts facts whatever the layout."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moec.moe_layer import FusedMoE
from moec.passes.base import PassContext, PassManager
from moec.passes.fuse_moe import FuseMoE

H, I = 16, 12  # distinct from 2I (24) and from every expert count drawn: no reading is ambiguous
NAMES = ["w", "proj", "kernel", "mats", "fc", "lin", "weight_a", "blk"]


class CodeShaped(nn.Module):
    """softmax -> top-k -> renormalise -> sum_k w * down(silu(gate(x)) * up(x)), with the parameters where
    `shape` puts them:
      router: an nn.Linear child ("linear"), a bare [E, H] or [H, E] parameter, optionally nested one level;
      experts: stacked gate|up [E, 2I, H] or [E, H, 2I] with down [E, H, I] or [E, I, H], separate gate/up/down
      stacks, or a ModuleList of MLP modules; stacked ones on the block itself or on a child module;
      every attribute name drawn."""

    def __init__(self, shape: dict, experts: int, top_k: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shape, self.k, self.e = shape, top_k, experts
        n = shape["names"]

        def p(*size, fan):
            return nn.Parameter(torch.randn(*size, generator=g) / math.sqrt(fan))

        router_owner = self
        if shape["router_nested"]:
            router_owner = nn.Module()
            setattr(self, n[0], router_owner)
        if shape["router"] == "linear":
            lin = nn.Linear(H, experts, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(experts, H, generator=g))
            setattr(router_owner, n[1], lin)
        else:
            setattr(router_owner, n[1], p(*((experts, H) if shape["router"] == "bare_EH" else (H, experts)), fan=1))

        if shape["experts"] == "modulelist":
            mlps = nn.ModuleList()
            for _ in range(experts):
                mlp = nn.Module()
                setattr(mlp, n[2], nn.Linear(H, I, bias=False))
                setattr(mlp, n[3], nn.Linear(H, I, bias=False))
                setattr(mlp, n[4], nn.Linear(I, H, bias=False))
                mlps.append(mlp)
            setattr(self, n[5], mlps)
            return
        owner = self if shape["experts_on_block"] else nn.Module()
        if owner is not self:
            setattr(self, n[5], owner)
        if shape["experts"] == "separate":
            setattr(owner, n[2], p(experts, I, H, fan=H))
            setattr(owner, n[3], p(experts, I, H, fan=H))
        else:
            gu = p(experts, 2 * I, H, fan=H)
            setattr(owner, n[2], nn.Parameter(gu.detach().transpose(1, 2).contiguous()) if shape["in_t"] else gu)
        down = p(experts, H, I, fan=I)
        setattr(owner, n[4], nn.Parameter(down.detach().transpose(1, 2).contiguous()) if shape["out_t"] else down)

    def _router_weight(self):
        owner = getattr(self, self.shape["names"][0]) if self.shape["router_nested"] else self
        r = getattr(owner, self.shape["names"][1])
        if isinstance(r, nn.Linear):
            return r.weight
        return r if self.shape["router"] == "bare_EH" else r.t()

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        s, n = self.shape, self.shape["names"]
        if s["experts"] == "modulelist":
            mlp = getattr(self, n[5])[e]
            return getattr(mlp, n[4])(F.silu(getattr(mlp, n[2])(x)) * getattr(mlp, n[3])(x))
        owner = self if s["experts_on_block"] else getattr(self, n[5])
        if s["experts"] == "separate":
            gate, up = x @ getattr(owner, n[2])[e].t(), x @ getattr(owner, n[3])[e].t()
        else:
            gu = getattr(owner, n[2])[e]
            gate, up = (x @ gu if s["in_t"] else x @ gu.t()).chunk(2, dim=-1)
        down = getattr(owner, n[4])[e]
        return (F.silu(gate) * up) @ (down if s["out_t"] else down.t())

    def forward(self, x):
        flat = x.reshape(-1, H)
        w, idx = torch.softmax(flat @ self._router_weight().t(), -1).topk(self.k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.e):
            weight = (w * (idx == e).to(flat.dtype)).sum(-1, keepdim=True)
            out = out + weight * self._expert(e, flat)
        return out.reshape(x.shape)


class Model(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.moe = moe

    def forward(self, x):
        return x + self.moe(self.norm(x))


@st.composite
def code_shapes(draw):
    experts = draw(st.sampled_from([3, 4, 6, 8]))
    kind = draw(st.sampled_from(["gate_up", "separate", "modulelist"]))
    shape = {
        "router": draw(st.sampled_from(["linear", "bare_EH", "bare_HE"])),
        "router_nested": draw(st.booleans()),
        "experts": kind,
        "experts_on_block": draw(st.booleans()),
        "in_t": draw(st.booleans()) if kind == "gate_up" else False,
        "out_t": draw(st.booleans()),
        "names": draw(st.permutations(NAMES)),
    }
    return shape, experts, draw(st.integers(1, min(3, experts))), draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(code_shapes())
def test_any_code_shape_of_the_same_moe_fuses_exactly(drawn):
    shape, experts, top_k, seed = drawn
    model = Model(CodeShaped(shape, experts, top_k, seed)).eval()
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(seed))
    ctx = PassContext(probes=[(x,), (torch.randn(1, 3, H),)])
    module, records = PassManager([FuseMoE()], validate=True).run(model, ctx)
    fused = [m for m in module.modules() if isinstance(m, FusedMoE)]
    assert len(fused) == 1, (shape, records[0].details)
    spec = fused[0].spec
    assert spec.route is not None and spec.route.scoring == "softmax" and spec.route.top_k == top_k
    assert spec.experts.num_experts == experts and spec.experts.intermediate == I and spec.experts.gated
    assert records[0].validation.rel_l2 < 1e-5

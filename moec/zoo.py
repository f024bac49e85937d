"""Reference MoE models: real transformers classes from tiny configs, and hand-written styles.

Used by tests, golden recording and benchmarks (and usable as SOURCEs, e.g.
``moec compile moec.zoo:qwen3_moe``). Nothing is downloaded: configs are built here and
weights are seeded random (routers included, so top-k never ties).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moec.demo import randomize_, shape_spectrum_
from moec.sources import LoadedSource, causal_lm_source

_BASE = dict(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=12, max_position_embeddings=256)

# family -> (config class, model class, config overrides)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=40, num_local_experts=6,
                                                             num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=56, num_experts=6,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=12, num_key_value_heads=4, num_hidden_layers=3, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                                                       norm_topk_prob=False)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=40, num_local_experts=4,
                                                           num_experts_per_tok=2, layer_types=None)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=40, num_local_experts=4,
                                                                      num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=40, num_local_experts=4,
                                                          num_experts_per_tok=2)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(intermediate_size=40, intermediate_size_mlp=56,
                                                              num_local_experts=4, num_experts_per_tok=1)),
    # router nested in a submodule (gate.wg), selection bias stored [1, E] in gate.moe_statics:
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(intermediate_size=40, num_experts=4,
                                                                             moe_topk=2)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        intermediate_size=40, moe_num_experts=6, moe_k=2, moe_intermediate_size=24, moe_num_shared_experts=1,
        moe_layer_start_index=0, moe_layer_end_index=1)),
}


def build_hf_model(family: str, seed: int = 0, *, spectrum: float = 0.0, **overrides) -> nn.Module:
    """A `family` model from its tiny config (config fields overridden by `overrides`), seeded random weights;
    `spectrum` > 0 gives its matrices power-law singular values (moec.demo.shape_spectrum_: correlated hidden
    states, as trained models have)."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize_(model, seed)
    shape_spectrum_(model, spectrum)
    return model


def hf_family(family: str, seed: int = 0, **overrides) -> LoadedSource:
    return causal_lm_source(build_hf_model(family, seed, **overrides), f"zoo:{family}")


def _factory(family: str) -> Callable[[], LoadedSource]:
    def make() -> LoadedSource:
        return hf_family(family)

    make.__name__ = family
    return make


mixtral = _factory("mixtral")
qwen2_moe = _factory("qwen2_moe")
qwen3_moe = _factory("qwen3_moe")
deepseek_v3 = _factory("deepseek_v3")
olmoe = _factory("olmoe")
gpt_oss = _factory("gpt_oss")
granitemoe = _factory("granitemoe")
phimoe = _factory("phimoe")
llama4 = _factory("llama4")
hunyuan_v1_moe = _factory("hunyuan_v1_moe")
ernie4_5_moe = _factory("ernie4_5_moe")


# ----------------------------------------------------------------------------- hand-written styles


class SwiGLUExpert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """The classic loop over an nn.ModuleList of experts with masks (softmax, top-k, renormalize)."""

    def __init__(self, hidden=32, inter=48, num_experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, inter) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * w[token, slot, None])
        return out.reshape(shape)


class SwitchMoE(nn.Module):
    """Top-1 switch routing with max; experts are Sequential(Linear, ReLU, Linear) with biases."""

    def __init__(self, hidden=32, inter=64, num_experts=4):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, inter), nn.ReLU(), nn.Linear(inter, hidden)) for _ in range(num_experts))

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        gate, choice = probs.max(dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = (choice == e).unsqueeze(-1)
            out = out + torch.where(mask, expert(x) * gate.unsqueeze(-1), torch.zeros_like(x))
        return out


class GShardMoE(nn.Module):
    """GShard-style one-hot dispatch / combine with einsum over stacked weights (top-2, GELU-tanh)."""

    def __init__(self, hidden=32, inter=40, num_experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.wg = nn.Parameter(torch.randn(num_experts, hidden) / math.sqrt(hidden))
        self.wi = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(hidden))
        self.wo = nn.Parameter(torch.randn(num_experts, inter, hidden) / math.sqrt(inter))

    def forward(self, x):
        b, s, h = x.shape
        tokens = x.reshape(-1, h)
        probs = torch.softmax(tokens @ self.wg.t(), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(1, idx, w)  # [T, E]
        dispatch = (combine > 0).to(x.dtype)
        expert_in = torch.einsum("te,th->eth", dispatch, tokens)
        hmid = F.gelu(torch.einsum("eth,ehi->eti", expert_in, self.wi), approximate="tanh")
        expert_out = torch.einsum("eti,eih->eth", hmid, self.wo)
        return torch.einsum("te,eth->th", combine, expert_out).reshape(b, s, h)


class SoftMixtureMoE(nn.Module):
    """A dense soft mixture: every expert on every token, weighted by softmax over all experts."""

    def __init__(self, hidden=32, inter=24, num_experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / math.sqrt(hidden))
        self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(inter))

    def forward(self, x):
        p = torch.softmax(self.gate(x), dim=-1)  # [..., E]
        u = torch.einsum("...h,eih->...ei", x, self.up)
        g, v = u.chunk(2, dim=-1)
        y = torch.einsum("...ei,ehi->...eh", F.silu(g) * v, self.down)
        return (p.unsqueeze(-1) * y).sum(dim=-2)


class BareRouterMoE(nn.Module):
    """The router a bare [H, E] parameter (x @ W); gate, up and down stacked separately ([E, H, I] twice,
    [E, I, H]); softmax, top-k, renormalise; a loop over all experts with dense masks."""

    def __init__(self, hidden=32, inter=24, num_experts=6, top_k=2):
        super().__init__()
        self.hidden, self.k = hidden, top_k
        self.router = nn.Parameter(torch.randn(hidden, num_experts) * 0.5)
        self.w_gate = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(hidden))
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(hidden))
        self.w_down = nn.Parameter(torch.randn(num_experts, inter, hidden) / math.sqrt(inter))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.softmax(flat @ self.router, -1).topk(self.k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.w_gate.shape[0]):
            weight = (w * (idx == e).to(flat.dtype)).sum(-1, keepdim=True)
            out = out + weight * ((F.silu(flat @ self.w_gate[e]) * (flat @ self.w_up[e])) @ self.w_down[e])
        return out.reshape(x.shape)


class ParallelListsMoE(nn.Module):
    """Experts as two parallel ModuleLists of biased Linears (w1[e]: H->I, w2[e]: I->H) with GELU-tanh;
    top-k on logits, softmax over the k."""

    def __init__(self, hidden=32, inter=40, num_experts=4, top_k=2):
        super().__init__()
        self.hidden, self.k = hidden, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w1 = nn.ModuleList([nn.Linear(hidden, inter) for _ in range(num_experts)])
        self.w2 = nn.ModuleList([nn.Linear(inter, hidden) for _ in range(num_experts)])

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat).topk(self.k, -1)
        w = torch.softmax(w, -1)
        out = torch.zeros_like(flat)
        for e in range(len(self.w1)):
            weight = (w * (idx == e).to(flat.dtype)).sum(-1, keepdim=True)
            out = out + weight * self.w2[e](F.gelu(self.w1[e](flat), approximate="tanh"))
        return out.reshape(x.shape)


class StackedOnSiblings(nn.Module):
    """One stacked weight per child module (JetMoE's ParallelExperts: [E, out, in] each), the router a Linear
    nested in a gating module, SwiGLU over gate|up halves, and an [H] bias the block adds to its output."""

    class Stack(nn.Module):
        def __init__(self, num_experts, out_features, in_features):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(num_experts, out_features, in_features) / math.sqrt(in_features))

    def __init__(self, hidden=32, inter=24, num_experts=6, top_k=2):
        super().__init__()
        self.hidden, self.k = hidden, top_k
        self.gating = nn.Module()
        self.gating.proj = nn.Linear(hidden, num_experts, bias=False)
        self.input_linear = self.Stack(num_experts, 2 * inter, hidden)
        self.output_linear = self.Stack(num_experts, hidden, inter)
        self.bias = nn.Parameter(torch.randn(hidden) * 0.1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gating.proj(flat).topk(self.k, -1)
        w = torch.softmax(w, -1)
        out = torch.zeros_like(flat)
        for e in range(self.input_linear.weight.shape[0]):
            weight = (w * (idx == e).to(flat.dtype)).sum(-1, keepdim=True)
            gate, up = F.linear(flat, self.input_linear.weight[e]).chunk(2, dim=-1)
            out = out + weight * F.linear(F.silu(gate) * up, self.output_linear.weight[e])
        return (out + self.bias).reshape(x.shape)


class RoutedByCaller(nn.Module):
    """Routing no rule describes, and experts as their own module called with it: Experts(hidden, ids,
    weights) over stacked [E, 2I, H] / [E, H, I] weights, as transformers writes them. The routing: softmax
    top-k, then a learned per-expert scale of either sign and a 3x factor; a token whose first choice is
    expert 0 is routed nowhere (weights 0), expert 1 names its first choice twice, expert 2 names "no expert"
    (id E, skipped) second."""

    class Experts(nn.Module):
        def __init__(self, hidden, inter, num_experts):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / math.sqrt(hidden))
            self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(inter))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.gate_up_proj.shape[0]):
                weight = (top_k_weights * (top_k_index == e).to(hidden_states.dtype)).sum(-1, keepdim=True)
                gate, up = F.linear(hidden_states, self.gate_up_proj[e]).chunk(2, dim=-1)
                out = out + weight * F.linear(F.silu(gate) * up, self.down_proj[e])
            return out

    def __init__(self, hidden=32, inter=24, num_experts=6, top_k=2):
        super().__init__()
        self.hidden, self.k = hidden, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.linspace(-0.6, 1.5, num_experts))
        self.experts = self.Experts(hidden, inter, num_experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.softmax(self.gate(flat), -1).topk(self.k, -1)
        w = w * self.per_expert_scale[idx] * 3.0
        first = idx[:, :1]
        w = w.masked_fill(first == 0, 0.0)
        idx = torch.cat([first, torch.where(first == 1, first, torch.where(first == 2, len(self.per_expert_scale),
                                                                            idx[:, 1:2]))], dim=-1)
        return self.experts(flat, idx, w).reshape(x.shape)


class SigmoidBiasedMoE(nn.Module):
    """A router Linear with a bias, sigmoid scores, top-k renormalised; experts a ModuleList of MLPs whose
    projections have names of their own (w_in, w_gate, w_out)."""

    def __init__(self, hidden=32, inter=20, num_experts=6, top_k=2):
        super().__init__()
        self.hidden, self.k = hidden, top_k
        self.scorer = nn.Linear(hidden, num_experts, bias=True)
        self.bank = nn.ModuleList()
        for _ in range(num_experts):
            mlp = nn.Module()
            mlp.w_in, mlp.w_gate, mlp.w_out = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False), \
                nn.Linear(inter, hidden, bias=False)
            self.bank.append(mlp)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.sigmoid(self.scorer(flat)).topk(self.k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, mlp in enumerate(self.bank):
            weight = (w * (idx == e).to(flat.dtype)).sum(-1, keepdim=True)
            out = out + weight * mlp.w_out(F.silu(mlp.w_gate(flat)) * mlp.w_in(flat))
        return out.reshape(x.shape)


class TokenSortedMoE(nn.Module):
    """Capacity-free token-sorted dispatch: (token, expert) pairs sorted by expert, each expert run on its own
    slice (data-dependent sizes: torch.export can't capture this unfused), results scattered back with
    index_add. Stacked [E, H, 2I] gate|up (x @ W) and [E, I, H] down; softmax, top-k, no renormalisation."""

    def __init__(self, hidden=32, inter=16, num_experts=8, top_k=2):
        super().__init__()
        self.hidden, self.k = hidden, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(num_experts, hidden, 2 * inter) / math.sqrt(hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, inter, hidden) / math.sqrt(inter))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.softmax(self.router(flat), -1).topk(self.k, -1)
        order = idx.reshape(-1).argsort(stable=True)
        tokens = order // self.k
        counts = torch.bincount(idx.reshape(-1), minlength=self.w13.shape[0]).tolist()
        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = tokens[start:start + n]
                gate, up = (flat[rows] @ self.w13[e]).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ self.w2[e]
                out.index_add_(0, rows, y * w.reshape(-1)[order[start:start + n]].unsqueeze(-1))
            start += n
        return out.reshape(x.shape)


class RouterTripleMoE(nn.Module):
    """A router module returning (logits, weights, ids) -- sigmoid scores, a selection bias of its own, top-k
    renormalised and scaled by 2 -- and stacked experts [E, 2I, H] / [E, H, I] on a child module."""

    class Router(nn.Module):
        def __init__(self, hidden, num_experts, top_k):
            super().__init__()
            self.k = top_k
            self.weight = nn.Parameter(torch.randn(num_experts, hidden) * 0.5)
            self.register_buffer("steer", torch.linspace(-0.2, 0.2, num_experts))

        def forward(self, flat):
            logits = F.linear(flat, self.weight)
            scores = torch.sigmoid(logits)
            idx = (scores + self.steer).topk(self.k, -1).indices
            w = scores.gather(1, idx)
            return logits, 2.0 * w / w.sum(-1, keepdim=True), idx

    class Stack(nn.Module):
        def __init__(self, hidden, inter, num_experts):
            super().__init__()
            self.gate_up = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) / math.sqrt(hidden))
            self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(inter))

    def __init__(self, hidden=32, inter=16, num_experts=8, top_k=3):
        super().__init__()
        self.hidden = hidden
        self.route = self.Router(hidden, num_experts, top_k)
        self.experts = self.Stack(hidden, inter, num_experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        _, w, idx = self.route(flat)
        out = torch.zeros_like(flat)
        for e in range(self.experts.gate_up.shape[0]):
            weight = (w * (idx == e).to(flat.dtype)).sum(-1, keepdim=True)
            gate, up = F.linear(flat, self.experts.gate_up[e]).chunk(2, dim=-1)
            out = out + weight * F.linear(F.silu(gate) * up, self.experts.down[e])
        return out.reshape(x.shape)


class SquaredReLUTop1MoE(nn.Module):
    """Top-1 with `max` over sigmoid scores, ungated squared-ReLU experts stacked [E, I, H] / [E, H, I]
    (Nemotron-H's expert), the activation a module of the layer's own."""

    class SquaredReLU(nn.Module):
        def forward(self, x):
            return torch.relu(x) ** 2

    def __init__(self, hidden=32, inter=24, num_experts=4):
        super().__init__()
        self.hidden = hidden
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, inter, hidden) / math.sqrt(hidden))
        self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(inter))
        self.act_fn = self.SquaredReLU()

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.sigmoid(self.gate(flat)).max(dim=-1)
        out = torch.zeros_like(flat)
        for e in range(self.up.shape[0]):
            weight = (w * (idx == e).to(flat.dtype)).unsqueeze(-1)
            out = out + weight * F.linear(self.act_fn(F.linear(flat, self.up[e])), self.down[e])
        return out.reshape(x.shape)


HANDWRITTEN: dict[str, type[nn.Module]] = {
    "loop": LoopMoE, "switch": SwitchMoE, "gshard": GShardMoE, "soft_mixture": SoftMixtureMoE,
    "bare_router": BareRouterMoE, "parallel_lists": ParallelListsMoE, "stacked_on_siblings": StackedOnSiblings,
    "routed_by_caller": RoutedByCaller, "sigmoid_biased": SigmoidBiasedMoE, "token_sorted": TokenSortedMoE,
    "router_triple": RouterTripleMoE, "squared_relu_top1": SquaredReLUTop1MoE,
}


class Residual(nn.Module):
    """A tiny 'model' around a MoE block: x + moe(norm(x)), then a projection, so the MoE is inside."""

    def __init__(self, moe: nn.Module, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.moe = moe
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.proj(x + self.moe(self.norm(x)))


def handwritten(style: str, seed: int = 0) -> LoadedSource:
    torch.manual_seed(seed)
    moe = HANDWRITTEN[style]()
    hidden = getattr(moe, "hidden", None)
    if hidden is None:
        hidden = moe.experts[0][0].in_features if style == "switch" else (
            moe.gate.in_features if hasattr(moe, "gate") and isinstance(moe.gate, nn.Linear) else moe.wg.shape[1])
    model = Residual(moe, hidden).eval()
    x = torch.randn(2, 8, hidden, generator=torch.Generator().manual_seed(seed))
    dyn = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=4096)},)
    return LoadedSource(model, (x,), dyn, f"zoo:handwritten:{style}", ["hidden_states"], ["output"], [], ["float"])


def loop_moe() -> LoadedSource:
    return handwritten("loop")


def switch_moe() -> LoadedSource:
    return handwritten("switch")


def gshard_moe() -> LoadedSource:
    return handwritten("gshard")


def soft_mixture_moe() -> LoadedSource:
    return handwritten("soft_mixture")


def bare_router_moe() -> LoadedSource:
    return handwritten("bare_router")


def parallel_lists_moe() -> LoadedSource:
    return handwritten("parallel_lists")


def stacked_on_siblings_moe() -> LoadedSource:
    return handwritten("stacked_on_siblings")


def routed_by_caller_moe() -> LoadedSource:
    return handwritten("routed_by_caller")


def handwritten_factory(style: str):
    """`moec compile moec.zoo:<style>_moe` for the styles added with issue #16's survey."""
    return lambda: handwritten(style)


sigmoid_biased_moe = handwritten_factory("sigmoid_biased")
token_sorted_moe = handwritten_factory("token_sorted")
router_triple_moe = handwritten_factory("router_triple")
squared_relu_top1_moe = handwritten_factory("squared_relu_top1")


def save_byte_level_tokenizer(path: str, vocab_size: int) -> None:
    """A tokenizer for a random-weight model (nothing to download): byte-level BPE (GPT-2 style, the kind
    onnxruntime-genai's Tokenizer reads; it does not read word-level ones) trained on a fixed synthetic
    corpus to exactly `vocab_size` tokens, with <pad> = 0, <eos> = 1, <bos> = 2. Saved as transformers
    writes one (tokenizer.json + tokenizer_config.json)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special):
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {len(alphabet) + len(special)} "
                         f"(256 bytes and 3 special tokens); got {vocab_size}")
    rng = random.Random(0)  # enough distinct words that the trainer always has merges left to learn
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4 * vocab_size)]
    corpus = [" ".join(words[i:i + 64]) for i in range(0, len(words), 64)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=alphabet, show_progress=False))
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the tokenizer trainer stopped at {tok.get_vocab_size()} tokens, not {vocab_size}")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>").save_pretrained(path)
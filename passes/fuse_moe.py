"""fuse_moe: rewrite every recognizable MoE layer into one canonical `FusedMoE`.

Matches: a submodule that owns
  - a router: a direct child (or its own 2-D parameter) with a weight ``[E, H]``, and
  - experts: either stacked 3-D parameters with leading dim E (on a direct child or on
    the module itself; ``[E, 2I, H]``/``[E, H, 2I]`` in-projections, ``[E, H, I]``/
    ``[E, I, H]`` out-projections, optional ``[E, n]`` biases, gate/up concatenated or
    interleaved), or an ``nn.ModuleList`` of E MLPs of 2 or 3 linear layers;
  - optionally one dense shared-expert child and a ``[1, H]`` sigmoid shared gate, and one child
    whose parameters are all ``[H]`` vectors, a norm on the output (A.X-K1), kept as written.
  Which module does what is decided by parameter shapes, never by class names.
  Attribute values (``top_k``, ``norm_topk_prob``, ``routed_scaling_factor``, ``act_fn``
  ...) only order the candidate semantics to try.
Produces: for each match, a `FusedMoE` (router Linear -> ``moec.route`` -> ``moec.experts``
  [+ shared]) whose spec is the first candidate that reproduces the original module on
  probe inputs (the layer's real inputs captured from the model's example run, random
  inputs of the same scale, one token, and 8x magnitude) within 1e-5 relative L2.
  A router whose rule matches no candidate (e.g. PhiMoE's sparse mixer) is kept as
  written; its (ids, weights) outputs then feed ``moec.experts``.
Refuses (layer left unfused, with the reason in the report): modules whose forward takes
  more than the hidden states, extra unrecognized parameters, and layers no candidate
  reproduces.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from moec.activations import PLAIN_ACTIVATIONS, apply_activation
from moec.moe_layer import (ExpertsOnly, ExpertsSpec, FusedMoE, GivenRouting, LayerSpec, OutputSpec,
                             QuantizedExperts, RouteSpec, pick_router_outputs)
from moec.numerics import compare_tensors
from moec.ops import deinterleave_gate_up, route_reference
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import MOE_FUSED
from moec.passes.layers import ExpertsInputs, LayerCall, capture_inputs, set_submodule
from moec.passes.outcomes import FusionOutcome
from moec.quant import QuantizedWeight, WeightCodes

MATCH_TOL = 1e-5
NOT_CALLED = "not executed by the example inputs"  # MoE-shaped, but the model never called it as a layer
HINTED_ONLY = ("relu2",)  # activations tried only when an act_fn of the layer computes them
MAX_CANDIDATES = 2000

_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected", "experts_per_token")
_RENORM_ATTRS = ("norm_topk_prob", "renormalize", "normalize")
_SCALE_ATTRS = ("routed_scaling_factor", "router_scaling_factor", "scaling_factor", "route_scale")
_NGROUP_ATTRS = ("n_group", "num_group", "num_groups", "n_groups")
_TOPKGROUP_ATTRS = ("topk_group", "topk_groups")
_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


@dataclass
class ExpertWeights:
    """One candidate reading of the expert parameters, already in canonical layout."""

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    b_gate_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]
    gated: bool
    layout: str
    # The tensors each stacked weight was read from ([expert][part]), when read without a transform:
    # pre-quantized codes (WeightCodes) are stacked the same way. None: the codes can't follow.
    gate_up_sources: Optional[list[list[torch.Tensor]]] = None
    down_sources: Optional[list[list[torch.Tensor]]] = None


@dataclass
class Anatomy:
    """What a candidate module is made of, found from parameter shapes."""

    num_experts: int
    hidden: int
    router: Optional[nn.Module]  # child module acting as router (None: weight on the module)
    router_name: Optional[str]
    router_weight: torch.Tensor
    router_biases: list[torch.Tensor]  # [E] tensors that may be router bias or selection bias
    expert_readings: Callable[[], Iterator[ExpertWeights]]  # lazy: a reading may copy a layer's weights
    experts_name: Optional[str]
    activation_hints: list[Any] = field(default_factory=list)
    shared: Optional[nn.Module] = None
    shared_gate: Optional[nn.Module] = None
    hints: dict[str, Any] = field(default_factory=dict)
    post_norm: Optional[nn.Module] = None  # a child whose parameters are all [H] vectors: a norm
    output_bias: Optional[torch.Tensor] = None  # the module's own [H] vector, added to its output
    # Experts on their own (no router: the caller decides the routing and passes it in). Their width is read
    # from the hidden states they are called with: readings_for(hidden) gives expert_readings then.
    readings_for: Optional[Callable[[int], Iterator[ExpertWeights]]] = None

    @property
    def experts_only(self) -> bool:
        return self.readings_for is not None


class FuseMoE(Pass):
    name = "fuse_moe"
    ensures = (MOE_FUSED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        candidates = find_candidates(module)
        outcomes: list[FusionOutcome] = []
        if not candidates:
            return PassResult(module, False, {"layers": [], "note": "no MoE layer found"})
        # A block that can't be replaced whole (its forward takes more than the hidden states) may still have
        # experts that fuse on their own, called with the routing the block decided.
        fallbacks: dict[str, tuple[str, Anatomy]] = {}
        for path, anatomy in candidates:
            if isinstance(anatomy, Anatomy) and anatomy.experts_name and not anatomy.experts_only:
                child = f"{path}.{anatomy.experts_name}"
                inner = analyze(module.get_submodule(child))
                if isinstance(inner, Anatomy) and inner.experts_only:
                    fallbacks[path] = (child, inner)
        experts_paths = frozenset([p for p, a in candidates if isinstance(a, Anatomy) and a.experts_only]
                                  + [c for c, _ in fallbacks.values()])
        inputs = capture_inputs(module, [p for p, _ in candidates] + [c for c, _ in fallbacks.values()],
                                ctx.probes[0], experts_paths)
        modified = False
        for i, (path, anatomy_or_reason) in enumerate(candidates):
            ctx.log(f"  [{i + 1}/{len(candidates)}] {path}")
            if isinstance(anatomy_or_reason, str):
                outcomes.append(FusionOutcome(path, False, anatomy_or_reason))
                continue
            captured = inputs.get(path)
            if isinstance(captured, str) and isinstance(inputs.get(fallbacks.get(path, ("",))[0]), ExpertsInputs):
                path, anatomy_or_reason = fallbacks[path]
                captured = inputs[path]
            sub = module.get_submodule(path)
            if anatomy_or_reason.experts_only and (captured is None or isinstance(captured, str)):
                continue  # stacked 3-D weights, but not called as experts are: not known to be a MoE layer
            if captured is None:
                outcomes.append(FusionOutcome(path, False, NOT_CALLED))
                continue
            if anatomy_or_reason.experts_only:
                outcome, fused = match_experts(path, sub, anatomy_or_reason, captured, ctx.weight_codes)
                outcomes.append(outcome)
                if fused is not None:
                    set_submodule(module, path, ExpertsOnly(fused))
                    modified = True
                continue
            if isinstance(captured, str):
                outcomes.append(FusionOutcome(path, False, captured))
                continue
            call, x = captured
            outcome, fused = match_layer(path, sub, anatomy_or_reason, x, call, ctx.weight_codes)
            child = fallbacks.get(path)
            if fused is None and child is not None and isinstance(inputs.get(child[0]), ExpertsInputs):
                # the block's routing is its own (Gemma 4's per-expert scales ...): its experts may still fuse
                inner, fused_inner = match_experts(child[0], module.get_submodule(child[0]), child[1],
                                                   inputs[child[0]], ctx.weight_codes)
                if fused_inner is not None:
                    outcomes.append(replace(inner, reason=f"block not fused ({outcome.reason}); its experts were"))
                    set_submodule(module, child[0], ExpertsOnly(fused_inner))
                    modified = True
                    continue
            outcomes.append(outcome)
            if fused is not None:
                set_submodule(module, path, fused if call == LayerCall() else CalledLike(fused, call))
                modified = True
        # The codes now live in the fused layers; the table would keep every superseded weight alive.
        ctx.weight_codes.clear()
        details = {"fused": sum(o.fused for o in outcomes), "unfused": sum(not o.fused for o in outcomes)}
        return PassResult(module, modified, details, outcomes)


# ----------------------------------------------------------------------------- discovery


def find_candidates(model: nn.Module) -> list[tuple[str, Anatomy | str]]:
    """Top-down: a module that looks like a MoE layer hides its descendants from the search."""
    found: list[tuple[str, Anatomy | str]] = []
    taken: list[str] = []
    for path, mod in model.named_modules():
        if not path or isinstance(mod, FusedMoE):
            continue
        if any(path.startswith(t + ".") for t in taken):
            continue
        anatomy = analyze(mod)
        if anatomy is None:
            continue
        if not (isinstance(anatomy, Anatomy) and anatomy.experts_only):  # unconfirmed until called as experts
            taken.append(path)
        found.append((path, anatomy))
    return found


def _subtree_params(mod: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(mod.named_parameters())
    d.update({k: v for k, v in mod.named_buffers() if v is not None})
    return d


def _own_params(mod: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(mod.named_parameters(recurse=False))
    d.update({k: v for k, v in mod.named_buffers(recurse=False) if v is not None})
    return d


def analyze(mod: nn.Module) -> Anatomy | str | None:
    """None: not a MoE layer. str: looks like one but can't be read (the reason)."""
    children = dict(mod.named_children())
    experts_name, stacked, expert_list = None, None, None
    expert_names: list[str] = []  # every child holding expert weights (several for parallel lists)
    own = _own_params(mod)
    if sum(t.dim() == 3 for t in own.values()) >= 2:
        stacked = own
    for name, child in children.items():
        if stacked is not None or expert_list is not None:
            break
        cp = _own_params(child)
        # stacked experts: >= 2 three-dim tensors, and no parameters further down (an act_fn child is fine)
        if sum(t.dim() == 3 for t in cp.values()) >= 2 and all(not _own_params(c) for c in child.children()):
            experts_name, stacked = name, cp
        elif isinstance(child, nn.ModuleList) and len(child) >= 1 and all(_linears(e) for e in child):
            experts_name, expert_list = name, child
            parallel = _parallel_lists(children, len(child))
            if len(parallel) >= 2:  # w1[e], w2[e] (, w3[e]): one ModuleList of Linears per role
                expert_names = list(parallel)
                expert_list = nn.ModuleList([nn.ModuleList([lst[e] for lst in parallel.values()])
                                             for e in range(len(child))])
    if stacked is None and expert_list is None:
        # one stacked tensor per sibling child (JetMoE's input_linear / output_linear)
        singles = {n: next(iter(_own_params(c).items())) for n, c in children.items()
                   if len(_own_params(c)) == 1 and next(iter(_own_params(c).values())).dim() == 3
                   and all(not _own_params(g) for g in c.children())}
        if len(singles) >= 2 and len({t.shape[0] for _, t in singles.values()}) == 1:
            expert_names = list(singles)
            experts_name = expert_names[0]
            stacked = {f"{n}.{k}": t for n, (k, t) in singles.items()}
    if experts_name is not None and not expert_names:
        expert_names = [experts_name]
    if stacked is None and expert_list is None:
        return None
    if stacked is not None:
        threes = [t for t in stacked.values() if t.dim() == 3]
        num_experts = threes[0].shape[0]
        if any(t.shape[0] != num_experts for t in threes):
            return None
    else:
        num_experts = len(expert_list)

    # Router: a 2-D [E, H] weight on a child module (possibly nested in it, e.g. gate.wg, when that is all
    # the child holds besides [E] vectors), or on the module itself.
    router, router_name, router_weight, router_biases = None, None, None, []
    for name, child in children.items():
        if name == experts_name:
            continue
        cp = _own_params(child) if not list(child.children()) else _subtree_params(child)
        two = [t for t in cp.values() if t.dim() == 2 and t.shape[0] == num_experts]
        # [E] vectors (router or selection biases), also stored as [1, E] (Ernie 4.5's moe_statics)
        vectors = [t.reshape(num_experts) for t in cp.values()
                   if tuple(t.shape) in ((num_experts,), (1, num_experts)) and t is not (two[0] if two else None)]
        if len(two) == 1 and len(two) + len(vectors) == len(cp):
            router, router_name, router_weight = child, name, two[0]
            router_biases = vectors
            break
        # a bare [H, E] parameter in a child (x @ W, nested): the router read transposed
        cols = [t for t in cp.values() if t.dim() == 2 and t.shape[1] == num_experts and t.shape[0] != num_experts]
        if not two and len(cols) == 1 and len(cols) + len(vectors) == len(cp):
            router, router_name, router_weight = child, name, cols[0].detach().t().contiguous()
            router_biases = vectors
            break
    router_source = None  # the module's own tensor when the router is stored transposed
    if router_weight is None:
        two = [t for n, t in own.items() if t.dim() == 2 and t.shape[0] == num_experts]
        # a bare [H, E] parameter (x @ W) is the router read transposed; [E, E] stays ambiguous and unread
        cols = [t for t in own.values() if t.dim() == 2 and t.shape[1] == num_experts and t.shape[0] != num_experts]
        if len(two) == 1:
            router_weight = two[0]
        elif not two and len(cols) == 1:
            router_source = cols[0]
            router_weight = cols[0].detach().t().contiguous()
        if router_weight is not None:
            router_biases = [t for t in own.values() if t.dim() == 1 and t.shape[0] == num_experts]
    if router_weight is None:
        if stacked is own and num_experts >= 2 and _called_like_experts(mod) and _some_reading(own, num_experts):
            params = dict(own)
            return Anatomy(num_experts, 0, None, None, None, [], lambda: iter(()), None,
                           activation_hints=_activation_hints([mod]), hints=_collect_hints([mod, getattr(mod, "config", None)]),
                           readings_for=lambda hidden: _stacked_readings(params, num_experts, hidden))
        return None  # stacked weights without a router: not a MoE layer we know
    if router is not None:  # [E] tensors on the layer itself may be a selection bias
        router_biases += [t for t in own.values() if t.dim() == 1 and t.shape[0] == num_experts]
    hidden = router_weight.shape[1]

    if stacked is not None:
        # The router's own [E, H] weight may sit beside stacked expert weights (GShard style).
        expert_params = {k: v for k, v in stacked.items() if v is not router_weight and v is not router_source
                         and all(v is not b for b in router_biases)}
        readings = lambda: _stacked_readings(expert_params, num_experts, hidden)  # noqa: E731
    else:
        readings = lambda: _list_readings(expert_list, hidden)  # noqa: E731
    if next(readings(), None) is None:
        return "expert weights found, but no reading of their shapes maps hidden -> intermediate -> hidden"

    shared, shared_gate, post_norm, extra = None, None, None, []
    for name, child in children.items():
        if name in expert_names or name == router_name:
            continue
        params = list(child.parameters())
        if not params:
            continue
        if len(params) == 1 and params[0].dim() == 2 and tuple(params[0].shape) == (1, hidden):
            shared_gate = child
        elif post_norm is None and len(params) <= 2 and all(tuple(p.shape) == (hidden,) for p in params):
            post_norm = child  # only [H] vectors: a norm's scale (and shift), applied to the output
        elif shared is None:
            shared = child
        else:
            extra.append(name)
    if extra:
        return f"unrecognized submodules with parameters: {', '.join(extra)}"

    # the module's own [H] vector, beside stacked experts on children: a bias on its output
    own_vectors = [t for t in own.values() if t.dim() == 1 and t.shape[0] == hidden and t.shape[0] != num_experts]
    output_bias = own_vectors[0] if len(own_vectors) == 1 and stacked is not own else None

    hint_sources = [mod, router, children.get(experts_name) if experts_name else None, getattr(mod, "config", None)]
    hints = _collect_hints([s for s in hint_sources if s is not None])
    act_holders = [children.get(experts_name)] if experts_name else []
    if expert_list is not None:
        act_holders = [expert_list[0]]
    act_holders.append(mod)
    activation_hints = _activation_hints([h for h in act_holders if h is not None])
    return Anatomy(
        num_experts, hidden, router, router_name, router_weight, router_biases, readings, experts_name,
        activation_hints, shared, shared_gate, hints, post_norm, output_bias,
    )


def _activation_hints(holders: list[nn.Module]) -> list[Any]:
    """Callables that may be the experts' activation: act_fn-like attributes and parameterless leaf children."""
    hints = []
    for holder in holders:
        for a in _ACT_ATTRS:
            f = getattr(holder, a, None)
            if callable(f):
                hints.append(f)
        for c in holder.children():
            if not list(c.parameters()) and not list(c.children()):
                hints.append(c)
    return hints


def _some_reading(params: dict[str, torch.Tensor], num_experts: int) -> bool:
    """Whether stacked tensors read as experts for some width they share (an experts module's hidden size is
    only known once it is called)."""
    widths = {d for t in params.values() if t.dim() == 3 for d in t.shape[1:]}
    return any(next(_stacked_readings(params, num_experts, h), None) is not None for h in widths)


def _called_like_experts(mod: nn.Module) -> bool:
    """A forward of three arguments, as transformers' Experts(hidden_states, top_k_index, top_k_weights)."""
    try:
        params = inspect.signature(mod.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) == 3


def _parallel_lists(children: dict[str, nn.Module], length: int) -> dict[str, nn.ModuleList]:
    """Sibling ModuleLists of `length` bare Linears each, in declaration order."""
    return {n: c for n, c in children.items() if isinstance(c, nn.ModuleList) and len(c) == length
            and all(isinstance(e, nn.Linear) for e in c)}


def _linears(mod: nn.Module) -> list[nn.Module]:
    out = []
    for sub in mod.modules():
        p = _own_params(sub)
        if "weight" in p and p["weight"].dim() == 2:
            out.append(sub)
    return out


def _stacked_readings(params: dict[str, torch.Tensor], num_experts: int, hidden: int) -> Iterator[ExpertWeights]:
    """Every consistent reading of two stacked tensors, made one at a time (some copy weights)."""
    threes = [t for t in params.values() if t.dim() == 3]
    twos = [t for t in params.values() if t.dim() == 2 and t.shape[0] == num_experts]
    if len(threes) == 3 and not twos:
        yield from _separate_readings(threes, hidden)
        return
    if len(threes) != 2:
        return
    for w_in, w_out in itertools.permutations(threes):
        for in_t in (False, True):
            if (w_in.shape[1] if in_t else w_in.shape[2]) != hidden:
                continue
            gu = w_in.transpose(1, 2) if in_t else w_in  # [E, X, H]
            for out_t in (False, True):
                if (w_out.shape[2] if out_t else w_out.shape[1]) != hidden:
                    continue
                down = w_out.transpose(1, 2) if out_t else w_out  # [E, H, I]
                x_dim, i_dim = gu.shape[1], down.shape[2]
                b_ins = [b for b in twos if b.shape[1] == x_dim] or [None]
                b_outs = [b for b in twos if b.shape[1] == hidden] or [None]
                for b_in, b_out in itertools.product(b_ins, b_outs):
                    if b_in is not None and b_in is b_out:
                        continue
                    if twos and not any(b is not None for b in (b_in, b_out)):
                        continue
                    desc = f"in{'ᵀ' if in_t else ''}/out{'ᵀ' if out_t else ''}"
                    as_read = ([[w_in]] if gu is w_in else None), ([[w_out]] if down is w_out else None)
                    if x_dim == 2 * i_dim:
                        yield ExpertWeights(gu, down, b_in, b_out, True, desc + " gate|up", *as_read)
                        bi = None if b_in is None else deinterleave_gate_up(b_in.unsqueeze(-1)).squeeze(-1)
                        yield ExpertWeights(deinterleave_gate_up(gu), down, bi, b_out, True, desc + " interleaved",
                                            None, as_read[1])
                    if x_dim == i_dim:
                        yield ExpertWeights(gu, down, b_in, b_out, False, desc + " plain", *as_read)


def _separate_readings(threes: list[torch.Tensor], hidden: int) -> Iterator[ExpertWeights]:
    """Gate, up and down stacked separately ([E, I, H] or [E, H, I] each, no biases): gate and up are
    concatenated into the canonical [E, 2I, H], every assignment of the three roles tried."""
    for gate, up, down in itertools.permutations(threes):
        if gate.shape != up.shape:
            continue
        for in_t in (False, True):
            if (gate.shape[1] if in_t else gate.shape[2]) != hidden:
                continue
            g, u = (gate.transpose(1, 2), up.transpose(1, 2)) if in_t else (gate, up)  # [E, I, H]
            for out_t in (False, True):
                d = down.transpose(1, 2) if out_t else down  # [E, H, I]
                if d.shape[1] != hidden or d.shape[2] != g.shape[1]:
                    continue
                desc = f"separate gate/up{'ᵀ' if in_t else ''}/down{'ᵀ' if out_t else ''}"
                yield ExpertWeights(torch.cat([g, u], dim=1), d, None, None, True, desc, None,
                                    None if out_t else [[down]])


def _list_readings(experts: nn.ModuleList, hidden: int) -> Iterator[ExpertWeights]:
    """Stack a ModuleList's linears, one assignment of roles (gate, up, down) at a time."""
    per_expert = [_linears(e) for e in experts]
    n = len(per_expert[0])
    if any(len(ls) != n for ls in per_expert) or n not in (2, 3):
        return
    for order in itertools.permutations(range(n)):
        ins, down_i = order[:-1], order[-1]
        ok = True
        for ls in per_expert:
            if ls[down_i].weight.shape[0] != hidden or any(ls[i].weight.shape[1] != hidden for i in ins):
                ok = False
        if not ok or per_expert[0][down_i].weight.shape[1] * (2 if n == 3 else 1) != sum(
                per_expert[0][i].weight.shape[0] for i in ins):
            continue
        gated = n == 3
        w_gu = torch.stack([torch.cat([ls[i].weight for i in ins], 0) for ls in per_expert]).detach()
        w_d = torch.stack([ls[down_i].weight for ls in per_expert]).detach()
        if w_d.shape[2] * (2 if gated else 1) != w_gu.shape[1]:
            continue
        has_b = [all(getattr(ls[i], "bias", None) is not None for i in ins) for ls in per_expert]
        b_gu = (
            torch.stack([torch.cat([ls[i].bias for i in ins], 0) for ls in per_expert]).detach() if all(has_b) else None
        )
        b_d = (
            torch.stack([ls[down_i].bias for ls in per_expert]).detach()
            if all(getattr(ls[down_i], "bias", None) is not None for ls in per_expert)
            else None
        )
        yield ExpertWeights(w_gu, w_d, b_gu, b_d, gated, f"module list order {order}",
                            [[ls[i].weight for i in ins] for ls in per_expert], [[ls[down_i].weight] for ls in per_expert])


def _stack_codes(table: WeightCodes, parts: Optional[list[list[torch.Tensor]]]) -> Optional[QuantizedWeight]:
    """Pre-quantized weights' codes (packed checkpoint, fold_weight_qdq), stacked like the weights."""
    if parts is None:
        return None
    codes = [[table.get(w) for w in row] for row in parts]
    if any(c is None for row in codes for c in row):
        return None
    if len(codes) == 1 and len(codes[0]) == 1:
        return codes[0][0]
    spec = codes[0][0].spec

    def cat(field):
        if getattr(codes[0][0], field) is None:
            return None
        return torch.cat([torch.cat([getattr(c, field) for c in row], 1) for row in codes], 0)

    return QuantizedWeight(cat("codes"), cat("scales"), cat("zero_points"), spec)


def expert_codes(table: WeightCodes, reading: ExpertWeights) -> Optional[QuantizedExperts]:
    """The reading's pre-quantized codes, when every expert weight it stacks has them."""
    if not len(table):
        return None
    gate_up, down = _stack_codes(table, reading.gate_up_sources), _stack_codes(table, reading.down_sources)
    return QuantizedExperts(gate_up, down) if gate_up is not None and down is not None else None


def _collect_hints(sources: list[Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}

    def first(names, kind):
        for s in sources:
            for n in names:
                v = getattr(s, n, None)
                if isinstance(v, kind) and not isinstance(v, bool) or (kind is bool and isinstance(v, bool)):
                    return v
        return None

    hints["top_k"] = first(_TOPK_ATTRS, int)
    hints["renormalize"] = first(_RENORM_ATTRS, bool)
    scale = first(_SCALE_ATTRS, (int, float))
    hints["scale"] = float(scale) if scale is not None else None
    hints["n_group"] = first(_NGROUP_ATTRS, int)
    hints["topk_group"] = first(_TOPKGROUP_ATTRS, int)
    alpha = first(("alpha", "swiglu_alpha"), (int, float))
    limit = first(("limit", "swiglu_limit"), (int, float))
    hints["alpha"] = None if alpha is None else float(alpha)
    hints["limit"] = None if limit is None else float(limit)
    return hints


# ----------------------------------------------------------------------------- inputs


def layer_probes(x: torch.Tensor) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    std = float(x.float().std()) or 1.0
    rand = torch.randn(x.shape, generator=gen).to(x.dtype) * std
    one = x.reshape(-1, x.shape[-1])[:1].reshape((1,) * (x.dim() - 1) + (x.shape[-1],))
    return [x, rand, one, rand * 8]


# ----------------------------------------------------------------------------- matching


def _activation_candidates(anatomy: Anatomy, gated: bool) -> list[tuple[str, float, float, float]]:
    """(activation, alpha, beta, limit) tuples, hinted ones first."""
    h = anatomy.hints
    out: list[tuple[str, float, float, float]] = []
    if gated and h.get("alpha") is not None:  # GPT-OSS: gate * sigmoid(alpha * gate) * (up + 1), clamped
        limit = h["limit"] if h.get("limit") is not None else math.inf
        out.append(("swiglu", h["alpha"], 1.0, limit))
    elif gated and h.get("limit") is not None:  # HY-V4: silu(gate) * up with the same clamps
        out.append(("swiglu", 1.0, 0.0, h["limit"]))
    for f in anatomy.activation_hints if gated else []:  # Inkling 2: tanh caps on the gate and up factors
        caps = [getattr(getattr(f, name, None), "softcap", None) for name in ("gate_softcap", "up_softcap")]
        if all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in caps):
            out.append(("swiglu_softcap", float(caps[0]), 0.0, float(caps[1])))
    grid = torch.linspace(-6, 6, 241)
    names = list(PLAIN_ACTIVATIONS)
    hinted = []
    for f in anatomy.activation_hints:
        try:
            with torch.no_grad():
                y = f(grid)
        except Exception:
            continue
        for n in names:
            if isinstance(y, torch.Tensor) and torch.allclose(y, apply_activation(grid, n), atol=1e-6):
                hinted.append(n)
    # rare activations are tried only when the layer names them: each unhinted one multiplies the search
    for n in hinted + [n for n in names if n not in hinted and n not in HINTED_ONLY]:
        out.append((n, 1.0, 0.0, math.inf))
    return out


def _route_candidates(anatomy: Anatomy) -> list[tuple[Optional[RouteSpec], Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """(spec, router_bias, selection_bias). spec None = keep the router as written."""
    h = anatomy.hints
    e = anatomy.num_experts
    ks = [h["top_k"]] if h.get("top_k") and h["top_k"] <= e else []
    ks += [k for k in list(range(1, min(e, 8) + 1)) + [e] if k not in ks]
    renorms = [h["renormalize"]] if h.get("renormalize") is not None else [True, False]
    scale = h["scale"] if h.get("scale") else 1.0
    groups = [(1, 1)]
    if h.get("n_group") and h["n_group"] > 1 and e % h["n_group"] == 0:
        groups.insert(0, (h["n_group"], h.get("topk_group") or 1))
    # Each [E] tensor is either added to the logits (router bias) or only steers selection.
    biases = anatomy.router_biases[:2]
    bias_roles: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = [(None, None)]
    if len(biases) == 1:
        bias_roles = [(biases[0], None), (None, biases[0])]
    elif len(biases) == 2:
        bias_roles = [(biases[0], biases[1]), (biases[1], biases[0])]
    out = []
    for k in ks:
        for scoring in ("softmax", "sigmoid"):
            for renorm in renorms:
                for (ng, tg) in groups:
                    for rb, sb in bias_roles:
                        for select_on in ("scores", "logits"):
                            spec = RouteSpec(scoring, k, renorm, ng, tg, scale, sb is not None, select_on)
                            out.append((spec, rb, sb))
    if scale != 1.0:  # the hint may belong to the block, past the router (then match_layer scales the pin)
        out += [(replace(spec, scale=1.0), rb, sb) for spec, rb, sb in out]
    if anatomy.router is not None:
        out.append((None, None, None))
    return out


def _router_decisions(anatomy: Anatomy, probes: list[torch.Tensor]) -> Optional[list[dict[str, torch.Tensor]]]:
    """What the router module itself decides, when its outputs say so: ids+weights, or dense scores."""
    if anatomy.router is None:
        return None
    decisions = []
    with torch.no_grad():
        for p in probes:
            flat = p.reshape(-1, anatomy.hidden)
            try:
                outs = anatomy.router(flat)
            except Exception:
                return None
            try:
                ids, weights = pick_router_outputs(outs)
                decisions.append({"ids": ids, "weights": weights})
                continue
            except ValueError:
                pass
            items = outs if isinstance(outs, (tuple, list)) else (outs,)
            logits = torch.nn.functional.linear(flat, anatomy.router_weight)
            dense = [
                t for t in items
                if isinstance(t, torch.Tensor) and t.shape == logits.shape
                and compare_tensors(t, logits).rel_l2 > MATCH_TOL
                and not any(compare_tensors(t, logits + b).rel_l2 <= MATCH_TOL for b in anatomy.router_biases)
            ]
            if len(dense) != 1:
                return None  # a plain Linear router: logits only
            decisions.append({"dense": dense[0]})
    return decisions


def _route_reproduces(route: RouteSpec, rb, sb, anatomy: Anatomy, probes, decisions) -> bool:
    with torch.no_grad():
        for p, d in zip(probes, decisions):
            flat = p.reshape(-1, anatomy.hidden)
            logits = torch.nn.functional.linear(flat, anatomy.router_weight, rb)
            ids, w = route_reference(logits, sb, route.scoring, route.top_k, route.renormalize,
                                     route.n_group, route.topk_group, route.scale, route.select_on == "logits")
            if "dense" in d:
                got = torch.zeros_like(logits).scatter(1, ids, w)
                if compare_tensors(d["dense"], got).rel_l2 > MATCH_TOL:
                    return False
                continue
            if d["ids"].shape != ids.shape:
                return False
            ref_ids, order = d["ids"].sort(dim=-1)
            got_ids, got_order = ids.sort(dim=-1)
            if not torch.equal(ref_ids, got_ids):
                return False
            if compare_tensors(d["weights"].gather(1, order), w.gather(1, got_order)).rel_l2 > MATCH_TOL:
                return False
    return True


def match_layer(path: str, original: nn.Module, anatomy: Anatomy, x: torch.Tensor,
                call: Optional[LayerCall] = None,
                codes: Optional[WeightCodes] = None) -> tuple[FusionOutcome, Optional[FusedMoE]]:
    call = call or LayerCall()
    probes = layer_probes(x)
    with torch.no_grad():
        try:
            expected = [original(*call.args(p)) for p in probes]
        except Exception as exc:  # the layer itself can't run on probe shapes
            return FusionOutcome(path, False, f"original layer failed on probe inputs: {exc}"), None
    first = expected[0]
    main0 = first[0] if isinstance(first, (tuple, list)) else first
    if not isinstance(main0, torch.Tensor):
        return FusionOutcome(path, False, "layer output is not a tensor or a tuple starting with one"), None
    flatten = main0.shape != x.shape and main0.numel() == x.numel()
    n_aux = len(first) - 1 if isinstance(first, (tuple, list)) else 0

    shared_variants = [(None, None)]
    if anatomy.shared is not None:
        shared_variants = [(anatomy.shared, anatomy.shared_gate)]
    elif anatomy.shared_gate is not None:
        return FusionOutcome(path, False, "a [1, H] shared gate without a shared expert"), None

    # When the router exposes its decision, pin the routing rule against the router alone
    # (cheap), so the joint search below only varies the experts' reading.
    routes = _route_candidates(anatomy)
    decisions = _router_decisions(anatomy, probes)
    tried = 0
    if decisions is not None:
        pinned = []
        for route, rb, sb in routes:
            if route is None:
                continue
            tried += 1
            if _route_reproduces(route, rb, sb, anatomy, probes, decisions):
                pinned = [(route, rb, sb)]
                # a scaling factor the block applies to the routed output, past its router (MiniMax-M3)
                block_scale = _collect_hints([original])["scale"] or 1.0
                if block_scale != 1.0:
                    pinned.append((replace(route, scale=route.scale * block_scale), rb, sb))
                break
        keep_router = [(None, None, None)] if "ids" in decisions[0] else []
        routes = pinned + keep_router
        if not routes:
            return _no_match(path, tried, math.inf, "the router's decisions match no known routing rule"), None

    best = math.inf
    for route, rb, sb in routes:
        for reading in anatomy.expert_readings():
            i_dim = reading.w_down.shape[2]
            for woi, (act, alpha, beta, limit) in itertools.product(
                (False, True), _activation_candidates(anatomy, reading.gated)
            ):
                xs = ExpertsSpec(anatomy.num_experts, anatomy.hidden, i_dim, act, reading.gated, alpha, beta, limit,
                                 reading.b_gate_up is not None or reading.b_down is not None, woi)
                for shared, gate in shared_variants:
                    tried += 1
                    if tried > MAX_CANDIDATES:
                        return _no_match(path, tried - 1, best), None
                    spec = LayerSpec(route, xs, shared is not None, gate is not None, OutputSpec(flatten),
                                     anatomy.post_norm is not None, anatomy.output_bias is not None)
                    fused = FusedMoE(
                        spec, anatomy.router_weight if route is not None else None, rb, sb,
                        reading.w_gate_up, reading.w_down, reading.b_gate_up, reading.b_down,
                        shared, gate, anatomy.router if route is None else None, post_norm=anatomy.post_norm,
                        output_bias=anatomy.output_bias,
                    )
                    err, aux = _check(fused, probes, expected, n_aux)
                    best = min(best, err)
                    if err <= MATCH_TOL and aux is not None:
                        fused.spec = replace(spec, output=OutputSpec(flatten, aux))
                        fused.quantized = expert_codes(codes or WeightCodes(), reading)
                        return FusionOutcome(path, True, spec=fused.spec, candidates_tried=tried), fused
    return _no_match(path, tried, best), None


def experts_probes(given: ExpertsInputs, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The call the model made, the same routing on random hidden states, random routing at 8x magnitude,
    routing that repeats an id and weighs below zero, and one token."""
    gen = torch.Generator().manual_seed(1234)
    h, ids, w = given.hidden, given.ids, given.weights
    std = float(h.float().std()) or 1.0
    rand = (torch.randn(h.shape, generator=gen) * std).to(h.dtype)
    k = ids.shape[1]
    rand_ids = torch.rand(h.shape[0], num_experts, generator=gen).argsort(dim=-1)[:, :k].to(ids.dtype)
    rand_w = (torch.rand(ids.shape, generator=gen) + 0.1).to(w.dtype)
    repeated = torch.cat([rand_ids[:, :1]] * k, dim=1)
    signed = torch.randn(ids.shape, generator=gen).to(w.dtype)
    return [(h, ids, w), (rand, ids, w), (rand * 8, rand_ids, rand_w), (rand, repeated, signed), (h[:1], ids[:1], w[:1])]


def match_experts(path: str, original: nn.Module, anatomy: Anatomy, given: ExpertsInputs,
                  codes: Optional[WeightCodes] = None) -> tuple[FusionOutcome, Optional[FusedMoE]]:
    """Experts on their own: a FusedMoE with a GivenRouting router that reproduces `original(hidden, ids,
    weights)` on the call the model made and on probes around it."""
    hidden = given.hidden.shape[-1]
    probes = experts_probes(given, anatomy.num_experts)
    with torch.no_grad():
        try:
            expected = [original(h, i, w) for h, i, w in probes]
        except Exception as exc:
            return FusionOutcome(path, False, f"original experts failed on probe inputs: {exc}"), None
    router = GivenRouting(int(given.ids.shape[1]))
    tried, best = 0, math.inf
    for reading in anatomy.readings_for(hidden):
        for woi, (act, alpha, beta, limit) in itertools.product((False, True), _activation_candidates(anatomy, reading.gated)):
            tried += 1
            if tried > MAX_CANDIDATES:
                return _no_match(path, tried - 1, best), None
            xs = ExpertsSpec(anatomy.num_experts, hidden, reading.w_down.shape[2], act, reading.gated, alpha, beta,
                             limit, reading.b_gate_up is not None or reading.b_down is not None, woi)
            spec = LayerSpec(None, xs)
            fused = FusedMoE(spec, None, None, None, reading.w_gate_up, reading.w_down, reading.b_gate_up,
                             reading.b_down, router=router)
            worst = 0.0
            with torch.no_grad():
                for (h, i, w), exp in zip(probes, expected):
                    router.decision = (i, w)
                    try:
                        worst = max(worst, compare_tensors(exp, fused(h)).rel_l2)
                    except Exception:
                        worst = math.inf
                    finally:
                        router.decision = None
                    if worst > MATCH_TOL:
                        break
            best = min(best, worst)
            if worst <= MATCH_TOL:
                fused.quantized = expert_codes(codes or WeightCodes(), reading)
                return FusionOutcome(path, True, spec=spec, candidates_tried=tried), fused
    return _no_match(path, tried, best), None


def _no_match(path: str, tried: int, best: float, why: str = "") -> FusionOutcome:
    why = why or f"no candidate semantics reproduced the layer (tried {tried}; closest relative error {best:.3g})"
    return FusionOutcome(
        path, False, why,
        candidates_tried=tried, closest_error=None if not math.isfinite(best) else best,
    )


def _check(fused: FusedMoE, probes, expected, n_aux: int) -> tuple[float, Optional[tuple[str, ...]]]:
    worst = 0.0
    aux_names: Optional[tuple[str, ...]] = None
    with torch.no_grad():
        for p, exp in zip(probes, expected):
            try:
                out, ids, weights, logits = fused.compute(p.reshape(-1, fused.spec.experts.hidden))
            except Exception:
                return math.inf, None
            main = exp[0] if isinstance(exp, (tuple, list)) else exp
            got = fused.finish(p, out, ids, weights, logits)  # post-norm and shape; no aux items yet
            err = compare_tensors(main, got).rel_l2
            worst = max(worst, err)
            if worst > MATCH_TOL:
                return worst, None
            if n_aux and aux_names is None:
                aux_names = _match_aux(exp[1:], ids, weights, logits)
                if aux_names is None:
                    return math.inf, None
    return worst, (aux_names or ())


def _match_aux(items, ids, weights, logits) -> Optional[tuple[str, ...]]:
    known = {"topk_ids": ids, "topk_weights": weights}
    if logits is not None:
        known["logits"] = logits
        known["dense_scores"] = torch.zeros_like(logits).scatter(1, ids, weights.to(logits.dtype))
    names = []
    for item in items:
        hit = None
        for name, t in known.items():
            if isinstance(item, torch.Tensor) and item.shape == t.shape and compare_tensors(item, t).rel_l2 <= MATCH_TOL:
                hit = name
                break
        if hit is None:
            return None
        names.append(hit)
    return tuple(names)


class CalledLike(nn.Module):
    """Adapts a FusedMoE to a layer that was called with extra size arguments."""

    def __init__(self, fused: FusedMoE, call: LayerCall):
        super().__init__()
        self.fused = fused
        self.tensor_index = call.tensor_index

    def forward(self, *args):
        return self.fused(args[self.tensor_index])

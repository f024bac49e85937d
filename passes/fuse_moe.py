"""fuse_moe: rewrite every recognizable MoE layer into one canonical `FusedMoE`.

Matches: a submodule with stacked 3-D expert weights (on itself, a child, or one per sibling child) or a
  ModuleList of expert MLPs (or parallel ModuleLists of Linears), and a router found by ROUTER_RULES
  (passes/fusion_rules.py: an [E, H] or [H, E] weight on a child, nested or not, or on the module itself);
  optionally one dense shared-expert child and a ``[1, H]`` sigmoid shared gate, one child whose parameters
  are all ``[H]`` vectors (a norm on the output, A.X-K1), and an ``[H]`` output bias (JetMoE).
  Which module does what is decided by parameter shapes and by what the module computes, never by class
  names; attribute values (``top_k``, ``norm_topk_prob``, ``routed_scaling_factor``, ``act_fn`` ...) only
  order the settings to try. A module with stacked experts and no router, called as
  ``experts(hidden, ids, weights)``, is fused on its own and takes its caller's routing (`ExpertsOnly`).
Produces: for each match, a `FusedMoE` (router Linear -> ``moec.route`` -> ``moec.experts`` [+ shared])
  whose spec is the first reading that reproduces the original module on probe inputs (the layer's real
  inputs captured from the model's example run, random inputs of the same scale, one token, and 8x
  magnitude) within 1e-5 relative L2. Expert readings (EXPERT_RULES) and routing rules (ROUTING_RULES) are
  tried one after the other: an expert reading is kept when the layer's output is a mixture of its experts
  (passes/mixture.py), and the routing rules are matched against that mixture's weights. A router whose
  decisions match no rule (PhiMoE's sparse mixer) is kept as written; its (ids, weights) feed ``moec.experts``.
  Every layer's report lists the rules tried and what came of each.
Refuses (layer left unfused, with the reason and the rules tried in the report): modules whose forward takes
  more than the hidden states, extra unrecognized parameters, and layers no reading reproduces.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moec.activations import PLAIN_ACTIVATIONS, apply_activation
from moec.moe_layer import (ExpertsOnly, ExpertsSpec, FusedMoE, GivenRouting, LayerSpec, OutputSpec,
                             QuantizedExperts, RouteSpec, pick_router_outputs)
from moec.numerics import compare_tensors
from moec.ops import route_reference
from moec.passes import mixture
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import MOE_FUSED
from moec.passes import fusion_rules
from moec.passes.fusion_rules import ExpertSource, ExpertWeights, RoutingRule, expert_readings, linears, own_params
from moec.passes.layers import ExpertsInputs, LayerCall, capture_inputs, set_submodule
from moec.passes.outcomes import FusionOutcome, RuleTrial
from moec.quant import QuantizedWeight, WeightCodes, dequantize

MATCH_TOL = 1e-5
ROUTING_SCREEN_TOL = 1e-4  # a routing's output from the experts' computed outputs: a loose screen; the layer check decides
NOT_CALLED = "not executed by the example inputs"  # MoE-shaped, but the model never called it as a layer
HINTED_ONLY = ("relu2",)  # activations tried only when an act_fn of the layer computes them
# Pairs of (expert reading, routing) checked together, where the output isn't linear in the routing weights
# (experts scaling their input, an output norm, hidden too narrow to solve for): each pair runs the layer.
JOINT_LIMIT = 2000

_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected", "experts_per_token")
_RENORM_ATTRS = ("norm_topk_prob", "renormalize", "normalize")
_SCALE_ATTRS = ("routed_scaling_factor", "router_scaling_factor", "scaling_factor", "route_scale")
_NGROUP_ATTRS = ("n_group", "num_group", "num_groups", "n_groups")
_TOPKGROUP_ATTRS = ("topk_group", "topk_groups")
_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


@dataclass
class Anatomy:
    """What a candidate module is made of, found from parameter shapes."""

    num_experts: int
    hidden: int  # 0 for experts on their own: their width is read from the hidden states they are called with
    router: Optional[nn.Module]  # child module acting as router (None: weight on the module)
    router_name: Optional[str]
    router_weight: Optional[torch.Tensor]
    router_biases: list[torch.Tensor]  # [E] tensors that may be router bias or selection bias
    source: ExpertSource  # where the expert weights sit; fusion_rules.EXPERT_RULES read it
    experts_name: Optional[str]
    activation_hints: list[Any] = field(default_factory=list)
    shared: Optional[nn.Module] = None
    shared_gate: Optional[nn.Module] = None
    hints: dict[str, Any] = field(default_factory=dict)
    post_norm: Optional[nn.Module] = None  # a child whose parameters are all [H] vectors: a norm
    output_bias: Optional[torch.Tensor] = None  # the module's own [H] vector, added to its output
    router_rules: tuple[RuleTrial, ...] = ()  # the ROUTER_RULES tried, in order

    @property
    def experts_only(self) -> bool:
        """No router: the caller decides the routing and passes it in."""
        return self.router_weight is None

    def expert_readings(self, hidden: int = 0) -> Iterator[ExpertWeights]:
        return (reading for _, reading in expert_readings(self.source, hidden or self.hidden))


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
        # The codes now live in the fused layers; the table would keep every superseded weight alive. With
        # --quant-dense a pre-quantized checkpoint's dense Linears keep theirs (quantize_dense folds them).
        ctx.weight_codes.keep_only(m.weight for m in module.modules() if type(m) is nn.Linear
                                   and ctx.options.get("quant_dense"))
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


def _find_experts(mod: nn.Module) -> tuple[Optional[ExpertSource], Optional[str], list[str]]:
    """Where the expert weights sit: (source, the child holding them, every child holding some)."""
    children = dict(mod.named_children())
    own = own_params(mod)
    if sum(t.dim() == 3 for t in own.values()) >= 2:
        return _stacked_source(own), None, []
    for name, child in children.items():
        cp = own_params(child)
        # stacked experts: >= 2 three-dim tensors, and no parameters further down (an act_fn child is fine)
        if sum(t.dim() == 3 for t in cp.values()) >= 2 and all(not own_params(c) for c in child.children()):
            return _stacked_source(cp), name, [name]
        if isinstance(child, nn.ModuleList) and len(child) >= 1 and all(linears(e) for e in child):
            parallel = _parallel_lists(children, len(child))
            if len(parallel) >= 2:  # w1[e], w2[e] (, w3[e]): one ModuleList of Linears per role
                regrouped = nn.ModuleList([nn.ModuleList([lst[e] for lst in parallel.values()])
                                           for e in range(len(child))])
                return ExpertSource(len(child), expert_list=regrouped), name, list(parallel)
            return ExpertSource(len(child), expert_list=child), name, [name]
    # one stacked tensor per sibling child (JetMoE's input_linear / output_linear)
    singles = {n: next(iter(own_params(c).items())) for n, c in children.items()
               if len(own_params(c)) == 1 and next(iter(own_params(c).values())).dim() == 3
               and all(not own_params(g) for g in c.children())}
    if len(singles) >= 2 and len({t.shape[0] for _, t in singles.values()}) == 1:
        return _stacked_source({f"{n}.{k}": t for n, (k, t) in singles.items()}), next(iter(singles)), list(singles)
    return None, None, []


def _stacked_source(params: dict[str, torch.Tensor]) -> Optional[ExpertSource]:
    threes = [t for t in params.values() if t.dim() == 3]
    if any(t.shape[0] != threes[0].shape[0] for t in threes):
        return None
    return ExpertSource(threes[0].shape[0], stacked=params)


def analyze(mod: nn.Module) -> Anatomy | str | None:
    """None: not a MoE layer. str: looks like one but can't be read (the reason)."""
    source, experts_name, expert_names = _find_experts(mod)
    if source is None:
        return None
    num_experts = source.num_experts
    own = own_params(mod)
    on_self = experts_name is None  # stacked on the module itself
    trials: list[RuleTrial] = []
    router = None
    for rule in fusion_rules.ROUTER_RULES:
        found = rule.find(mod, expert_names, num_experts)
        if isinstance(found, str):
            trials.append(RuleTrial("router", rule.name, "failed", found))
            continue
        trials.append(RuleTrial("router", rule.name, "matched", found.name or "the layer's own parameter"))
        router = found
        break
    if router is None:
        if on_self and num_experts >= 2 and _called_like_experts(mod) and _some_reading(source):
            return Anatomy(num_experts, 0, None, None, None, [], source, None,
                           activation_hints=_activation_hints([mod]),
                           hints=_collect_hints([mod, getattr(mod, "config", None)]), router_rules=tuple(trials))
        return None  # stacked weights without a router: not a MoE layer we know
    hidden = router.weight.shape[1]
    if source.stacked is not None:
        # The router's own [E, H] weight may sit beside stacked expert weights (GShard style).
        mine = [router.weight, router.stored] + router.biases
        source = ExpertSource(num_experts, stacked={k: v for k, v in source.stacked.items()
                                                    if all(v is not t for t in mine)})
    if next(expert_readings(source, hidden), None) is None:
        return "expert weights found, but no reading of their shapes maps hidden -> intermediate -> hidden"

    shared, shared_gate, post_norm, extra = None, None, None, []
    for name, child in mod.named_children():
        if name in expert_names or name == router.name:
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
    output_bias = own_vectors[0] if len(own_vectors) == 1 and not on_self else None

    experts_child = mod.get_submodule(experts_name) if experts_name else None
    hint_sources = [mod, router.module, experts_child, getattr(mod, "config", None)]
    hints = _collect_hints([s for s in hint_sources if s is not None])
    act_holders = [experts_child] if experts_child is not None else []
    if source.expert_list is not None:
        act_holders = [source.expert_list[0]]
    act_holders.append(mod)
    activation_hints = _activation_hints([h for h in act_holders if h is not None])
    return Anatomy(
        num_experts, hidden, router.module, router.name, router.weight, router.biases, source, experts_name,
        activation_hints, shared, shared_gate, hints, post_norm, output_bias, tuple(trials),
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


def _some_reading(source: ExpertSource) -> bool:
    """Whether stacked tensors read as experts for some width they share (an experts module's hidden size is
    only known once it is called)."""
    widths = {d for t in source.threes() for d in t.shape[1:]}
    return any(next(expert_readings(source, h), None) is not None for h in widths)


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


def _stack_codes(table: WeightCodes, parts: Optional[list[list[torch.Tensor]]], transposed: bool,
                 rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Optional[QuantizedWeight]:
    """Pre-quantized weights' codes (packed checkpoint, fold_weight_qdq, MXFP4), stacked like the weights and
    with their rows reordered as the reading reordered the weight's."""
    if parts is None:
        return None
    codes = [[table.get(w, transposed) for w in row] for row in parts]
    if any(c is None for row in codes for c in row):
        return None
    spec = codes[0][0].spec

    def cat(field):
        if getattr(codes[0][0], field) is None:
            return None
        t = torch.cat([torch.cat([getattr(c, field) for c in row], 1) for row in codes], 0)
        return rows(t) if rows is not None else t

    return QuantizedWeight(cat("codes"), cat("scales"), cat("zero_points"), spec)


def expert_codes(table: WeightCodes, reading: ExpertWeights) -> Optional[QuantizedExperts]:
    """The reading's pre-quantized codes, when every expert weight it stacks has them."""
    if not len(table):
        return None
    gate_up = _stack_codes(table, reading.gate_up_sources, reading.gate_up_transposed, reading.gate_up_rows)
    down = _stack_codes(table, reading.down_sources, reading.down_transposed)
    if gate_up is None or down is None:
        return None
    # The codes were laid out by following the reading's transforms; they must give back exactly the weights
    # the reading (and so the validated layer) holds, or the artifact would compute another model.
    if not (torch.equal(dequantize(gate_up), reading.w_gate_up) and torch.equal(dequantize(down), reading.w_down)):
        return None
    return QuantizedExperts(gate_up, down)


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


@dataclass
class _Layer:
    """One layer being matched: its probes, what it returned on them, and the trail of rules tried."""

    path: str
    anatomy: Anatomy
    probes: list[torch.Tensor]
    expected: list[Any]
    flatten: bool
    n_aux: int
    codes: WeightCodes
    trials: list[RuleTrial]
    tried: int = 0  # readings checked against the layer's outputs
    best: float = math.inf

    def build(self, route, rb, sb, reading: ExpertWeights, act, woi: bool) -> FusedMoE:
        a = self.anatomy
        name, alpha, beta, limit = act
        xs = ExpertsSpec(a.num_experts, a.hidden, reading.w_down.shape[2], name, reading.gated, alpha, beta, limit,
                         reading.b_gate_up is not None or reading.b_down is not None, woi)
        spec = LayerSpec(route, xs, a.shared is not None, a.shared_gate is not None, OutputSpec(self.flatten),
                         a.post_norm is not None, a.output_bias is not None)
        return FusedMoE(spec, a.router_weight if route is not None else None, rb, sb, reading.w_gate_up, reading.w_down,
                        reading.b_gate_up, reading.b_down, a.shared, a.shared_gate, a.router if route is None else None,
                        post_norm=a.post_norm, output_bias=a.output_bias)

    def accept(self, fused: FusedMoE, reading: ExpertWeights) -> bool:
        """The whole layer checked on every probe (translation validation); on success the spec takes the extra
        outputs the layer returned and the reading's pre-quantized codes."""
        self.tried += 1
        err, aux = _check(fused, self.probes, self.expected, self.n_aux)
        self.best = min(self.best, err)
        if err > MATCH_TOL or aux is None:
            return False
        fused.spec = replace(fused.spec, output=OutputSpec(self.flatten, aux))
        fused.quantized = expert_codes(self.codes, reading)
        return True

    def fused(self, fused: FusedMoE) -> tuple[FusionOutcome, FusedMoE]:
        return FusionOutcome(self.path, True, spec=fused.spec, candidates_tried=self.tried,
                             rules=tuple(self.trials)), fused

    def refused(self, why: str = "") -> tuple[FusionOutcome, None]:
        return _no_match(self.path, self.tried, self.best, why, tuple(self.trials)), None


def match_layer(path: str, original: nn.Module, anatomy: Anatomy, x: torch.Tensor,
                call: Optional[LayerCall] = None,
                codes: Optional[WeightCodes] = None) -> tuple[FusionOutcome, Optional[FusedMoE]]:
    """The first reading of `anatomy` that reproduces `original` on probes around its real input `x`.

    Expert readings and routing rules are tried one after the other, not as pairs: each expert reading is
    checked by the mixture of experts it explains the layer's output as (passes/mixture.py), and the routing
    rules against that mixture's weights. Where the output is not linear in the routing weights, they are
    checked together (`_match_jointly`)."""
    call = call or LayerCall()
    probes = layer_probes(x)
    trials = list(anatomy.router_rules)
    with torch.no_grad():
        try:
            expected = [original(*call.args(p)) for p in probes]
        except Exception as exc:  # the layer itself can't run on probe shapes
            return FusionOutcome(path, False, f"original layer failed on probe inputs: {exc}", rules=tuple(trials)), None
    first = expected[0]
    main0 = first[0] if isinstance(first, (tuple, list)) else first
    if not isinstance(main0, torch.Tensor):
        return FusionOutcome(path, False, "layer output is not a tensor or a tuple starting with one",
                             rules=tuple(trials)), None
    if anatomy.shared is None and anatomy.shared_gate is not None:
        return FusionOutcome(path, False, "a [1, H] shared gate without a shared expert", rules=tuple(trials)), None
    layer = _Layer(path, anatomy, probes, expected, main0.shape != x.shape and main0.numel() == x.numel(),
                   len(first) - 1 if isinstance(first, (tuple, list)) else 0, codes or WeightCodes(), trials)

    # When the router exposes its decision, pin the routing rule against the router alone (cheap).
    routes = _route_candidates(anatomy)
    decisions = _router_decisions(anatomy, probes)
    if decisions is not None:
        pinned = []
        for route, rb, sb in routes:
            if route is None:
                continue
            layer.tried += 1
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
            trials.append(RuleTrial("routing", "the router's own decisions", "failed",
                                    "its dense scores match no routing rule"))
            return layer.refused("the router's decisions match no known routing rule")

    # The mixture screen reads the layer's output as [T, H] rows of its input's tokens: it needs both finite and
    # the output as many numbers as the input.
    mains = [e[0] if isinstance(e, (tuple, list)) else e for e in expected]
    screenable = anatomy.post_norm is None and all(
        isinstance(m, torch.Tensor) and m.numel() == p.numel() and bool(torch.isfinite(m).all()) and
        bool(torch.isfinite(p).all()) for m, p in zip(mains, probes))
    linear = screenable and mixture.solvable(anatomy.hidden, anatomy.num_experts, anatomy.shared is not None)
    pairs = None
    if linear:
        found, pairs = _match_by_mixture(layer, routes, decisions)
        if found is not None:
            return layer.fused(found)
        # Experts scaling their input by the routing weight: with SiLU nothing explained the output, so every
        # reading is checked with the weight on the input; with a homogeneous activation (ReLU, identity) the
        # reading that explained it is, the weight showing up as its power
        why = ("its experts read as a mixture, but no routing rule weighs them as the layer does" if pairs else
               "no reading explains the output as a mixture of the experts")
    elif anatomy.post_norm is not None:
        why = "the layer normalizes its output, so it is not linear in the routing weights"
    else:
        why = f"hidden size {anatomy.hidden} is too small to solve for {anatomy.num_experts} experts' weights"
    found = _match_jointly(layer, routes, decisions, (True,) if linear else (False, True), why, pairs or None,
                           screen=screenable)
    if found is not None:
        return layer.fused(found)
    return layer.refused(f"no candidate semantics reproduced the layer (tried {layer.tried}; closest relative error "
                         f"{layer.best:.3g}): {why}")


def _screen_inputs(layer: _Layer) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """Per probe, a few of its tokens [T, H], the layer's output on them (less its output bias), and the shared
    expert's output."""
    a = layer.anatomy
    flats = [p.reshape(-1, a.hidden)[: mixture.SCREEN_TOKENS] for p in layer.probes]
    targets = []
    for e in layer.expected:
        main = (e[0] if isinstance(e, (tuple, list)) else e).reshape(-1, a.hidden)[: mixture.SCREEN_TOKENS].float()
        targets.append(main - a.output_bias.float() if a.output_bias is not None else main)
    return flats, targets, [mixture.shared_output(a.shared, f) for f in flats]


def _bases(reading: ExpertWeights, act, flats: list[torch.Tensor]) -> list[torch.Tensor]:
    return [mixture.expert_outputs(f, reading.w_gate_up, reading.w_down, reading.b_gate_up, reading.b_down, act[0],
                                   reading.gated, *act[1:]) for f in flats]


def _match_by_mixture(layer: _Layer, routes, decisions) -> tuple[Optional[FusedMoE], list]:
    """EXPERT_RULES in order, each reading and activation screened by the mixture it explains the output as;
    a reading that explains it goes on to ROUTING_RULES. Returns the fused layer, or the (rule, reading,
    activation) triples that explained the output."""
    a = layer.anatomy
    flats, targets, shared = _screen_inputs(layer)
    explained = []
    for rule in fusion_rules.EXPERT_RULES:
        why = rule.applies(a.source)
        if why is not None:
            layer.trials.append(RuleTrial("experts", rule.name, "not applicable", why))
            continue
        closest, label, n = math.inf, "", 0
        for reading in rule.read(a.source, a.hidden):
            for act in _activation_candidates(a, reading.gated):
                n += 1
                layer.tried += 1
                try:
                    mix = mixture.solve(_bases(reading, act, flats), shared, targets)
                except RuntimeError:  # the solver refused (non-finite expert outputs): not this reading
                    continue
                if mix.residual < closest:
                    closest, label = mix.residual, f"{reading.layout}, {act[0]}"
                if mix.residual > MATCH_TOL:
                    continue
                found, routing = _match_routing(layer, reading, act, mix, routes, decisions, flats)
                layer.trials.append(RuleTrial("experts", rule.name, "matched",
                                              f"{reading.layout}, {act[0]}: the output is a mixture of these experts "
                                              f"(residual {mix.residual:.1e})"))
                layer.trials += routing
                if found is not None:
                    return found, explained
                explained.append((rule, reading, act))
        if n == 0:
            layer.trials.append(RuleTrial("experts", rule.name, "failed",
                                          "no orientation of its tensors maps hidden -> intermediate -> hidden"))
        elif not any(t.stage == "experts" and t.rule == rule.name for t in layer.trials):
            layer.trials.append(RuleTrial("experts", rule.name, "failed",
                                          f"{n} readings x activations; none explains the output as a mixture of the "
                                          f"experts (closest: {label}, residual {closest:.2g})"))
    return None, explained


def _routing_rule(route: Optional[RouteSpec]) -> RoutingRule:
    return next(r for r in fusion_rules.ROUTING_RULES if (route is None and r.scoring is None) or (
        route is not None and r.scoring == route.scoring and r.select_on == route.select_on))


def _describe(route: Optional[RouteSpec]) -> str:
    if route is None:
        return "the router's (ids, weights), kept as written"
    parts = [f"top-{route.top_k}", "renormalized" if route.renormalize else "not renormalized"]
    if route.n_group > 1:
        parts.append(f"{route.topk_group} of {route.n_group} groups")
    if route.has_selection_bias:
        parts.append("selection bias")
    if route.scale != 1.0:
        parts.append(f"scale {route.scale:g}")
    return ", ".join(parts)


def _runnable(routes, decisions) -> list:
    """The routes that can run: keeping the router as written needs it to hand out (ids, weights)."""
    keeps = bool(decisions) and "ids" in decisions[0]
    return [r for r in routes if r[0] is not None or keeps]


def _decided(anatomy: Anatomy, route: Optional[RouteSpec], rb, sb, decisions, flats: list[torch.Tensor]) -> list:
    """A route's (ids, weights) on the screening tokens of each probe."""
    if route is None:
        return [(d["ids"][: mixture.SCREEN_TOKENS], d["weights"][: mixture.SCREEN_TOKENS]) for d in decisions]
    with torch.no_grad():
        return [route_reference(F.linear(f, anatomy.router_weight, rb), sb, route.scoring, route.top_k,
                                route.renormalize, route.n_group, route.topk_group, route.scale,
                                route.select_on == "logits") for f in flats]


def _match_routing(layer: _Layer, reading: ExpertWeights, act, mix: mixture.Mixture, routes, decisions,
                   flats: list[torch.Tensor]) -> tuple[Optional[FusedMoE], list[RuleTrial]]:
    """ROUTING_RULES against the layer's output rebuilt from the experts' outputs already computed; a setting that
    agrees is then checked as the whole layer."""
    a = layer.anatomy
    trials = []
    runnable = _runnable(routes, decisions)
    for rule in fusion_rules.ROUTING_RULES:
        candidates = [c for c in runnable if _routing_rule(c[0]) is rule]
        if not candidates:
            trials.append(RuleTrial("routing", rule.name, "not applicable",
                                    "the router doesn't return (ids, weights)" if rule.scoring is None
                                    else "the router's own decisions follow another rule"))
            continue
        closest, screened = math.inf, 0
        for route, rb, sb in candidates:
            err = mixture.routing_error(mix, _decided(a, route, rb, sb, decisions, flats), a.num_experts)
            closest = min(closest, err)
            if err > ROUTING_SCREEN_TOL:
                continue
            screened += 1
            fused = layer.build(route, rb, sb, reading, act, False)
            if layer.accept(fused, reading):
                trials.append(RuleTrial("routing", rule.name, "matched", _describe(route)))
                return fused, trials
        layer.best = min(layer.best, closest)
        trials.append(RuleTrial("routing", rule.name, "failed",
                                f"{screened} of its {len(candidates)} settings rebuilt the output from the experts', "
                                f"but failed the whole-layer check (closest {layer.best:.2g}; extra outputs, later "
                                "tokens or ties)" if screened else
                                f"none of its {len(candidates)} settings gives the layer's output from its experts' "
                                f"outputs (closest relative error {closest:.2g})"))
    return None, trials


def _match_jointly(layer: _Layer, routes, decisions, woi_values: tuple[bool, ...], why: str, pairs=None,
                   screen: bool = False) -> Optional[FusedMoE]:
    """Readings and routings checked together where the mixture can't separate them: every (reading, activation)
    -- or only `pairs`, the ones that explained the output -- with every route, each pair checked as the whole
    layer (at most JOINT_LIMIT checks). With `screen`, routes without the weight on the input are first screened
    from the experts' outputs (no solve needed), reading by reading; what can't be screened is checked route
    by route, the hinted routes first."""
    a = layer.anatomy
    start = layer.tried
    runnable = _runnable(routes, decisions)

    def candidates():
        if pairs is not None:
            yield from pairs
            return
        for rule, reading in expert_readings(a.source, a.hidden):
            for act in _activation_candidates(a, reading.gated):
                yield rule, reading, act

    def check(route, rb, sb, rule, reading, act, woi) -> Optional[FusedMoE]:
        fused = layer.build(route, rb, sb, reading, act, woi)
        if not layer.accept(fused, reading):
            return None
        layer.trials.append(RuleTrial(
            "joint", f"{rule.name} x {_routing_rule(route).name}", "matched",
            f"{reading.layout}, {act[0]}{', weights on the input' if woi else ''}; {_describe(route)}"))
        return fused

    def out_of_checks() -> bool:
        if layer.tried - start < JOINT_LIMIT:
            return False
        layer.trials.append(RuleTrial("joint", "experts x routing", "failed",
                                      f"{why}; stopped after {JOINT_LIMIT} whole-layer checks"))
        return True

    unscreened = woi_values
    if screen and False in woi_values:
        unscreened = tuple(w for w in woi_values if w)
        flats, targets, shared = _screen_inputs(layer)
        decided = {}
        for i, (route, rb, sb) in enumerate(runnable):  # each route's decision, once
            try:
                decided[i] = _decided(a, route, rb, sb, decisions, flats)
            except RuntimeError:
                continue
        for rule, reading, act in candidates():
            try:
                mix = mixture.Mixture(_bases(reading, act, flats), shared, targets, math.nan)
            except RuntimeError:
                continue
            for i, d in decided.items():
                try:
                    if mixture.routing_error(mix, d, a.num_experts) > ROUTING_SCREEN_TOL:
                        continue
                except RuntimeError:
                    continue
                if out_of_checks():
                    return None
                found = check(*runnable[i], rule, reading, act, False)
                if found is not None:
                    return found
    for route, rb, sb in runnable:  # unscreened: route by route, as the hints order them
        for rule, reading, act in candidates():
            for woi in unscreened:
                if out_of_checks():
                    return None
                found = check(route, rb, sb, rule, reading, act, woi)
                if found is not None:
                    return found
    layer.trials.append(RuleTrial("joint", "experts x routing", "failed",
                                  f"{why}: {layer.tried - start} whole-layer checks, none reproduces the layer"))
    return None


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
    weights)` on the call the model made and on probes around it. The routing is given, so EXPERT_RULES are
    tried alone."""
    hidden = given.hidden.shape[-1]
    probes = experts_probes(given, anatomy.num_experts)
    trials = [RuleTrial("router", "routing given by the caller", "matched", "called as experts(hidden, ids, weights)")]
    with torch.no_grad():
        try:
            expected = [original(h, i, w) for h, i, w in probes]
        except Exception as exc:
            return FusionOutcome(path, False, f"original experts failed on probe inputs: {exc}", rules=tuple(trials)), None
    router = GivenRouting(int(given.ids.shape[1]))
    tried, best = 0, math.inf
    for rule in fusion_rules.EXPERT_RULES:
        why = rule.applies(anatomy.source)
        if why is not None:
            trials.append(RuleTrial("experts", rule.name, "not applicable", why))
            continue
        n, closest = 0, math.inf
        for reading in rule.read(anatomy.source, hidden):
            for woi, (act, alpha, beta, limit) in itertools.product((False, True),
                                                                    _activation_candidates(anatomy, reading.gated)):
                n += 1
                tried += 1
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
                closest = min(closest, worst)
                if worst <= MATCH_TOL:
                    fused.quantized = expert_codes(codes or WeightCodes(), reading)
                    trials.append(RuleTrial("experts", rule.name, "matched",
                                            f"{reading.layout}, {act}{', weights on the input' if woi else ''}"))
                    return FusionOutcome(path, True, spec=spec, candidates_tried=tried, rules=tuple(trials)), fused
        best = min(best, closest)
        trials.append(RuleTrial("experts", rule.name, "failed",
                                "no orientation of its tensors maps hidden -> intermediate -> hidden" if n == 0 else
                                f"{n} readings x activations; none reproduces the experts (closest relative error "
                                f"{closest:.2g})"))
    return _no_match(path, tried, best, "", tuple(trials)), None


def _no_match(path: str, tried: int, best: float, why: str = "", rules: tuple[RuleTrial, ...] = ()) -> FusionOutcome:
    why = why or f"no candidate semantics reproduced the layer (tried {tried}; closest relative error {best:.3g})"
    return FusionOutcome(
        path, False, why,
        candidates_tried=tried, closest_error=None if not math.isfinite(best) else best, rules=rules,
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

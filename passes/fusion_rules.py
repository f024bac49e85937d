"""The readings fuse_moe tries, declared as rules: where a layer's router sits, how its expert weights read,
and which routing it computes. Each rule says what it matches, checks it, and says why it fails; fuse_moe
tries them in order and the report lists, per layer, every rule tried and its result.

Adding a reading is one entry in ROUTER_RULES or EXPERT_RULES. A routing family whose scoring moec's route op
already computes (softmax, sigmoid; top-k over scores or logits) is one entry in ROUTING_RULES; a new scoring also
needs `moec.route` (moec/ops.py) and its lowerings to compute it.

Rules only read shapes; none of them decides on its own that a reading is right. fuse_moe checks each
reading against what the layer computes (the expert mixture it recovers, then the whole layer on probes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from moec.ops import deinterleave_gate_up


@dataclass
class ExpertWeights:
    """One candidate reading of the expert parameters, already in canonical layout."""

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    b_gate_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]
    gated: bool
    layout: str
    # The tensors each stacked weight was read from ([expert][part]): pre-quantized codes (WeightCodes) are
    # stacked the same way. None: the reading transforms them in a way the codes can't follow.
    gate_up_sources: Optional[list[list[torch.Tensor]]] = None
    down_sources: Optional[list[list[torch.Tensor]]] = None
    # Transforms the codes can follow: the sources read transposed (their codes must be attached for the
    # transposed view), and a reordering of the in-projection's rows (gate/up de-interleaved or swapped),
    # applied to codes, scales and zero points alike ([E, N, .]: rows are dim 1).
    gate_up_transposed: bool = False
    down_transposed: bool = False
    gate_up_rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


# ----------------------------------------------------------------------------- routers


def own_params(mod: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(mod.named_parameters(recurse=False))
    d.update({k: v for k, v in mod.named_buffers(recurse=False) if v is not None})
    return d


def subtree_params(mod: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(mod.named_parameters())
    d.update({k: v for k, v in mod.named_buffers() if v is not None})
    return d


@dataclass
class RouterFound:
    """Where a router's weight sits, read as [E, H]."""

    weight: torch.Tensor  # [E, H] (a transposed copy when stored [H, E])
    biases: list[torch.Tensor]  # [E] tensors that may be a router bias or a selection bias
    module: Optional[nn.Module] = None  # the child holding it (None: the layer's own parameter)
    name: Optional[str] = None
    stored: Optional[torch.Tensor] = None  # the layer's own tensor, when read transposed


@dataclass(frozen=True)
class RouterRule:
    name: str
    matches: str  # in words, for the report and the docs
    find: Callable[[nn.Module, list[str], int], "RouterFound | str"]  # (layer, expert children, E) -> found | why not


def _vectors(params: dict[str, torch.Tensor], num_experts: int, but: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[E] vectors (router or selection biases), also stored as [1, E] (Ernie 4.5's moe_statics)."""
    return [t.reshape(num_experts) for t in params.values()
            if tuple(t.shape) in ((num_experts,), (1, num_experts)) and t is not but]


def _child_router(transposed: bool):
    def find(layer: nn.Module, experts: list[str], num_experts: int) -> RouterFound | str:
        for name, child in layer.named_children():
            if name in experts:
                continue
            # a nested router (gate.wg) counts when that is all the child holds besides [E] vectors
            cp = own_params(child) if not list(child.children()) else subtree_params(child)
            rows = [t for t in cp.values() if t.dim() == 2 and t.shape[0] == num_experts]
            cols = [t for t in cp.values() if t.dim() == 2 and t.shape[1] == num_experts and t.shape[0] != num_experts]
            two = cols if transposed else rows
            if (rows if transposed else []) or len(two) != 1:
                continue
            vectors = _vectors(cp, num_experts, two[0])
            if len(two) + len(vectors) != len(cp):
                continue
            weight = two[0].detach().t().contiguous() if transposed else two[0]
            own = [t for t in own_params(layer).values() if t.dim() == 1 and t.shape[0] == num_experts]
            return RouterFound(weight, vectors + own, child, name)
        shape = "[H, E]" if transposed else "[E, H]"
        return f"no child other than the experts holds one {shape} weight and only [E] vectors besides"
    return find


def _own_router(transposed: bool):
    def find(layer: nn.Module, experts: list[str], num_experts: int) -> RouterFound | str:
        own = own_params(layer)
        rows = [t for t in own.values() if t.dim() == 2 and t.shape[0] == num_experts]
        # [E, E] stays ambiguous and unread
        cols = [t for t in own.values() if t.dim() == 2 and t.shape[1] == num_experts and t.shape[0] != num_experts]
        biases = [t for t in own.values() if t.dim() == 1 and t.shape[0] == num_experts]
        if not transposed and len(rows) == 1:
            return RouterFound(rows[0], biases)
        if transposed and not rows and len(cols) == 1:
            return RouterFound(cols[0].detach().t().contiguous(), biases, stored=cols[0])
        shape = "[H, E]" if transposed else "[E, H]"
        return f"the layer has {len(cols if transposed else rows)} own {shape} parameters (needs exactly one)"
    return find


ROUTER_RULES: tuple[RouterRule, ...] = (
    RouterRule("child [E, H]", "a child (an nn.Linear, or a module with the weight nested in it) holding one [E, H] "
               "weight and [E] bias/statistics vectors", _child_router(False)),
    RouterRule("child [H, E]", "a child holding one bare [H, E] parameter (x @ W) and [E] vectors", _child_router(True)),
    RouterRule("own [E, H]", "the layer's own [E, H] parameter, with [E] vectors beside it", _own_router(False)),
    RouterRule("own [H, E]", "the layer's own bare [H, E] parameter", _own_router(True)),
)


# ----------------------------------------------------------------------------- experts


@dataclass
class ExpertSource:
    """Where a layer's expert weights sit: stacked [E, ...] tensors by name, or one ModuleList entry per expert
    (parallel ModuleLists of Linears are regrouped into one)."""

    num_experts: int
    stacked: Optional[dict[str, torch.Tensor]] = None
    expert_list: Optional[nn.ModuleList] = None

    def threes(self) -> list[torch.Tensor]:
        return [t for t in (self.stacked or {}).values() if t.dim() == 3]

    def twos(self) -> list[torch.Tensor]:
        return [t for t in (self.stacked or {}).values() if t.dim() == 2 and t.shape[0] == self.num_experts]


@dataclass(frozen=True)
class ExpertRule:
    name: str
    matches: str
    applies: Callable[[ExpertSource], Optional[str]]  # None, or why the rule can't read this source
    read: Callable[[ExpertSource, int], Iterator[ExpertWeights]]  # (source, hidden) -> readings, lazily


def _needs_stacked(count: int, biases: bool = True):
    def applies(src: ExpertSource) -> Optional[str]:
        if src.stacked is None:
            return "the experts are a ModuleList, not stacked tensors"
        if len(src.threes()) != count:
            return f"needs {count} stacked [E, ., .] tensors; the experts have {len(src.threes())}"
        if not biases and src.twos():
            return "reads no biases; the experts have [E, n] tensors"
        return None
    return applies


def _two_stacked(src: ExpertSource, hidden: int):
    """Every orientation of two stacked tensors (which is the in-projection, transposed or not) and every
    assignment of [E, n] biases: (gate_up [E, X, H], down [E, H, I], b_in, b_out, description, as read)."""
    threes, twos = src.threes(), src.twos()
    for w_in, w_out in itertools.permutations(threes):
        for in_t in (False, True):
            if (w_in.shape[1] if in_t else w_in.shape[2]) != hidden:
                continue
            gu = w_in.transpose(1, 2) if in_t else w_in
            for out_t in (False, True):
                if (w_out.shape[2] if out_t else w_out.shape[1]) != hidden:
                    continue
                down = w_out.transpose(1, 2) if out_t else w_out
                b_ins = [b for b in twos if b.shape[1] == gu.shape[1]] or [None]
                b_outs = [b for b in twos if b.shape[1] == hidden] or [None]
                for b_in, b_out in itertools.product(b_ins, b_outs):
                    if b_in is not None and b_in is b_out:
                        continue
                    if twos and b_in is None and b_out is None:
                        continue
                    desc = f"in{'ᵀ' if in_t else ''}/out{'ᵀ' if out_t else ''}"
                    as_read = dict(gate_up_sources=[[w_in]], down_sources=[[w_out]], gate_up_transposed=in_t,
                                   down_transposed=out_t)
                    yield gu, down, b_in, b_out, desc, as_read


def _stacked_gate_up(src: ExpertSource, hidden: int) -> Iterator[ExpertWeights]:
    for gu, down, b_in, b_out, desc, as_read in _two_stacked(src, hidden):
        if gu.shape[1] == 2 * down.shape[2]:
            yield ExpertWeights(gu, down, b_in, b_out, True, desc + " gate|up", **as_read)


def _swap_halves(rows: torch.Tensor) -> torch.Tensor:
    """[E, 2I, .] up|gate rows -> gate|up."""
    i = rows.shape[1] // 2
    return torch.cat([rows[:, i:], rows[:, :i]], dim=1)


def _stacked_up_gate(src: ExpertSource, hidden: int) -> Iterator[ExpertWeights]:
    for gu, down, b_in, b_out, desc, as_read in _two_stacked(src, hidden):
        i = down.shape[2]
        if gu.shape[1] == 2 * i:
            bi = None if b_in is None else _swap_halves(b_in)
            yield ExpertWeights(_swap_halves(gu), down, bi, b_out, True, desc + " up|gate",
                                **as_read, gate_up_rows=_swap_halves)


def _stacked_interleaved(src: ExpertSource, hidden: int) -> Iterator[ExpertWeights]:
    for gu, down, b_in, b_out, desc, as_read in _two_stacked(src, hidden):
        if gu.shape[1] == 2 * down.shape[2]:
            bi = None if b_in is None else deinterleave_gate_up(b_in.unsqueeze(-1)).squeeze(-1)
            yield ExpertWeights(deinterleave_gate_up(gu), down, bi, b_out, True, desc + " interleaved",
                                **as_read, gate_up_rows=deinterleave_gate_up)


def _stacked_plain(src: ExpertSource, hidden: int) -> Iterator[ExpertWeights]:
    for gu, down, b_in, b_out, desc, as_read in _two_stacked(src, hidden):
        if gu.shape[1] == down.shape[2]:
            yield ExpertWeights(gu, down, b_in, b_out, False, desc + " plain", **as_read)


def _stacked_separate(src: ExpertSource, hidden: int) -> Iterator[ExpertWeights]:
    """Gate, up and down stacked separately ([E, I, H] or [E, H, I] each): gate and up are concatenated into the
    canonical [E, 2I, H], every assignment of the three roles tried."""
    for gate, up, down in itertools.permutations(src.threes()):
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
                yield ExpertWeights(torch.cat([g, u], dim=1), d, None, None, True, desc, None, [[down]],
                                    down_transposed=out_t)


def linears(mod: nn.Module) -> list[nn.Module]:
    """Every submodule with a 2-D `weight`, in declaration order."""
    out = []
    for sub in mod.modules():
        p = own_params(sub)
        if "weight" in p and p["weight"].dim() == 2:
            out.append(sub)
    return out


def _list_applies(src: ExpertSource) -> Optional[str]:
    if src.expert_list is None:
        return "the experts are stacked tensors, not a ModuleList"
    counts = {len(linears(e)) for e in src.expert_list}
    if len(counts) != 1 or counts.pop() not in (2, 3):
        return "each expert must hold the same number (2 or 3) of Linears"
    return None


def _list_readings(src: ExpertSource, hidden: int) -> Iterator[ExpertWeights]:
    """Stack a ModuleList's linears, one assignment of roles (gate, up, down) at a time."""
    per_expert = [linears(e) for e in src.expert_list]
    n = len(per_expert[0])
    for order in itertools.permutations(range(n)):
        ins, down_i = order[:-1], order[-1]
        if any(ls[down_i].weight.shape[0] != hidden or any(ls[i].weight.shape[1] != hidden for i in ins)
               for ls in per_expert):
            continue
        gated = n == 3
        if per_expert[0][down_i].weight.shape[1] * (2 if gated else 1) != sum(per_expert[0][i].weight.shape[0]
                                                                             for i in ins):
            continue  # checked before stacking: each stack copies the layer's weights
        w_gu = torch.stack([torch.cat([ls[i].weight for i in ins], 0) for ls in per_expert]).detach()
        w_d = torch.stack([ls[down_i].weight for ls in per_expert]).detach()
        if w_d.shape[2] * (2 if gated else 1) != w_gu.shape[1]:
            continue
        b_gu = (torch.stack([torch.cat([ls[i].bias for i in ins], 0) for ls in per_expert]).detach()
                if all(getattr(ls[i], "bias", None) is not None for ls in per_expert for i in ins) else None)
        b_d = (torch.stack([ls[down_i].bias for ls in per_expert]).detach()
               if all(getattr(ls[down_i], "bias", None) is not None for ls in per_expert) else None)
        yield ExpertWeights(w_gu, w_d, b_gu, b_d, gated, f"module list order {order}",
                            [[ls[i].weight for i in ins] for ls in per_expert], [[ls[down_i].weight] for ls in per_expert])


EXPERT_RULES: tuple[ExpertRule, ...] = (
    ExpertRule("stacked gate|up", "two stacked tensors, in-projection [E, 2I, H] (or [E, H, 2I]) with gate rows then "
               "up rows, out-projection [E, H, I] (or [E, I, H]), optional [E, n] biases",
               _needs_stacked(2), _stacked_gate_up),
    ExpertRule("stacked interleaved", "as stacked gate|up, with gate and up rows alternating (GPT-OSS)",
               _needs_stacked(2), _stacked_interleaved),
    ExpertRule("stacked ungated", "two stacked tensors, [E, I, H] in and [E, H, I] out (either transposed): "
               "act(x W1) W2", _needs_stacked(2), _stacked_plain),
    ExpertRule("stacked separate", "three stacked tensors: gate, up and down, each either transposed, no biases",
               _needs_stacked(3, biases=False), _stacked_separate),
    ExpertRule("module list", "an nn.ModuleList of E MLPs of 2 (plain) or 3 (gated) Linears with any names and "
               "biases (or parallel ModuleLists, one per role), every assignment of roles",
               _list_applies, _list_readings),
    # last: a rarer layout, and each stacked rule multiplies the checks where readings and routing go together
    ExpertRule("stacked up|gate", "as stacked gate|up, with the up rows first (`up, gate = x.chunk(2)`)",
               _needs_stacked(2), _stacked_up_gate),
)


def expert_readings(src: ExpertSource, hidden: int) -> Iterator[tuple[ExpertRule, ExpertWeights]]:
    """Every rule's readings, in rule order."""
    for rule in EXPERT_RULES:
        if rule.applies(src) is None:
            for reading in rule.read(src, hidden):
                yield rule, reading


# ----------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class RoutingRule:
    """Router logits -> (ids, weights). The rule fixes the scoring and what top-k ranks; its other parameters
    (k, renormalization, groups, which [E] vector biases the logits and which only steers selection, scale) are
    read from the layer's attributes first, then swept: each is checked against the mixture weights the layer
    was seen to apply, without running experts."""

    name: str
    matches: str
    scoring: Optional[str]  # None: the router module's own (ids, weights)
    select_on: str = "scores"


ROUTING_RULES: tuple[RoutingRule, ...] = (
    RoutingRule("softmax top-k", "softmax over the logits, top-k of the scores (renormalized or not)", "softmax"),
    RoutingRule("top-k then softmax", "top-k of the logits, softmax over the chosen ones (softmax after top-k)",
                "softmax", "logits"),
    RoutingRule("sigmoid top-k", "sigmoid scores, top-k (optionally a selection-only bias and group-limited "
                "top-k, DeepSeek-V3)", "sigmoid"),
    RoutingRule("top-k then sigmoid", "top-k of the logits, sigmoid of the chosen ones (Llama 4)", "sigmoid",
                "logits"),
    RoutingRule("router as written", "the router module returns (ids, weights) itself: kept, its decision feeds "
                "the fused experts", None),
)

"""Finding, feeding and replacing layers: helpers shared by the passes and the targets' lowerings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moec.moe_layer import ExpertsOnly, FusedMoE, split_experts_args


@dataclass(frozen=True)
class LayerCall:
    """How a layer is called: its hidden states, plus (for torch.export.unflatten's modules) int
    arguments that are sizes of the hidden states' dims, recomputed for every probe shape."""

    tensor_index: int = 0
    int_dims: tuple[int, ...] = ()  # per leading int argument: which dim of the tensor it is

    def args(self, x: torch.Tensor) -> tuple:
        ints = [int(x.shape[d]) for d in self.int_dims]
        return tuple(ints[: self.tensor_index]) + (x,) + tuple(ints[self.tensor_index:])


def _layer_call(args: tuple, kwargs: dict) -> tuple[LayerCall, torch.Tensor] | str:
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if kwargs or len(tensors) != 1:
        return "forward takes more than the hidden states; only f(hidden) layers are fused"
    x = args[tensors[0]]
    dims = []
    for i, a in enumerate(args):
        if i == tensors[0]:
            continue
        if not isinstance(a, int) or a not in x.shape:
            return "forward takes more than the hidden states; only f(hidden) layers are fused"
        dims.append(list(x.shape).index(a))
    return LayerCall(tensors[0], tuple(dims)), x


@dataclass(frozen=True)
class ExpertsInputs:
    """What an experts module (called with the routing decided outside it) was given: hidden states [T, H],
    expert ids [T, k] and their weights [T, k] -- transformers' Experts(hidden, top_k_index, top_k_weights)."""

    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor


def _experts_call(args: tuple, kwargs: dict) -> ExpertsInputs | str:
    split = split_experts_args(args, kwargs)
    if isinstance(split, str):
        return split
    return ExpertsInputs(*(t.detach().clone() for t in split))


class _AllCaptured(Exception):
    """Raised by capture_inputs' last hook: what the model computes after it is not needed."""


def capture_inputs(model: nn.Module, paths: list[str], example: tuple, experts_paths: frozenset = frozenset()
                   ) -> dict[str, tuple[LayerCall, torch.Tensor] | ExpertsInputs | str]:
    """Run the model once and record the hidden-states input each candidate layer saw (for `experts_paths`,
    the hidden states and the routing the caller gave), in the order they were called. The run stops once every
    layer was seen: calibration captures a Linear's inputs once per batch and group, and the layers after it
    (out of core: experts read from the checkpoint on every run) would otherwise run each time for nothing."""
    captured: dict[str, tuple[LayerCall, torch.Tensor] | ExpertsInputs | str] = {}
    wanted = len(set(paths))
    handles = []
    for path in paths:
        def hook(mod, args, kwargs, path=path):
            if path in captured:
                return
            if path in experts_paths:
                captured[path] = _experts_call(args, kwargs)
            else:
                call = _layer_call(args, kwargs)
                captured[path] = call if isinstance(call, str) else (call[0], call[1].detach().clone())
            if len(captured) == wanted:
                raise _AllCaptured

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example)
    except _AllCaptured:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def iter_fused(model: nn.Module) -> Iterator[tuple[str, FusedMoE]]:
    for path, mod in model.named_modules():
        if isinstance(mod, FusedMoE):
            yield path, mod


def layer_path(model: nn.Module, path: str) -> str:
    """The name reports give the fused layer at `path`: the fusion's, which for experts fused on their own is the
    ExpertsOnly wrapper's path, one level above the FusedMoE inside it."""
    parent, _, leaf = path.rpartition(".")
    if leaf == "layer" and parent and isinstance(model.get_submodule(parent), ExpertsOnly):
        return parent
    return path

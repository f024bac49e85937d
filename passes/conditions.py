"""Conditions passes require and ensure: named facts about the module, checked where they can be.

A pass lists them in `requires` / `ensures` (moec.passes.base.Pass). The pass manager records each
ensured condition once its check (if any) holds on the module after the pass; a pass whose
requirement no earlier pass ensured stops the compile, naming the pass and the condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn


@dataclass(frozen=True)
class Condition:
    name: str
    meaning: str
    check: Optional[Callable[[nn.Module], Optional[str]]] = None  # what is wrong, or None when it holds

    def violation(self, module: nn.Module) -> Optional[str]:
        return None if self.check is None else self.check(module)


def _fused_paths(module: nn.Module) -> list[str]:
    from moec.moe_layer import FusedMoE

    return [p for p, m in module.named_modules() if isinstance(m, FusedMoE)]


def _unquantized(module: nn.Module) -> Optional[str]:
    from moec.moe_layer import FusedMoE

    bare = [p for p, m in module.named_modules()
            if isinstance(m, FusedMoE) and m.quantized is None and m.full_precision is None]
    return f"FusedMoE layers without quantized codes: {', '.join(bare)}" if bare else None


def _left_fused(module: nn.Module) -> Optional[str]:
    left = _fused_paths(module)
    return f"FusedMoE layers are left unlowered: {', '.join(left)}" if left else None


WEIGHT_QDQ_FOLDED = Condition("weight_qdq_folded", "Q/DQ pairs on Linear weights are folded into plain Linears")
MOE_FUSED = Condition("moe_fused", "recognized MoE layers are canonical FusedMoE modules")
EXPERTS_QUANTIZED = Condition("experts_quantized", "every FusedMoE carries its quantized expert codes (or, with "
                              "--quant auto, the reason it stays at full precision)",
                              _unquantized)
EXPERTS_LOWERED = Condition("experts_lowered", "no FusedMoE is left: every fused layer is in the target's form",
                            _left_fused)
ROUTING_MEASURED = Condition("routing_measured", "every fused layer's routing statistics on the calibration data "
                             "are in the pass context")
EXPERTS_PRUNED = Condition("experts_pruned", "the lowest-ranked experts are removed from the fused layers (router rows "
                           "and weights)")
DENSE_QUANTIZED = Condition("dense_quantized", "the Linear layers outside the experts are quantized or kept "
                            "with a reason")

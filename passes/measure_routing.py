"""measure_routing: each fused layer's routing statistics on the calibration data.

Matches: every `FusedMoE` (after fuse_moe), when the compile is given ``--calibration``.
Produces: nothing in the module (it is not rewritten); the per-layer, per-expert statistics
  (moec.analysis.routing_stats) in ``ctx.routing`` for later passes (prune_experts ranks experts by
  them) and in the report's ``routing`` section (``moec inspect DIR --routing`` shows them).
Refuses: nothing; a layer the calibration data never reaches is reported with 0 tokens.
"""

from __future__ import annotations

from torch import nn

from moec.analysis.routing_stats import measure_routing
from moec.passes.base import Pass, PassContext, PassResult
from moec.passes.conditions import MOE_FUSED, ROUTING_MEASURED


class MeasureRouting(Pass):
    name = "measure_routing"
    requires = (MOE_FUSED,)
    ensures = (ROUTING_MEASURED,)

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        ctx.routing = measure_routing(module, ctx.calibration, ctx.log)
        silent = [l.path for l in ctx.routing if l.tokens == 0]
        for path in silent:
            ctx.log(f"warning: {path}: the calibration data never reached this layer; it has no routing statistics")
        return PassResult(module, False, {"routing": [l.to_dict() for l in ctx.routing], "never_reached": silent})

"""Weight bytes per precision, and how many devices of a given memory a model needs (expert parallel).

`moec plan` counts what a model's weights cost at each precision moec emits and places them: every device
holds the non-expert weights (attention, embeddings, dense MLPs, routers, shared experts) and the activation
arena of the max profile; the routed experts of every MoE layer are split into contiguous ranges, the same
range on every layer (expert parallelism), over the fewest devices that hold their share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PRECISIONS = ("fp32", "bf16", "int8", "int4", "int2")
_FLOAT_BYTES = {"fp32": 4, "bf16": 2}
SCALE_BYTES = 4  # one fp32 scale per output row (moec's --quant default, QMoE's per-row layout)


@dataclass(frozen=True)
class ExpertMatrix:
    """One routed expert weight of a layer, in canonical form: [experts, rows, cols]."""

    experts: int
    rows: int
    cols: int

    def bytes_at(self, precision: str, experts: Optional[int] = None) -> int:
        e = self.experts if experts is None else experts
        if precision in _FLOAT_BYTES:
            return e * self.rows * self.cols * _FLOAT_BYTES[precision]
        bits = int(precision[3:])
        return e * self.rows * (-(-self.cols * bits // 8) + SCALE_BYTES)


@dataclass(frozen=True)
class MoELayerWeights:
    path: str
    experts: int
    matrices: tuple[ExpertMatrix, ...]  # gate/up and down (biases count with the other weights)

    def bytes_at(self, precision: str, experts: Optional[int] = None) -> int:
        return sum(m.bytes_at(precision, experts) for m in self.matrices)


@dataclass(frozen=True)
class WeightBytes:
    precision: str
    experts: int
    other: int  # fp32 beside fp32 experts, else bf16

    @property
    def total(self) -> int:
        return self.experts + self.other


def weight_bytes(layers: list[MoELayerWeights], other_params: int) -> list[WeightBytes]:
    """Per precision: the routed experts at that precision (per-row fp32 scales for intN), the other
    `other_params` parameters at fp32 beside fp32 experts and at bf16 otherwise."""
    return [WeightBytes(p, sum(l.bytes_at(p) for l in layers), other_params * (4 if p == "fp32" else 2))
            for p in PRECISIONS]


@dataclass(frozen=True)
class DeviceShare:
    device: int
    first_expert: int  # of every MoE layer (the ranges scale with each layer's own expert count)
    last_expert: int
    bytes: int


@dataclass(frozen=True)
class Placement:
    precision: str
    device_memory: int
    devices: Optional[int]  # None: no number of devices holds it (why says so)
    shares: tuple[DeviceShare, ...] = ()
    why: str = ""

    def to_dict(self) -> dict:
        return {"precision": self.precision, "devices": self.devices, "why": self.why,
                "shares": [{"device": s.device, "experts": [s.first_expert, s.last_expert], "bytes": s.bytes}
                           for s in self.shares]}


def place(weights: WeightBytes, layers: list[MoELayerWeights], per_device_fixed: int, device_memory: int) -> Placement:
    """The fewest devices of `device_memory` bytes that hold the model: `per_device_fixed` (activations and
    workspace) and the non-expert weights on each, the experts split evenly (contiguous ranges)."""
    from moec.memory import human

    p = weights.precision
    replicated = weights.other + per_device_fixed
    if replicated > device_memory:
        return Placement(p, device_memory, None, why=(
            f"each device needs {human(replicated)} before any expert (non-expert weights {human(weights.other)}, "
            f"activations and workspace {human(per_device_fixed)}): more than {human(device_memory)}"))
    if not layers:
        return Placement(p, device_memory, 1, (DeviceShare(0, 0, -1, replicated),))
    most = max(l.experts for l in layers)

    def bound(n: int, rounding) -> int:  # every device holds floor(E / n) .. ceil(E / n) experts of each layer
        return replicated + sum(l.bytes_at(p, rounding(l.experts, n)) for l in layers)

    def floor(e, n):
        return e // n

    def ceil(e, n):
        return -(-e // n)

    for n in range(1, most + 1):
        if bound(n, floor) > device_memory:  # even the emptiest split would not fit
            continue
        shares = _split(layers, n, p, replicated)  # exact only where the bounds disagree (layers of unequal E)
        if bound(n, ceil) <= device_memory or max(s.bytes for s in shares) <= device_memory:
            return Placement(p, device_memory, n, tuple(shares))
    return Placement(p, device_memory, None, why=(
        f"even one expert of each layer per device ({most} devices) needs {human(bound(most, ceil))}"))


def _split(layers: list[MoELayerWeights], n: int, precision: str, replicated: int) -> list[DeviceShare]:
    """Device d holds experts [d*E/n, (d+1)*E/n) of each layer (E: the layer's own count)."""
    shares = []
    most = max((l.experts for l in layers), default=1)
    for d in range(n):
        b = replicated
        for l in layers:
            lo, hi = d * l.experts // n, (d + 1) * l.experts // n
            b += l.bytes_at(precision, hi - lo)
        shares.append(DeviceShare(d, d * most // n, (d + 1) * most // n - 1, b))
    return shares

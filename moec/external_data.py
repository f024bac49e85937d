"""Write an ONNX model's weights as external data, in shards of bounded size, one layer never split.

ONNX Runtime loads initializers from any number of external files (each initializer names its file,
offset and length), so an artifact can be split into files a filesystem, an object store or a
container layer takes comfortably. Tensors go out one at a time (nothing is concatenated in memory);
a decoder layer's tensors (names with ``layers.<N>.``) share one shard, so a shard boundary never cuts
a layer; a single layer larger than the shard size gets a shard of its own. Tensors under
`INLINE_BELOW` bytes (shape constants, scalars) stay in the graph, as onnx's own writer does.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

INLINE_BELOW = 1024
ALIGN = 4096  # offsets aligned for memory mapping
DEFAULT_SHARD_BYTES = 2 << 30

_LAYER = re.compile(r"(?:^|[._/])layers?[._](\d+)[._/]")


@dataclass
class Shard:
    file: str
    tensors: list = field(default_factory=list)  # onnx_ir Values
    bytes: int = 0


def layer_key(name: str) -> str:
    """The decoder layer a tensor belongs to ('layers.3'), or '' for the rest (embeddings, head ...)."""
    m = _LAYER.search(name)
    return f"layers.{m.group(1)}" if m else ""


def plan_shards(values: list, shard_bytes: int, stem: str) -> list[Shard]:
    """Group initializers by layer (in graph order) and fill shards greedily with whole layers."""
    groups: dict[str, list] = {}
    for v in values:
        groups.setdefault(layer_key(v.name), []).append(v)
    shards: list[Shard] = []
    for members in groups.values():
        size = sum(_nbytes(v) for v in members)
        if not shards or (shards[-1].bytes and shards[-1].bytes + size > shard_bytes):
            shards.append(Shard(""))
        shards[-1].tensors += members
        shards[-1].bytes += size
    n = len(shards)
    for i, s in enumerate(shards):
        s.file = f"{stem}.data" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.data"
    return shards


def save_sharded(model, path: str, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 log: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Save the onnx_ir `model` to `path` with its weights in shards beside it; returns the files written,
    model first. The model's initializers are re-pointed at the files (it is not used afterwards)."""
    import onnx_ir as ir

    directory = os.path.dirname(os.path.abspath(path))
    stem = os.path.basename(path)
    big = [v for v in model.graph.initializers.values()
           if v.const_value is not None and _nbytes(v) >= INLINE_BELOW]
    shards = plan_shards(big, shard_bytes, stem)
    files = []
    total, done, start = sum(s.bytes for s in shards), 0, time.perf_counter()
    for i, shard in enumerate(shards):
        target = os.path.join(directory, shard.file)
        with open(target, "wb") as f:
            for v in shard.tensors:
                pad = (-f.tell()) % ALIGN
                if pad:
                    f.write(b"\0" * pad)
                offset = f.tell()
                t = v.const_value
                data = t.tobytes()
                f.write(data)
                v.const_value = ir.ExternalTensor(shard.file, offset, len(data), t.dtype, shape=t.shape,
                                                  name=v.name, base_dir=directory)
                del data
        files.append(target)
        done += shard.bytes
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done) if done else 0.0
        log(f"  weights {i + 1}/{len(shards)} {shard.file}: {done / 2**30:.2f} of {total / 2**30:.2f} GiB written, "
            f"ETA {eta:.0f} s")
    ir.save(model, path)
    return [path] + files


def _nbytes(value) -> int:
    t = value.const_value
    return int(t.nbytes) if t is not None else 0

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
from typing import Any, Callable, Iterator

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

    def in_memory(key: str, values: list) -> Iterator[tuple]:
        for v in values:
            yield v, v.const_value.tobytes()

    return write_streamed(model, path, in_memory, shard_bytes, log)


def write_streamed(model, path: str, fill: Callable[[str, list], Iterator[tuple]],
                   shard_bytes: int = DEFAULT_SHARD_BYTES, log: Callable[[str], None] = lambda msg: None,
                   head_last: bool = False) -> list[str]:
    """Save `model` to `path`, its initializers' bytes coming from `fill(layer key, values)`, one layer group at
    a time: fill yields (value, bytes) for every value of the group, in any order, and may build them only
    then (an out-of-core compile reads the layer from its checkpoint). The groups come embeddings and head first
    (`head_last`: after the decoder layers), then the decoder layers by index. The initializers need only a shape
    and a dtype beforehand (meta tensors will do); afterwards each points at its file, or holds its bytes inline
    when it is small. Returns the files written, model first."""
    import numpy as np
    import onnx_ir as ir

    directory = os.path.dirname(os.path.abspath(path))
    stem = os.path.basename(path)
    # the decoder layers by index (an out-of-core compile's calibration carries its data a layer at a time), a
    # group of small tensors only in its place too
    head = float("inf") if head_last else -1
    values = sorted((v for v in model.graph.initializers.values() if v.const_value is not None),
                    key=lambda v: _group_rank(layer_key(v.name), head))
    big = [v for v in values if _nbytes(v) >= INLINE_BELOW]
    small = {v.name for v in values if _nbytes(v) < INLINE_BELOW}
    shards = plan_shards(big, shard_bytes, stem)  # whole groups, in the same order
    groups: dict[str, list] = {}
    for v in values:
        groups.setdefault(layer_key(v.name), []).append(v)
    shard_of = {v.name: s for s in shards for v in s.tensors}
    handles: dict[str, Any] = {}
    files = []
    total, done, start = sum(s.bytes for s in shards), 0, time.perf_counter()
    try:
        for n, (key, members) in enumerate(groups.items()):
            for v, data in fill(key, members):
                t = v.const_value
                if len(data) != _nbytes(v):
                    raise ValueError(f"initializer {v.name}: {len(data)} bytes produced, its shape {list(t.shape)} "
                                     f"and dtype {t.dtype} need {_nbytes(v)}")
                if v.name in small:
                    array = np.frombuffer(bytes(data), dtype=t.dtype.numpy()).reshape(t.shape.numpy())
                    v.const_value = ir.Tensor(array, name=v.name)
                    continue
                shard = shard_of[v.name]
                f = handles.get(shard.file)
                if f is None:  # groups come in shard order: the previous shard is complete, close it
                    for done_file in handles.values():
                        done_file.close()
                    f = handles[shard.file] = open(os.path.join(directory, shard.file), "wb")
                    files.append(os.path.join(directory, shard.file))
                elif f.closed:
                    raise ValueError(f"initializer {v.name}: its shard {shard.file} was already complete")
                pad = (-f.tell()) % ALIGN
                if pad:
                    f.write(b"\0" * pad)
                offset = f.tell()
                f.write(data)
                v.const_value = ir.ExternalTensor(shard.file, offset, len(data), t.dtype, shape=t.shape,
                                                  name=v.name, base_dir=directory)
                done += len(data)
                del data
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done) if done else 0.0
            log(f"  weights {key or 'embeddings/head'} ({n + 1}/{len(groups)}): {done / 2**30:.2f} of "
                f"{total / 2**30:.2f} GiB written, ETA {eta:.0f} s")
    finally:
        for f in handles.values():
            f.close()
    ir.save(model, path)
    return [path] + files


def _group_rank(key: str, head: float) -> float:
    return head if not key else int(key.split(".")[1])


def _nbytes(value) -> int:
    t = value.const_value
    return int(t.nbytes) if t is not None else 0

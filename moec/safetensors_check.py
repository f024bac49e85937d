"""Check a Hugging Face checkpoint's safetensors files before anything loads them.

Reads only headers (8-byte length + JSON) and file sizes, so a multi-GB checkpoint is checked in
milliseconds. Refuses, naming the file and the tensor: a shard the index lists but the directory
lacks, a tensor the index places in a shard whose header doesn't hold it, a header that isn't valid,
and a file shorter than its tensors (truncated by a failed copy or download).
"""

from __future__ import annotations

import json
import os
import struct

from moec.errors import SourceError

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of the checkpoint in `path` (from its index when it has one), checked."""
    index = os.path.join(path, INDEX)
    expected: dict[str, list[str]] = {}
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except Exception as exc:
            raise SourceError(f"'{index}' is not a valid safetensors index ({type(exc).__name__}: {exc}).") from exc
        for tensor, shard in weight_map.items():
            expected.setdefault(shard, []).append(tensor)
        missing = [s for s in expected if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise SourceError(f"'{index}' lists shard '{missing[0]}' (tensor '{expected[missing[0]][0]}' and "
                              f"{len(expected[missing[0]]) - 1} more), which is not in '{path}'"
                              + (f"; {len(missing) - 1} more shard(s) missing" if len(missing) > 1 else "")
                              + ". Copy the whole checkpoint.")
        files = sorted(expected)
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in files:
        header = read_header(os.path.join(path, name))
        absent = [t for t in expected.get(name, []) if t not in header]
        if absent:
            raise SourceError(f"'{os.path.join(path, name)}' does not hold tensor '{absent[0]}', which '{INDEX}' "
                              f"places there ({len(absent)} such tensors); the index and the shard disagree.")
    return files


def read_header(file: str) -> dict:
    """The tensor entries of one safetensors file, after checking the file holds all their bytes."""
    return _header(file)[1]


def _header(file: str) -> tuple[int, dict]:
    """(where the file's tensor data starts, its tensor entries), checked as read_header says."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SourceError(f"'{file}' is truncated: {size} bytes, not even a safetensors header.")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise SourceError(f"'{file}' is not a valid safetensors file: its header claims {n} bytes "
                              f"but the file has {size}.")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise SourceError(f"'{file}' has a corrupted safetensors header ({exc}).") from exc
    if not isinstance(header, dict):
        raise SourceError(f"'{file}' has a corrupted safetensors header (not a JSON object).")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, meta in tensors.items():
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if (not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str) or not isinstance(meta.get("shape"), list)
                or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets))):
            raise SourceError(f"'{file}' has a corrupted safetensors header: the entry of tensor '{name}' lacks a "
                              "dtype, shape or data_offsets.")
    if tensors:
        name, meta = max(tensors.items(), key=lambda kv: kv[1]["data_offsets"][1])
        end = 8 + n + int(meta["data_offsets"][1])
        if size < end:
            raise SourceError(f"'{file}' is truncated: {size} bytes, but tensor '{name}' needs bytes up to {end}.")
    return 8 + n, tensors


class TensorFiles:
    """Tensors read one at a time with a plain read into memory of their own (no file mapping, whose pages would
    count in this process's resident memory while it lasts; no safetensors handle, whose header parse per open
    cost more than the read), each file's header parsed once. For the many small tensors of per-Linear quantized
    checkpoints (moec.packed_stream). Refuses (SourceError, naming the file and the tensor): a tensor the header
    lacks, a dtype it can't read, an entry whose byte range disagrees with its shape, a short read."""

    DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool"}

    def __init__(self):
        self._headers: dict[str, tuple[int, dict]] = {}  # file -> (where its data starts, its tensor entries)

    def read(self, file: str, name: str):
        import math

        import torch

        if file not in self._headers:
            self._headers[file] = _header(file)  # checked: valid, and the file holds every tensor's bytes
        start, tensors = self._headers[file]
        meta = tensors.get(name)
        if meta is None:
            raise SourceError(f"'{file}': tensor '{name}' is not in its header.")
        dtype = getattr(torch, self.DTYPES.get(meta["dtype"], ""), None)
        if dtype is None:
            raise SourceError(f"'{file}': tensor '{name}' is {meta['dtype']}, a dtype moec does not read here.")
        begin, end = (int(x) for x in meta["data_offsets"])
        shape = [int(d) for d in meta["shape"]]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SourceError(f"'{file}' has a corrupted safetensors header: tensor '{name}' {meta['dtype']} {shape} "
                              f"spans bytes {begin}-{end}.")
        data = bytearray(end - begin)
        try:
            with open(file, "rb") as f:
                f.seek(start + begin)
                got = f.readinto(memoryview(data))
        except OSError as exc:
            raise SourceError(f"'{file}': cannot read tensor '{name}' ({type(exc).__name__}: {exc}).") from exc
        if got != end - begin:
            raise SourceError(f"'{file}' is truncated: tensor '{name}' has {got} of its {end - begin} bytes.")
        return (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(shape)

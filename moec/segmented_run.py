"""Run an ONNX model in segments, one decoder layer at a time, so that only one layer's weights are loaded.

Matches: a model whose nodes carry torch.onnx's module scopes (`pkg.torch.onnx.name_scopes`); a node is in
`layers.N` when one of its scopes is a decoder layer's, else in "other"; a node without scopes (added by a
graph pass) stays in the segment of the node before it. Consecutive nodes of one key form a segment.
Produces: every node of the model, executed by ONNX Runtime in graph order, segment by segment: each segment
is a model of its own holding only its nodes and the initializers they read (external data stays where it is),
fed the values earlier segments produced; values are dropped after their last reader. A bf16 segment runs widened
to fp32 on its bf16 weights (moec.widen_bf16: the CPU provider has no bf16 kernels), its weights loaded for it. The
result holds the model's outputs and, per segment, the values it handed on.
Refuses: a model whose external data is not beside it (segments are written next to it to resolve it).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from moec.external_data import layer_key
from moec.heap import trim

_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class Segment:
    name: str  # "layers.3" or "other"
    nodes: list = field(default_factory=list)  # NodeProtos, graph order
    inputs: list[str] = field(default_factory=list)  # values from outside: graph inputs or earlier segments
    initializers: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # values later segments (or the graph's outputs) read


@dataclass
class SegmentedRun:
    outputs: dict[str, np.ndarray]  # the model's outputs
    handed_on: list[tuple[Segment, dict[str, np.ndarray]]]  # per segment, the values it produced for later ones


def node_key(node, previous: str) -> str:
    scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES), None)
    if scopes is None:
        return previous
    for scope in reversed(scope_list(scopes)):  # innermost first: a layer nested in another keeps its own index
        key = layer_key(scope + ".")
        if key:
            return key
    return "other"


def scope_list(text: str) -> list[str]:
    """torch.onnx writes the scopes as a Python list literal of strings."""
    return re.findall(r"'((?:[^'\\]|\\.)*)'", text)


def split(graph) -> list[Segment]:
    """The graph's nodes cut into segments, with what flows between them."""
    initializers = {t.name for t in graph.initializer}
    segments: list[Segment] = []
    key = "other"
    for node in graph.node:
        key = node_key(node, key)
        if not segments or segments[-1].name != key:
            segments.append(Segment(key))
        segments[-1].nodes.append(node)
    produced_by: dict[str, int] = {i.name: -1 for i in graph.input}
    read_by: dict[str, set[int]] = {}
    for s_index, s in enumerate(segments):
        made: set[str] = set()
        for node in s.nodes:
            for name in _reads(node):
                if not name or name in made:
                    continue
                if name in initializers:
                    if name not in s.initializers:
                        s.initializers.append(name)
                elif name not in s.inputs:
                    s.inputs.append(name)
                    read_by.setdefault(name, set()).add(s_index)
            for out in node.output:
                if out:
                    made.add(out)
                    produced_by[out] = s_index
    finals = {o.name for o in graph.output}
    for name, readers in list(read_by.items()) + [(f, {len(segments)}) for f in finals]:
        src = produced_by.get(name)
        if src is None:
            raise ValueError(f"value '{name}' is read but no node or graph input produces it")
        if src >= 0 and name not in segments[src].outputs and any(r != src for r in readers):
            segments[src].outputs.append(name)
    return segments


def _reads(node) -> list[str]:
    """A node's inputs, and the outer values its subgraphs (If/Loop/Scan bodies) read."""
    names = list(node.input)
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                names += [x for x in _reads(n) if x not in inner]
                inner.update(n.output)
    return names


def run_segmented(model_path: str, feeds: dict[str, np.ndarray], log: Callable[[str], None] = lambda msg: None,
                  threads: Optional[int] = None) -> SegmentedRun:
    import onnx
    import onnxruntime as ort

    from moec.widen_bf16 import has_bf16, widened_session

    model = onnx.load(model_path, load_external_data=False)
    types = _value_types(model)
    segments = split(model.graph)
    last_read: dict[str, int] = {}
    for i, s in enumerate(segments):
        for name in s.inputs:
            last_read[name] = i
    inits = {t.name: t for t in model.graph.initializer}
    finals = [o.name for o in model.graph.output]
    live = dict(feeds)
    handed_on = []
    directory = os.path.dirname(os.path.abspath(model_path))
    def session_options():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # memory, measured on an int4 OLMoE layer (0.25 GiB of weights): prepacking held the layer's weights about
        # three times over (0.76 GiB peak; 0.29 without), and each session's arena kept ~50 MiB past its end
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.disable_prepacking", "1")
        if threads:
            options.intra_op_num_threads = threads
        return options

    options = session_options()
    for i, s in enumerate(segments):
        widened = None
        graph = onnx.helper.make_graph(
            s.nodes, f"segment_{i}",
            [_info(n, types) for n in s.inputs], [_info(n, types) for n in s.outputs],
            [inits[n] for n in s.initializers])
        sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                                     functions=model.functions)
        path = os.path.join(directory, f".segment-{uuid.uuid4().hex[:8]}.onnx")
        try:
            if has_bf16(sub):  # no bf16 kernels on the CPU provider: the segment widened to fp32 (moec.widen_bf16)
                widened = widened_session(sub, directory, session_options)
                session = widened.session
            else:
                onnx.save(sub, path)
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            results = session.run(s.outputs, {n: live[n] for n in s.inputs})
        finally:
            if os.path.exists(path):
                os.remove(path)
        del session, widened
        trim()  # the segment's weights go back to the system before the next segment's are read
        produced = dict(zip(s.outputs, results))
        handed_on.append((s, produced))
        live.update(produced)
        for name in s.inputs:
            if last_read.get(name) == i and name not in finals:
                live.pop(name, None)
        log(f"  segment {i + 1}/{len(segments)} ({s.name}): {len(s.nodes)} nodes, {len(s.initializers)} weights")
    return SegmentedRun({n: live[n] for n in finals}, handed_on)


def _value_types(model) -> dict:
    import onnx

    types = {}
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        types[v.name] = v.type
    missing = any(o for n in model.graph.node for o in n.output if o and o not in types)
    if missing:  # fill in what torch.onnx left untyped; shapes are not needed, element types are
        inferred = onnx.shape_inference.infer_shapes(model)
        for v in inferred.graph.value_info:
            types.setdefault(v.name, v.type)
    return types


def _info(name: str, types: dict):
    import onnx

    t = types.get(name)
    if t is None:
        raise ValueError(f"value '{name}' crosses a segment boundary but has no type in the model")
    v = onnx.ValueInfoProto(name=name)
    v.type.CopyFrom(t)
    return v

"""widen_bf16: a bf16 ONNX model as the same graph in fp32 on the same weights, so ONNX Runtime's CPU provider
runs it (it has no bf16 kernels: no MatMul, Add, Softmax, MoE...; Cast is the exception).

A `--dtype bf16` artifact only runs on a GPU provider. What a compiler can get wrong in it — a node, a wiring,
a weight — shows just as well with every value in fp32: weights widen exactly (bf16 is fp32's top 16 bits),
each bf16 value becomes an fp32 one, and each Cast to bf16 becomes a Cast to fp32. The result is checked
against the eager model computing in fp32 on the same bf16 weights (`moec.passes.cast_precision.in_fp32`).
They differ only where torch.export rounded a Python scalar into a bf16 constant (SDPA's scale, split as
sqrt(scale) on q and k, is 0.539062 for 0.537285): 0.7-5e-3 relative L2 on the zoo's tiny models, so the
check's tolerance is WIDENED_TOLERANCE, 1e-2, with fp16's routing-tie clearance — where a wrong weight or node
is O(1) and a flipped expert ~0.1, against bf16 arithmetic's own 1-7e-2. What this does not run is bf16
arithmetic itself (each kernel's rounding of its outputs): the compile reports the eager bf16 model's distance
from fp32 for that.

Matches: any model with a bf16 initializer, constant, Cast or typed value (`has_bf16`, from the graph alone).
Produces: a new ModelProto with the same input, output and node names, fp32 where bf16 was; `Widened.bf16_values`
names the values the artifact holds in bf16 (the memory planner sizes them at 2 bytes). The caller's model is
unchanged.
Refuses (WidenError): a node with subgraphs (If/Loop/Scan; moec's artifacts have none), a node other than Cast
making bf16 from a dtype attribute, a bf16 initializer whose external data was not loaded; and, when
`bf16_values` is asked, a standard op whose output types ONNX's inference can't give.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moec.errors import MoecError

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
INLINE_BELOW = 4096  # bytes: a smaller inline bf16 initializer is widened inside the graph a session parses
WIDENED_TOLERANCE = 1e-2  # relative L2 against the eager model in fp32 on the bf16 weights (see above)


class WidenError(MoecError):
    exit_code = 12  # the artifact can't be run for verification


@dataclass
class Widened:
    model: onnx.ModelProto
    source: onnx.ModelProto  # the bf16 model it was widened from
    weights: int  # bf16 initializers and constants widened

    @cached_property
    def bf16_values(self) -> frozenset[str]:
        """Graph inputs and node outputs the artifact holds in bf16, by name: what the memory planner sizes at 2
        bytes. Found node by node when asked (a verification session does not need them)."""
        g, types = self.source.graph, _element_types(self.source)
        return frozenset([v.name for v in g.input if v.type.tensor_type.elem_type == BF16]
                         + [o for n in g.node for o in n.output if o and types.get(o) == BF16])


def has_bf16(model: onnx.ModelProto) -> bool:
    """Whether anything in the graph is bf16 (weights need not be loaded)."""
    g = model.graph
    if any(t.data_type == BF16 for t in g.initializer):
        return True
    if any(v.type.tensor_type.elem_type == BF16 for v in list(g.input) + list(g.output) + list(g.value_info)):
        return True
    return any(_narrows(a) or (a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16)
               for n in g.node for a in n.attribute)


def widen_bf16(model: onnx.ModelProto, supplied: frozenset[str] | set[str] = frozenset()) -> Widened:
    """`supplied`: initializers the caller hands ONNX Runtime itself (widened_session): left in the graph as fp32
    stubs of their shape, without data."""
    g = model.graph
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise WidenError(f"node '{n.name or n.op_type}' ({n.op_type}) has subgraphs; widening bf16 to run it on "
                             "ONNX Runtime's CPU provider handles flat graphs only.")
        if n.op_type != "Cast" and any(_narrows(a) for a in n.attribute):
            raise WidenError(f"node '{n.name or n.op_type}' ({n.op_type}) makes bf16 values from a dtype attribute; "
                             "only Cast's is widened.")
    weights = 0
    initializers = []
    for t in g.initializer:
        if t.name in supplied:
            initializers.append(onnx.TensorProto(name=t.name, dims=t.dims,
                                                 data_type=FLOAT if t.data_type == BF16 else t.data_type))
            weights += t.data_type == BF16
        elif t.data_type == BF16:
            initializers.append(_widened_tensor(t))
            weights += 1
        else:
            initializers.append(t)
    nodes = []
    for n in g.node:
        node = onnx.NodeProto()
        node.CopyFrom(n)
        for a in node.attribute:
            if _narrows(a):  # a Cast's (any other node's was refused above)
                a.i = FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16:
                a.t.CopyFrom(_widened_tensor(a.t))
                weights += 1
        nodes.append(node)
    graph = helper.make_graph(nodes, g.name, [_as_float(v) for v in g.input], [_as_float(v) for v in g.output],
                              initializers)
    widened = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                                functions=model.functions)
    return Widened(widened, model, weights)


def _narrows(a: onnx.AttributeProto) -> bool:
    return a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == BF16


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every value's element type, node by node: ONNX's own inference for standard ops; an op of another domain
    (com.microsoft's MoE, QMoE, ...) gives its outputs its first input's type, as their `T` constraint says."""
    g = model.graph
    protos: dict[str, onnx.TypeProto] = {}
    for v in g.input:
        protos[v.name] = v.type
    for t in g.initializer:
        protos[t.name] = helper.make_tensor_type_proto(t.data_type, None)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    for n in g.node:
        domain = n.domain or ""
        if n.op_type in ("Constant", "ConstantOfShape") and domain in ("", "ai.onnx"):
            # the value's own type; ConstantOfShape's default is fp32 zeros (ONNX's inference refuses a bf16 value
            # before opset 20, which torch.onnx emits anyway and ONNX Runtime takes)
            value = next((a for a in n.attribute if a.name == "value"), None)
            if value is not None or n.op_type == "ConstantOfShape":
                protos[n.output[0]] = helper.make_tensor_type_proto(value.t.data_type if value else FLOAT, None)
                continue
        if domain in ("", "ai.onnx"):
            try:
                schema = onnx.defs.get_schema(n.op_type, opsets.get("", 1), "")
                known = {i: protos[i] for i in n.input if i and i in protos}
                out = onnx.shape_inference.infer_node_outputs(schema, n, known)
            except Exception as exc:
                raise WidenError(f"node '{n.name or n.op_type}' ({n.op_type}): ONNX could not infer its output "
                                 f"types ({str(exc).splitlines()[0][:200]}); can't tell which values are bf16.") from exc
            for o in n.output:
                if o and o in out and out[o].tensor_type.elem_type:
                    protos[o] = out[o]
        else:
            first = next((protos[i] for i in n.input if i and i in protos), None)
            if first is not None:
                for o in n.output:
                    if o:
                        protos[o] = first
    return {k: v.tensor_type.elem_type for k, v in protos.items() if v.HasField("tensor_type")}


def _widened_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_location == TensorProto.EXTERNAL and not t.raw_data:
        raise WidenError(f"initializer '{t.name}' is bf16 in external data that was not loaded; load the model "
                         "with its external data before widening it.")
    values = numpy_helper.to_array(t).astype(np.float32)  # exact: bf16 is the top half of an fp32
    return numpy_helper.from_array(values, t.name)


def _as_float(v: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    if v.type.tensor_type.elem_type != BF16:
        return v
    out = onnx.ValueInfoProto()
    out.CopyFrom(v)
    out.type.tensor_type.elem_type = FLOAT
    return out


@dataclass
class WidenedSession:
    session: object  # onnxruntime.InferenceSession
    widened: Widened
    values: list  # the arrays ONNX Runtime computes with, not copied: they must live as long as the session


def widened_session(model: onnx.ModelProto, base_dir: str, new_options: Callable[[], object],
                    providers=("CPUExecutionProvider",)) -> WidenedSession:
    """An ONNX Runtime session over `model` widened, its weights handed over one array each: every initializer in
    external data (read from under `base_dir`, bf16 widened as it is read) and every inline bf16 one. The graph
    ONNX Runtime parses holds none of them, so the weights are in memory once, in fp32 where they were bf16 (a
    protobuf copy would hold them twice more, and a model read from bytes can't resolve external data).
    `new_options()` gives fresh SessionOptions (the weights are added to them)."""
    import onnxruntime as ort

    options = new_options()
    # graph optimizations (constant folding a Transpose of a weight, ...) read the graph's initializers, not the
    # ones added here: none run, so the check computes with the weights it was given
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sizes, values = {}, []  # bytes of each initializer handed over, by name
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and (t.data_type != BF16 or len(t.raw_data) < INLINE_BELOW):
            continue  # inline and not bf16, or small: stays in the graph (widened there)
        array = _read(t, base_dir)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(t.name, value)
        values.append((array, value))
        sizes[t.name] = array.nbytes
    widened = widen_bf16(model, set(sizes))
    # ONNX Runtime validates the size of an initializer without data before it looks at what was added for it, but
    # not the bytes of external data it is not asked to read: the stubs point into one sparse file of zeros
    tmp = tempfile.mkdtemp(prefix="moec-widened-")  # the graph and its sparse stubs only: no weight bytes
    try:
        offset = 0
        for t in widened.model.graph.initializer:
            if t.name in sizes:
                t.data_location = TensorProto.EXTERNAL
                for key, text in (("location", "stubs.data"), ("offset", str(offset)), ("length", str(sizes[t.name]))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, text
                offset += sizes[t.name]
        with open(os.path.join(tmp, "stubs.data"), "wb") as f:
            f.truncate(offset)  # sparse: no disk blocks
        onnx.save_model(widened.model, os.path.join(tmp, "widened.onnx"))
        session = ort.InferenceSession(os.path.join(tmp, "widened.onnx"), options, providers=list(providers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return WidenedSession(session, widened, values)


def _read(t: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """An initializer's values, from its external data or inline bytes; bf16 widened to fp32 (exactly)."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        path = os.path.join(base_dir, info["location"])
        raw = np.fromfile(path, dtype=np.uint8, count=int(info["length"]) if "length" in info else -1,
                          offset=int(info.get("offset", 0)))
        if t.data_type == BF16:
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
        return raw.view(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
    return numpy_helper.to_array(t).astype(np.float32)  # inline bf16

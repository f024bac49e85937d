"""Swap moec's experts plugin for TensorRT's native IMoELayer where TensorRT and the GPU allow it.

TensorRT >= 10.16 has `INetworkDefinition.add_moe` (IMoELayer) on SM100/SM103/SM110 GPUs. In 10.x it
is a network-API layer the ONNX parser does not produce (11.0's parser adds a `TRT_MoE` custom op,
not used here), so the engine builder parses moec's TensorRT ONNX (plugin nodes included) and then,
for each experts plugin layer this module accepts:
  - adds an IMoELayer on the same hidden states, expert ids and scores (reshaped to [1, T, *]: the
    layer takes [batch, seq, *]), with the plugin's weights re-laid out by `IMOE_VIEWS`;
  - points every consumer of the plugin's output at the IMoELayer's output (cast to fp32, the
    plugin's output type); the plugin layer is then unused and the builder drops it.

Accepted: gated experts with SiLU (MoEActType.SILU; TensorRT's header: "Currently only kSILU is
supported"), float weights, the weight applied to the output. Refused, with the reason, and left as
plugins: other activations (GELU, ReLU, an identity gate; GPT-OSS's clamped SwiGLU too: IMoELayer has
`set_swiglu_params(limit, alpha, beta)` but documents no formula for them, so moec's exactness
can't be argued), ungated experts, Llama4's weight-on-input, and moec's int4/int8 codes (IMoELayer
quantizes with FP8/FP4 only). The layer takes tokens as [batch, seq]: moec passes [1, T], and
TensorRT warns that its performance "is limited when seqLen > 16" — prefill-heavy engines may be
faster with --no-imoe (untimed).

The layout arithmetic (`IMOE_VIEWS`, `imoe_reference`) is plain numpy and tested everywhere; the
network surgery needs TensorRT and an SM100+ GPU and has not run where moec is developed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from moec.targets.tensorrt.plugin_spec import PLUGIN

# moec activation -> TensorRT MoEActType member name (TensorRT supports only SILU so far)
IMOE_ACTIVATIONS = {"silu": "SILU"}


def imoe_refusal(fields: dict) -> Optional[str]:
    """Why a plugin node with these fields can't become an IMoELayer (None: it can)."""
    act = fields.get("activation")
    if not int(fields.get("gated", 1)):
        return "ungated experts (IMoELayer experts are GLUs)"
    if act not in IMOE_ACTIVATIONS:
        return f"activation '{act}' (IMoELayer supports SiLU only)"
    if int(fields.get("weight_on_input", 0)):
        return "routing weight applied to the input (Llama4); IMoELayer weights the output"
    if int(fields.get("quant_bits", 0)):
        return f"int{fields['quant_bits']} expert codes (IMoELayer quantizes to FP8/FP4 only)"
    return None


@dataclass(frozen=True)
class View:
    """A slice of axis 1 (start, length; None: all of it), then an axis permutation."""

    start: int = 0
    length: Optional[int] = None
    perm: Optional[tuple[int, ...]] = None

    def apply(self, a: np.ndarray) -> np.ndarray:
        n = a.shape[1] - self.start if self.length is None else self.length
        a = a[:, self.start:self.start + n]
        return a.transpose(self.perm) if self.perm else a


def imoe_views(inter: int) -> dict[str, tuple[str, View]]:
    """IMoELayer tensor -> (plugin input, view). The plugin keeps PyTorch's [out, in] rows
    (w_gate_up [E, 2I, H]: gate rows then up rows; w_down [E, H, I]); IMoELayer multiplies
    x @ w, so it takes [E, in, out]: gate/up [E, H, I], down [E, I, H]."""
    t = (0, 2, 1)
    return {
        "fc_gate_weights": ("w_gate_up", View(0, inter, t)),
        "fc_up_weights": ("w_gate_up", View(inter, inter, t)),
        "fc_down_weights": ("w_down", View(perm=t)),
        "fc_gate_biases": ("b_gate_up", View(0, inter)),
        "fc_up_biases": ("b_gate_up", View(inter, inter)),
        "fc_down_biases": ("b_down", View()),
    }


def imoe_reference(x: np.ndarray, ids: np.ndarray, scores: np.ndarray, w: dict) -> np.ndarray:
    """IMoELayer's documented computation on [T, H] tokens: out = sum_i score_i *
    fcDown(fcUp(x) * silu(fcGate(x))), fc(v) = v @ w + b, with `w` keyed like `imoe_views`."""
    act = lambda g: g / (1.0 + np.exp(-g))  # noqa: E731
    out = np.zeros(x.shape, dtype=np.float64)
    for t in range(x.shape[0]):
        for e, s in zip(ids[t], scores[t]):
            b = lambda name: w[name][e] if name in w else 0.0  # noqa: E731
            h = (x[t] @ w["fc_up_weights"][e] + b("fc_up_biases")) * act(x[t] @ w["fc_gate_weights"][e]
                                                                         + b("fc_gate_biases"))
            out[t] += s * (h @ w["fc_down_weights"][e] + b("fc_down_biases"))
    return out


@dataclass
class ImoeSwap:
    """What `swap_in_imoe_layers` did, for the build report."""

    swapped: list[str] = field(default_factory=list)  # ONNX node names now IMoELayers
    refused: dict[str, str] = field(default_factory=dict)  # node name -> why it stays a plugin
    fallback: Optional[str] = None  # set when the build with IMoELayers failed and plugins were used

    def to_dict(self) -> dict:
        return {"swapped": self.swapped, "refused": self.refused, "fallback": self.fallback}


def plugin_fields(node) -> dict:
    """A plugin node's attributes as Python values (strings decoded)."""
    import onnx

    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def swap_in_imoe_layers(network, onnx_model, trt) -> ImoeSwap:  # pragma: no cover - TensorRT + SM100 only
    """Replace each accepted experts plugin layer of a parsed `network` by an IMoELayer (see module doc)."""
    nodes = {n.output[0]: n for n in onnx_model.graph.node if n.op_type == PLUGIN.name}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    consumers: dict[str, list] = {}
    for layer in layers:
        for i in range(layer.num_inputs):
            t = layer.get_input(i)
            if t is not None:
                consumers.setdefault(t.name, []).append((layer, i))
    swap = ImoeSwap()
    for layer in layers:
        # the parser names each ITensor after its ONNX value, so the plugin layer is found by its output
        out = layer.get_output(0) if layer.num_outputs else None
        node = nodes.get(out.name) if out is not None else None
        if node is None:
            continue
        fields = plugin_fields(node)
        reason = imoe_refusal(fields)
        if reason:
            swap.refused[node.name] = reason
            continue
        inputs = {name: layer.get_input(i) for i, name in enumerate(PLUGIN.inputs)}
        hsize, k = int(fields["hidden_size"]), int(fields["top_k"])

        def reshape(t, dims):
            s = network.add_shuffle(t)
            s.reshape_dims = dims
            return s.get_output(0)

        def view(name):
            src, v = imoe_views(int(fields["intermediate_size"]))[name]
            t = inputs[src]
            if v.start or v.length is not None:
                shape = tuple(t.shape)
                n = shape[1] - v.start if v.length is None else v.length
                t = network.add_slice(t, (0, v.start) + (0,) * (len(shape) - 2), (shape[0], n) + shape[2:],
                                      (1,) * len(shape)).get_output(0)
            if v.perm:
                s = network.add_shuffle(t)
                s.first_transpose = v.perm
                t = s.get_output(0)
            return t

        moe = network.add_moe(reshape(inputs["hidden"], (1, -1, hsize)), reshape(inputs["topk_ids"], (1, -1, k)),
                              reshape(inputs["topk_weights"], (1, -1, k)))
        if moe is None:
            swap.refused[node.name] = "network.add_moe returned no layer"
            continue
        moe.name = f"{node.name}/imoe"
        moe.set_gated_weights(view("fc_gate_weights"), view("fc_up_weights"), view("fc_down_weights"),
                              getattr(trt.MoEActType, IMOE_ACTIVATIONS[fields["activation"]]))
        if int(fields.get("has_bias", 0)):
            moe.set_gated_biases(view("fc_gate_biases"), view("fc_up_biases"), view("fc_down_biases"))
        new = network.add_cast(reshape(moe.get_output(0), (-1, hsize)), trt.float32).get_output(0)
        for consumer, i in consumers.get(out.name, []):
            consumer.set_input(i, new)
        if out.is_network_output:
            name = out.name
            network.unmark_output(out)
            out.name = f"{name}/plugin"
            new.name = name
            network.mark_output(new)
        swap.swapped.append(node.name)
    return swap

"""The TensorRT experts plugin's contract (no torch import: read by planning and verification too)."""

from __future__ import annotations

from dataclasses import dataclass

from moec.activations import ACTIVATIONS


@dataclass(frozen=True)
class PluginSpec:
    """How the experts plugin appears in ONNX and in TensorRT's plugin registry.

    The node always has all inputs (TensorRT's Python plugins take a fixed input list): the ones a
    layer lacks (biases, scales, zero points) are 1-element placeholders that the fields mark unused.
    The output aliases `accumulator` (a zero-filled fp32 [T, H] the graph makes; TensorRT's I/O
    aliasing), so the one-launch AOT kernel can add expert outputs atomically without a memset.
    """

    name: str = "MoeExperts"
    namespace: str = "moec"
    # tensorrt.plugin registers every Python plugin as version "1" and the parser matches name, namespace
    # and version exactly, so the version can't mark contract changes: a new contract needs a new name
    version: str = "1"
    domain: str = "trt.plugins"  # TensorRT's parser keys on op_type + plugin_* attributes, not the domain
    inputs: tuple[str, ...] = ("hidden", "topk_ids", "topk_weights", "w_gate_up", "w_down", "b_gate_up", "b_down",
                               "s_gate_up", "z_gate_up", "s_down", "z_down", "accumulator")
    fields: tuple[tuple[str, str], ...] = (
        ("num_experts", "int"), ("top_k", "int"), ("hidden_size", "int"), ("intermediate_size", "int"),
        ("activation", "string: " + "|".join(ACTIVATIONS)), ("gated", "int 0/1"),
        ("alpha", "float"), ("beta", "float"), ("limit", "float, 0 = no clamp"),
        ("weight_on_input", "int 0/1"), ("has_bias", "int 0/1"),
        ("quant_bits", "int: 0 = float weights, 4 or 8 = packed codes"),
        ("group_size_gate_up", "int: input columns per scale of w_gate_up (0 when float)"),
        ("group_size_down", "int: input columns per scale of w_down (0 when float)"),
        ("has_zero_points", "int 0/1"),
    )

    def describe(self) -> dict:
        return {
            "plugin_name": self.name, "plugin_namespace": self.namespace, "plugin_version": self.version,
            "onnx_domain": self.domain, "inputs": list(self.inputs),
            "input_notes": {
                "topk_ids": "int32 [T, k]", "topk_weights": "like hidden, [T, k]",
                "w_gate_up": "[E, 2I, H] gate rows then up rows ([E, I, H] when gated=0); quantized: uint8 "
                             "[E, 2I, H * bits / 8], 4-bit codes two per byte, the even column in the low nibble",
                "w_down": "[E, H, I]; quantized: uint8 [E, H, I * bits / 8]",
                "b_gate_up": "[E, 2I] when has_bias, else a 1-element placeholder", "b_down": "[E, H] likewise",
                "s_gate_up": "float32 [E, 2I, H / group_size_gate_up] when quantized, else a placeholder",
                "z_gate_up": "uint8, shaped like s_gate_up, when has_zero_points (else zero point 2^(bits-1))",
                "s_down": "float32 [E, H, I / group_size_down]", "z_down": "uint8, shaped like s_down",
                "accumulator": "float32 [T, H], zeros; the output aliases it",
            },
            "fields": dict(self.fields), "output": "float32 [T, H] (aliases accumulator)",
            "onnx_only_attributes": {"aot": "int 1: TensorRT's parser asks for the AOT implementation (engines "
                                            "that run without Python); 0: for the JIT one (Python in the process)"},
        }


PLUGIN = PluginSpec()

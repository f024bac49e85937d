"""The TensorRT experts plugin's contract (no torch import: read by planning and verification too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PluginSpec:
    """How the experts plugin appears in ONNX and in TensorRT's plugin registry."""

    name: str = "MoeExperts"
    namespace: str = "moec"
    version: str = "1"
    domain: str = "trt.plugins"  # TensorRT's parser keys on op_type + plugin_* attributes, not the domain
    inputs: tuple[str, ...] = ("hidden", "topk_ids", "topk_weights", "w_gate_up", "w_down", "b_gate_up", "b_down")
    fields: tuple[tuple[str, str], ...] = (
        ("num_experts", "int"), ("top_k", "int"), ("hidden_size", "int"), ("intermediate_size", "int"),
        ("activation", "string: silu|gelu_tanh|gelu|relu|identity|swiglu"), ("gated", "int 0/1"),
        ("alpha", "float"), ("beta", "float"), ("limit", "float, 0 = no clamp"),
        ("weight_on_input", "int 0/1"), ("has_bias", "int 0/1"),
    )

    def describe(self) -> dict:
        return {
            "plugin_name": self.name, "plugin_namespace": self.namespace, "plugin_version": self.version,
            "onnx_domain": self.domain, "inputs": list(self.inputs),
            "input_notes": {"topk_ids": "int32 [T, k]", "topk_weights": "float [T, k]",
                            "w_gate_up": "[E, 2I, H] gate rows then up rows ([E, I, H] when gated=0)",
                            "w_down": "[E, H, I]", "b_gate_up": "[E, 2I], present iff has_bias",
                            "b_down": "[E, H], present iff has_bias"},
            "fields": dict(self.fields), "output": "float [T, H]",
        }


PLUGIN = PluginSpec()

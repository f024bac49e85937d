"""TensorRT registration of moec's experts plugin (``moec::MoeExperts`` v1), via tensorrt.plugin (QDP).

Real code against TensorRT's documented Python plugin API (TensorRT >= 10.7): `register` gives the
output description (shaped like the hidden states), `impl` runs moec's Triton kernels on the stream
TensorRT hands over, and `autotune` offers the kernels' tile configurations as tactics. An `aot_impl`
(engines that run without Python) needs the whole op as one kernel launch; moec's kernels need a
host-side sort by expert first, so this plugin is JIT (Python in the serving process) for now.

Importing this module never needs TensorRT; `register_plugins()` does, and says why when it can't.
"""

from __future__ import annotations

from moec.plugin_spec import PLUGIN


class TensorRTUnavailable(RuntimeError):
    pass


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except ImportError as exc:
        return False, (f"TensorRT's Python package is not installed ({exc}); install it from NVIDIA's index on "
                       "a host with an NVIDIA GPU (pip install 'moec[tensorrt]')")
    return True, ""


_REGISTERED = False


def register_plugins() -> str:
    """Register moec::MoeExperts with TensorRT's plugin registry; returns the plugin id."""
    global _REGISTERED
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(reason)
    plugin_id = f"{PLUGIN.namespace}::{PLUGIN.name}"
    if _REGISTERED:
        return plugin_id
    import numpy as np  # noqa: F401
    import tensorrt.plugin as trtp
    import torch

    from moec.plugins.moe_experts_triton import TILE_CONFIGS, moe_experts_triton

    @trtp.register(plugin_id)
    def _desc(hidden: trtp.TensorDesc, topk_ids: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
              w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, num_experts: int, top_k: int,
              hidden_size: int, intermediate_size: int, activation: str, gated: int, alpha: float, beta: float,
              limit: float, weight_on_input: int, has_bias: int):
        return hidden.like()

    @trtp.autotune(plugin_id)
    def _autotune(hidden: trtp.TensorDesc, topk_ids: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
                  w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, outputs):
        # fp32 / fp16 activations, int32 ids; one tactic per tile configuration
        return [trtp.AutoTuneCombination("FP32|FP16, INT32, FP32, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR",
                                         list(range(1, len(TILE_CONFIGS) + 1)))]

    @trtp.impl(plugin_id)
    def _impl(hidden: trtp.Tensor, topk_ids: trtp.Tensor, topk_weights: trtp.Tensor, w_gate_up: trtp.Tensor,
              w_down: trtp.Tensor, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
              activation: str, gated: int, alpha: float, beta: float, limit: float, weight_on_input: int,
              has_bias: int, outputs, stream: int, tactic: int):
        as_torch = lambda t: torch.as_tensor(t, device="cuda")  # noqa: E731  (__cuda_array_interface__)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = moe_experts_triton(
                as_torch(hidden), as_torch(topk_ids).long(), as_torch(topk_weights), as_torch(w_gate_up),
                as_torch(w_down), None, None, activation, bool(gated), alpha, beta,
                limit if limit > 0 else float("inf"), bool(weight_on_input),
                config=TILE_CONFIGS[max(tactic, 1) - 1],
            )
            as_torch(outputs[0]).copy_(out)

    _REGISTERED = True
    return plugin_id

"""TensorRT registration of moec's experts plugin (``moec::MoeExperts`` v1), via tensorrt.plugin (QDP).

Real code against TensorRT's documented Python plugin API (TensorRT >= 10.9, the first with `aot_impl`):
- `register`: the output is fp32 [T, H] and aliases the `accumulator` input (I/O aliasing), so
  both implementations add into memory the graph zero-filled;
- `autotune`: the dtypes the kernels take and one tactic per tile configuration;
- `impl` (JIT, Python in the serving process): the sorted two-kernel path, moe_experts_triton.py;
- `aot_impl` (engines that run without Python; the ONNX node carries ``aot=1``, moec's
  --tensorrt-aot): the one-launch kernel of moe_experts_fused.py, compiled to PTX for the build
  GPU and launched by TensorRT with (inputs..., T, output).
The AOT kernel's PTX and TensorRT's argument order were checked by launching the PTX through the
CUDA driver on an H100 (tests/plugins, MOEC_KERNEL_TESTS_ON_GPU=1); TensorRT itself could not be
installed where moec is developed, so registration and engine builds are untested there.

Importing this module never needs TensorRT; `register_plugins()` does, and says why when it can't.

No ``from __future__ import annotations`` here: tensorrt.plugin validates the decorated functions'
annotations with ``inspect.signature`` and ``issubclass``, so they must be classes, not strings
(tests/plugins/test_tensorrt_plugin_signatures.py checks the rules statically).
"""

from typing import Tuple, Union

from moec.targets.tensorrt.plugin_spec import PLUGIN


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
FLOATS = "FP32|FP16|BF16"


def torch_dtypes() -> dict:
    """TensorRT DataType -> torch dtype, for the types moec's plugin and engine I/O use (needs TensorRT)."""
    import tensorrt as trt
    import torch

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.uint8: torch.uint8,
            trt.bool: torch.bool}


def type_combination(quant_bits: int) -> str:
    """AutoTuneCombination types, positionally: the 12 inputs of PLUGIN.inputs, then the output."""
    weights = "UINT8" if quant_bits else FLOATS
    return ", ".join([FLOATS, "INT32", FLOATS, weights, weights, FLOATS, FLOATS,
                      "FP32", "UINT8", "FP32", "UINT8", "FP32", "FP32"])


def register_plugins() -> str:
    """Register moec::MoeExperts with TensorRT's plugin registry; returns the plugin id."""
    global _REGISTERED
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(reason)
    plugin_id = f"{PLUGIN.namespace}::{PLUGIN.name}"
    if _REGISTERED:
        return plugin_id
    import tensorrt.plugin as trtp
    import torch

    from moec.plugins.moe_experts_fused import FUSED_CONFIGS, ExpertsLayout, compile_aot, plan_launch
    from moec.plugins.moe_experts_triton import TILE_CONFIGS, PackedExpertWeight, moe_experts_triton

    to_torch = torch_dtypes()
    tactics = list(range(1, max(len(TILE_CONFIGS), len(FUSED_CONFIGS)) + 1))

    @trtp.register(plugin_id)
    def _desc(hidden: trtp.TensorDesc, topk_ids: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
              w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, b_gate_up: trtp.TensorDesc,
              b_down: trtp.TensorDesc, s_gate_up: trtp.TensorDesc, z_gate_up: trtp.TensorDesc,
              s_down: trtp.TensorDesc, z_down: trtp.TensorDesc, accumulator: trtp.TensorDesc,
              num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str, gated: int,
              alpha: float, beta: float, limit: float, weight_on_input: int, has_bias: int, quant_bits: int,
              group_size_gate_up: int, group_size_down: int, has_zero_points: int) -> trtp.TensorDesc:
        return accumulator.aliased()

    @trtp.autotune(plugin_id)
    def _autotune(hidden: trtp.TensorDesc, topk_ids: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
                  w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, b_gate_up: trtp.TensorDesc,
                  b_down: trtp.TensorDesc, s_gate_up: trtp.TensorDesc, z_gate_up: trtp.TensorDesc,
                  s_down: trtp.TensorDesc, z_down: trtp.TensorDesc, accumulator: trtp.TensorDesc,
                  quant_bits: int, outputs):
        return [trtp.AutoTuneCombination(type_combination(quant_bits), "LINEAR", tactics)]

    def layout(quant_bits, num_experts, gated, hidden_size, intermediate_size, g1, g2, zps) -> ExpertsLayout:
        rows = (2 if gated else 1) * intermediate_size
        return ExpertsLayout(num_experts, rows, hidden_size, intermediate_size, quant_bits,
                             g1 if quant_bits else 1, g2 if quant_bits else 1, bool(zps))

    @trtp.impl(plugin_id)
    def _impl(hidden: trtp.Tensor, topk_ids: trtp.Tensor, topk_weights: trtp.Tensor, w_gate_up: trtp.Tensor,
              w_down: trtp.Tensor, b_gate_up: trtp.Tensor, b_down: trtp.Tensor, s_gate_up: trtp.Tensor,
              z_gate_up: trtp.Tensor, s_down: trtp.Tensor, z_down: trtp.Tensor, accumulator: trtp.Tensor,
              num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str, gated: int,
              alpha: float, beta: float, limit: float, weight_on_input: int, has_bias: int, quant_bits: int,
              group_size_gate_up: int, group_size_down: int, has_zero_points: int, outputs, stream: int,
              tactic: int):
        t = lambda x: torch.as_tensor(x, device="cuda")  # noqa: E731  (__cuda_array_interface__)
        w1, w2 = t(w_gate_up), t(w_down)
        if quant_bits:
            zps = (t(z_gate_up), t(z_down)) if has_zero_points else (None, None)
            w1 = PackedExpertWeight(w1, t(s_gate_up), zps[0], quant_bits, hidden_size)
            w2 = PackedExpertWeight(w2, t(s_down), zps[1], quant_bits, intermediate_size)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            moe_experts_triton(
                t(hidden), t(topk_ids), t(topk_weights), w1, w2, t(b_gate_up) if has_bias else None,
                t(b_down) if has_bias else None, activation, bool(gated), alpha, beta,
                limit if limit > 0 else float("inf"), bool(weight_on_input),
                config=TILE_CONFIGS[(max(tactic, 1) - 1) % len(TILE_CONFIGS)],
                accumulate_into=t(outputs[0]),  # aliases the zero-filled accumulator
            )

    @trtp.aot_impl(plugin_id)
    def _aot_impl(hidden: trtp.TensorDesc, topk_ids: trtp.TensorDesc, topk_weights: trtp.TensorDesc,
                  w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, b_gate_up: trtp.TensorDesc,
                  b_down: trtp.TensorDesc, s_gate_up: trtp.TensorDesc, z_gate_up: trtp.TensorDesc,
                  s_down: trtp.TensorDesc, z_down: trtp.TensorDesc, accumulator: trtp.TensorDesc,
                  num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str,
                  gated: int, alpha: float, beta: float, limit: float, weight_on_input: int, has_bias: int,
                  quant_bits: int, group_size_gate_up: int, group_size_down: int, has_zero_points: int,
                  outputs, tactic: int
                  ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        cfg = FUSED_CONFIGS[(max(tactic, 1) - 1) % len(FUSED_CONFIGS)]
        dtype = to_torch[hidden.dtype]
        plan = plan_launch(dtype, layout(quant_bits, num_experts, gated, hidden_size, intermediate_size,
                                         group_size_gate_up, group_size_down, has_zero_points),
                           top_k, bool(has_bias), activation, bool(gated), alpha, beta, limit,
                           bool(weight_on_input), cfg)
        major, minor = torch.cuda.get_device_capability()
        kernel = compile_aot(dtype, to_torch[w_gate_up.dtype], plan, cfg.block_t, major * 10 + minor,
                             bias_dtype=to_torch[b_gate_up.dtype])
        tokens = hidden.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = kernel.grid_xy
        launch.grid_z = trtp.cdiv(tokens, cfg.block_t)
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_mem
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(tokens)])
        return kernel.name.encode(), kernel.ptx.encode(), launch, extra_args

    _REGISTERED = True
    return plugin_id

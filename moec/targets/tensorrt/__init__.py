"""The tensorrt target: ONNX for TensorRT's ONNX parser, experts as moec's plugin, engines where possible.

Routing runs as standard ops and each fused layer's experts as one ``moec::MoeExperts`` plugin node
(lower_moe_tensorrt.py; the node's contract: plugin_spec.py; its op and translation: ops.py,
translations.py). ONNX Runtime can't run plugin nodes, so the artifact is verified and planned on a
copy whose plugin nodes are expanded to their reference subgraph (plugin_reference.py). Beside the
model it writes plugins.json and, where TensorRT and a GPU exist, the engine (artifact.py, engine.py,
imoe.py); the plugin's kernels and TensorRT registration live in plugins/.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from moec.targets.base import ArtifactContext, ExpertNode, Target, TritonModel
from moec.targets.tensorrt.plugin_spec import PLUGIN


class TensorRTTarget(Target):
    name = "tensorrt"
    description = "ONNX for TensorRT with moec's experts plugin (engine built where TensorRT and a GPU exist)"
    own_options = {"tensorrt_aot": "asks for the TensorRT plugin's AOT implementation"}

    def check_options(self, options) -> None:
        from moec.errors import MoecError
        from moec.targets.tensorrt.lower_moe_tensorrt import PLUGIN_BITS

        quant = options.extra.get("quant")
        if quant == "auto":
            raise MoecError("--quant auto: the tensorrt target's experts plugin takes one precision for the model; "
                            "give --quant int4|int8, or use --target onnxruntime. Nothing was written.")
        if quant and int(quant[3:]) not in PLUGIN_BITS:
            raise MoecError(f"--quant {quant}: the tensorrt target's experts plugin dequantizes 4- and 8-bit codes; "
                            "use --quant int4|int8 here, or --target onnxruntime (QMoE runs 2-bit experts). "
                            "Nothing was written.")

    def lowering_passes(self, options) -> Sequence:
        from moec.targets.tensorrt.lower_moe_tensorrt import LowerMoEForTensorRT

        return [LowerMoEForTensorRT()]

    def translations(self) -> Mapping[Callable, Callable]:
        from moec.targets.tensorrt.translations import translations

        return translations()

    def expert_nodes(self) -> Sequence[ExpertNode]:
        return (ExpertNode(PLUGIN.domain, PLUGIN.name, PLUGIN.inputs.index("w_gate_up"), "top_k"),)

    def evaluable_model(self, model):
        from moec.targets.tensorrt.plugin_reference import substitute_plugins

        return substitute_plugins(model)  # plugin nodes keep their output names and shapes

    def describe_evaluation(self) -> str:
        return "plugin nodes replaced by their reference subgraph (moec/targets/tensorrt/plugin_reference.py)"

    def write_extras(self, artifact: ArtifactContext) -> Optional[dict]:
        from moec.targets.tensorrt.artifact import write_tensorrt_extras

        return write_tensorrt_extras(artifact.workdir, artifact.report, artifact.log)

    def summary(self, report: dict, out_dir: str) -> list[str]:
        trt = report.get(self.name) or {}
        if not trt:
            return []
        lines = [f"TensorRT plugin: {trt['plugin']} (definitions in {out_dir}/plugins.json)"]
        engine = trt["engine"]
        if not engine["built"]:
            lines.append(f"TensorRT engine: skipped — {engine['reason']}; to build it: {engine['how_to_build']}")
        return lines

    def triton_model(self, artifact: ArtifactContext) -> TritonModel:
        from moec.targets.tensorrt.artifact import triton_model

        return triton_model(artifact)


TARGET = TensorRTTarget()

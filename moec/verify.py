"""`moec verify`: run an artifact (in ONNX Runtime, as a TensorRT engine, or through a Triton server)
on golden inputs.

Exit codes: 0 all outputs within tolerance; 10 numerics mismatch; 11 golden files missing or
corrupt; 12 artifact missing or unloadable; 13 golden inputs don't fit the artifact; 14 server
unreachable; 15 model not ready on the server (the server's reason is quoted).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from moec import golden as goldens
from moec.errors import ArtifactError, ModelNotReadyError, NumericsMismatchError, ServerError, SignatureMismatchError


@dataclass
class VerifyResult:
    checks: list
    tolerance: float
    seconds: float
    runner: str
    generation: list = field(default_factory=list)  # moec.greedy.GenerationCheck per runner (decoders)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(g.passed for g in self.generation)

    @property
    def worst_rel_l2(self) -> float:
        return max(c.rel_l2 for c in self.checks)

    @property
    def failures(self) -> str:
        return "; ".join([f"{c.probe}/{c.output}: {c.reason}" for c in self.checks if not c.passed]
                         + [f"greedy generation: {g.describe()}" for g in self.generation if not g.passed])


class OrtRunner:
    """A model in ONNX Runtime (CPU). `evaluable(model) -> (model, n)` first rewrites what ONNX Runtime
    can't run (a target's custom nodes, expanded to their reference subgraphs); without it the file
    is loaded as it is (external data included). A bf16 model runs widened to fp32 on its bf16 weights
    (moec.widen_bf16: the CPU provider has no bf16 kernels); `widened` says so."""

    def __init__(self, path: str, evaluable=None):
        import onnx
        import onnxruntime as ort

        from moec.widen_bf16 import has_bf16, widened_session

        if not os.path.isfile(path):
            raise ArtifactError(f"no {os.path.basename(path)} in '{os.path.dirname(path)}'; is it a moec artifact "
                                "directory?")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        n_expanded = 0
        self.widened = None
        try:
            model = None
            if evaluable is not None:
                model, n_expanded = evaluable(onnx.load(path))
            elif has_bf16(head := onnx.load(path, load_external_data=False)):
                model = head  # its weights are read as it is widened
            if model is not None and has_bf16(model):
                widened = widened_session(model, os.path.dirname(os.path.abspath(path)), lambda: opts)
                self.session, self.widened, self._values = widened.session, widened.widened, widened.values
            elif model is None:
                self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                                    providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ArtifactError(f"cannot load '{path}' in ONNX Runtime: {type(exc).__name__}: {str(exc)[:400]}") from exc
        self.name = "onnxruntime" + (f" (+{n_expanded} plugin reference subgraphs)" if n_expanded else "")
        if self.widened is not None:
            self.name += " (bf16 widened to fp32)"
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    @classmethod
    def for_artifact(cls, artifact_dir: str) -> "OrtRunner":
        """The artifact's model.onnx, with its target's nodes made runnable (the target from report.json;
        every registered target's when there is no report)."""
        from moec import targets
        from moec.targets.base import evaluable_by

        report = os.path.join(artifact_dir, "report.json")
        chosen = targets.all_targets()
        if os.path.isfile(report):
            try:
                with open(report) as f:
                    chosen = [targets.get(json.load(f)["target"])]
            except Exception:  # an unreadable report or unknown target: try them all
                pass

        return cls(os.path.join(artifact_dir, "model.onnx"), evaluable_by(chosen))

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        type_names = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
                      "tensor(float16)": "float16"}
        check_signature(feeds, {n: (type_names.get(i.type), len(i.shape), i.type, i.shape) for n, i in self.inputs.items()})

    def run(self, feeds):
        return dict(zip(self.outputs, self.session.run(None, feeds)))


def check_signature(feeds: dict[str, np.ndarray], inputs: dict[str, tuple]) -> None:
    """Golden inputs against the artifact's: name -> (numpy dtype name, rank, type and shape as the artifact says)."""
    if set(feeds) != set(inputs):
        raise SignatureMismatchError(f"golden inputs {sorted(feeds)} != artifact inputs {sorted(inputs)}")
    for name, arr in feeds.items():
        dtype, rank, kind, shape = inputs[name]
        if dtype != str(arr.dtype) or rank != arr.ndim:
            raise SignatureMismatchError(f"golden input '{name}' is {arr.dtype} rank {arr.ndim}; the artifact expects "
                                         f"{kind} with shape {shape}")


class SegmentedRunner:
    """The artifact in ONNX Runtime one decoder layer at a time (moec.segmented_run): only one layer's weights
    are loaded at once, so an out-of-core compile's artifact verifies on the machine that made it."""

    def __init__(self, artifact_dir: str):
        import onnx

        self.path = os.path.join(artifact_dir, "model.onnx")
        if not os.path.isfile(self.path):
            raise ArtifactError(f"no model.onnx in '{artifact_dir}'; is it a moec artifact directory?")
        graph = onnx.load(self.path, load_external_data=False).graph
        self.outputs = [o.name for o in graph.output]
        self.inputs = {}
        for i in graph.input:
            t = i.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            self.inputs[i.name] = (str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))), len(dims),
                                   onnx.TensorProto.DataType.Name(t.elem_type), dims)
        self.name = "onnxruntime, one decoder layer at a time"

    def check_inputs(self, feeds) -> None:
        check_signature(feeds, self.inputs)

    def run(self, feeds):
        from moec.segmented_run import run_segmented

        return run_segmented(self.path, feeds).outputs


def out_of_core(artifact_dir: str) -> bool:
    """The artifact says it was compiled out of core (its report), so it may not fit one session."""
    try:
        with open(os.path.join(artifact_dir, "report.json")) as f:
            return bool(json.load(f).get("out_of_core"))
    except (OSError, ValueError):
        return False


class TritonRunner:
    """The model served by a running Triton server, over HTTP."""

    def __init__(self, url: str, model: str):
        import tritonclient.http as http

        from moec.server import model_failure_reason

        self.http, self.model_name, self.name = http, model, f"triton {url} model '{model}'"
        try:
            self.client = http.InferenceServerClient(url, network_timeout=60.0)
            live = self.client.is_server_live()
        except Exception as exc:
            raise ServerError(f"Triton server at '{url}' is unreachable: {type(exc).__name__}: {exc}") from exc
        if not live:
            raise ServerError(f"Triton server at '{url}' answers but is not live.")
        if not self.client.is_model_ready(model):
            reason = model_failure_reason(url, model) or "not loaded (is it in the server's model repository?)"
            raise ModelNotReadyError(f"model '{model}' is not ready on {url}: {reason}")
        meta = self.client.get_model_metadata(model)
        self.inputs = {i["name"]: i for i in meta["inputs"]}
        self.outputs = [o["name"] for o in meta["outputs"]]

    def check_inputs(self, feeds) -> None:
        dtypes = {"FP32": "float32", "INT64": "int64", "INT32": "int32", "FP16": "float16"}
        if set(feeds) != set(self.inputs):
            raise SignatureMismatchError(f"golden inputs {sorted(feeds)} != model inputs {sorted(self.inputs)}")
        for name, arr in feeds.items():
            if dtypes.get(self.inputs[name]["datatype"]) != str(arr.dtype):
                raise SignatureMismatchError(f"golden input '{name}' is {arr.dtype}; the model expects "
                                             f"{self.inputs[name]['datatype']}")

    def run(self, feeds):
        reqs = []
        for name, arr in feeds.items():
            i = self.http.InferInput(name, list(arr.shape), self.inputs[name]["datatype"])
            i.set_data_from_numpy(arr)
            reqs.append(i)
        res = self.client.infer(self.model_name, reqs)
        return {n: res.as_numpy(n) for n in self.outputs}


class GenerateEndpoint:
    """A text-generation model served through Triton's generate extension (POST .../generate)."""

    def __init__(self, url: str, model: str):
        self.url = url if "://" in url else f"http://{url}"
        self.model_name, self.name = model, f"triton {url} model '{model}' (generate extension)"

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        import urllib.error
        import urllib.request

        body = json.dumps({"input_ids": list(map(int, prompt)), "max_tokens": int(max_tokens)}).encode()
        req = urllib.request.Request(f"{self.url}/v2/models/{self.model_name}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return [int(t) for t in json.loads(r.read())["output_ids"]]
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{self.name} refused a generate request: HTTP {exc.code}: "
                              f"{exc.read().decode(errors='replace')[:400]}") from exc


def serves_generate(runner) -> bool:
    """A Triton model whose inputs are the generate extension's (moec's text-generation model)."""
    return isinstance(runner, TritonRunner) and "max_tokens" in runner.inputs and "input_ids" in runner.inputs


class EngineRunner:
    """The artifact's TensorRT engine (model.plan, from `moec build-engine`), on the GPU."""

    def __init__(self, artifact_dir: str):
        from moec.targets.tensorrt.engine import EngineSession

        path = os.path.join(artifact_dir, "model.plan")
        if not os.path.isfile(path):
            raise ArtifactError(f"no TensorRT engine in '{artifact_dir}' (model.plan); build it with "
                                f"`moec build-engine {artifact_dir}` on a GPU host")
        self.session = EngineSession(path)  # loaded once for all probes
        self.name = f"tensorrt engine {path}"

    def check_inputs(self, feeds) -> None:
        pass  # EngineSession.run compares the names with the engine's and casts to its input types

    def run(self, feeds):
        return self.session.run(feeds)


def verify(artifact_dir: Optional[str], golden_dir: Optional[str] = None, *, server: Optional[str] = None,
           model_name: Optional[str] = None, tolerance: Optional[float] = None, engine: bool = False,
           segmented: Optional[bool] = None) -> VerifyResult:
    """`segmented`: run the artifact one decoder layer at a time (None: when it was compiled out of core)."""
    t = time.perf_counter()
    g = goldens.load(golden_dir or os.path.join(artifact_dir, "golden"))
    if server:
        runner = TritonRunner(server, model_name or "moe_model")
    elif engine:
        runner = EngineRunner(artifact_dir)
    elif segmented or (segmented is None and out_of_core(artifact_dir)):
        runner = SegmentedRunner(artifact_dir)
    else:
        runner = OrtRunner.for_artifact(artifact_dir)
    tol = tolerance if tolerance is not None else g.tolerance
    if server and serves_generate(runner):  # the golden's greedy runs through the generate endpoint
        from moec import greedy

        golden_path = golden_dir or os.path.join(artifact_dir, "golden")
        gen = greedy.load_generation_golden(golden_path)
        if gen is None:
            raise SignatureMismatchError(f"model '{runner.model_name}' serves text generation but '{golden_path}' "
                                         "has no generation golden; verify it against its compile's golden.")
        endpoint = GenerateEndpoint(server, model_name or "moe_model")
        check = greedy.check_generate(endpoint.name, gen, lambda prompts, n: [endpoint.generate(p, n) for p in prompts],
                                      "one request a prompt")
        return VerifyResult([], tol, time.perf_counter() - t, endpoint.name, [check])
    checks = []
    for probe in g.probes:
        runner.check_inputs(probe.inputs)
        checks.extend(goldens.compare(g, probe, runner.run(probe.inputs), tol))
    generation = []
    if not engine:
        generation = replay_generation(golden_dir or os.path.join(artifact_dir, "golden"), runner,
                                       None if server else artifact_dir, tolerance)
    return VerifyResult(checks, tol, time.perf_counter() - t, runner.name, generation)


def replay_generation(golden_dir: str, runner, artifact_dir: Optional[str], tolerance: Optional[float]) -> list:
    """A decoder's generation golden (greedy tokens and every step's logits) replayed through `runner`, and
    through onnxruntime-genai over `artifact_dir` when it has genai_config.json and genai is installed."""
    from moec import greedy

    g = greedy.load_generation_golden(golden_dir)
    if g is None:
        return []
    if tolerance is not None:
        g.tolerance = tolerance
    checks = [greedy.check(runner.name, g.runs, greedy.replay(g, greedy.session_step(runner)), g.tolerance)]
    if artifact_dir and os.path.isfile(os.path.join(artifact_dir, "genai_config.json")) and greedy.genai_available():
        checks.append(greedy.check_genai(artifact_dir, g))
    return checks


def raise_if_failed(result: VerifyResult) -> None:
    if not result.passed:
        raise NumericsMismatchError("verification failed: " + result.failures)

"""A Triton python-backend model serving a moec text-generation artifact with onnxruntime-genai.

Written by `moec compile --triton-repo` as REPO/NAME/VERSION/model.py beside the artifact's files
(model.onnx, genai_config.json, tokenizer files). It answers Triton's generate extension:

    POST /v2/models/NAME/generate         {"text_input": "...", "max_tokens": 16}   -> {"text_output": ...}
    POST /v2/models/NAME/generate         {"input_ids": [1, 2, 3], "max_tokens": 16} -> {"output_ids": [...]}
    POST /v2/models/NAME/generate_stream  {..., "stream": true}  -> one server-sent event per token

Greedy search (the artifact's genai_config.json defaults). The model is decoupled: with `stream` true
it sends one response per token, else one response with the whole continuation. `text_input` needs
the artifact's tokenizer (tokenizer.json); without it, send `input_ids`.
"""

import json
import os

import numpy as np
import onnxruntime_genai as og
import triton_python_backend_utils as pb_utils

DEFAULT_MAX_TOKENS = 16


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        self.model = og.Model(og.Config(here))
        self.tokenizer = og.Tokenizer(self.model) if os.path.isfile(os.path.join(here, "tokenizer.json")) else None
        with open(os.path.join(here, "genai_config.json")) as f:
            self.context_length = int(json.load(f)["model"]["context_length"])

    def _input(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _prompt(self, request) -> list:
        ids = self._input(request, "input_ids")
        if ids is not None:
            return [int(t) for t in ids.reshape(-1)]
        text = self._input(request, "text_input")
        if text is None:
            raise ValueError("send text_input (a string) or input_ids (token ids)")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (the compiled checkpoint had no tokenizer.json): send "
                             "input_ids instead of text_input")
        value = text.reshape(-1)[0]
        return [int(t) for t in self.tokenizer.encode(value.decode() if isinstance(value, bytes) else str(value))]

    def _response(self, ids: list, text):
        tensors = [pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64))]
        if text is not None:
            tensors.append(pb_utils.Tensor("text_output", np.asarray([text.encode()], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = self._prompt(request)
                max_tokens = self._input(request, "max_tokens")
                max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens.reshape(-1)[0])
                stream = self._input(request, "stream")
                stream = bool(stream.reshape(-1)[0]) if stream is not None else False
                if not prompt or max_tokens < 1:
                    raise ValueError("the prompt is empty or max_tokens < 1")
                if len(prompt) + max_tokens > self.context_length:
                    raise ValueError(f"a prompt of {len(prompt)} tokens and {max_tokens} new tokens need "
                                     f"{len(prompt) + max_tokens} positions; the model has {self.context_length}")
                params = og.GeneratorParams(self.model)
                params.set_search_options(max_length=len(prompt) + max_tokens, do_sample=False)
                generator = og.Generator(self.model, params)
                generator.append_tokens(np.asarray([prompt], dtype=np.int32))
                pieces = self.tokenizer.create_stream() if (stream and self.tokenizer is not None) else None
                sent = 0
                while not generator.is_done():
                    generator.generate_next_token()
                    if stream:  # genai's sequence leaves out end-of-sequence: stream what it keeps
                        new = [int(t) for t in generator.get_sequence(0)][len(prompt) + sent:]
                        for token in new:
                            sender.send(self._response([token], pieces.decode(token) if pieces else None))
                        sent += len(new)
                if stream:
                    sender.send(flags=final)
                else:
                    out = [int(t) for t in generator.get_sequence(0)][len(prompt):]
                    text = self.tokenizer.decode(np.asarray(out, dtype=np.int32)) if self.tokenizer else None
                    sender.send(self._response(out, text), flags=final)
            except Exception as exc:  # the client gets the reason; the model stays up
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                            flags=final)
        return None

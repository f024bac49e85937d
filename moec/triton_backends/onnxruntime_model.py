"""A python-based Triton backend named `onnxruntime`: serves `platform: "onnxruntime_onnx"` models.

Installed by tools/setup_triton_server.sh as <backend-dir>/onnxruntime/model.py, for servers that
lack Triton's C++ ONNX Runtime backend library (the nvidia-pytriton wheel). It runs the model
version's model.onnx with the onnxruntime package on CPU. Dynamic batching: Triton hands over
several requests at once; those with equal non-batch shapes are concatenated along dim 0, run
once and split back.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        name = cfg.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.batched = int(cfg.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        groups = {}
        for i, arrs in enumerate(arrays):
            key = tuple(a.shape[1:] if self.batched else a.shape for a in arrs)
            groups.setdefault(key, []).append(i)
        results = [None] * len(requests)
        for members in groups.values():
            if self.batched:
                feed = {n: np.concatenate([arrays[i][k] for i in members]) for k, n in enumerate(self.inputs)}
                outs = self.session.run(self.outputs, feed)
                sizes = np.cumsum([arrays[i][0].shape[0] for i in members])[:-1]
                for j, i in enumerate(members):
                    results[i] = [np.split(o, sizes)[j] for o in outs]
            else:
                for i in members:
                    results[i] = self.session.run(self.outputs, dict(zip(self.inputs, arrays[i])))
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)])
            for outs in results
        ]

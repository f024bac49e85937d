"""Weights as sharded external data: nothing inline, files within the shard size, a layer never split."""

import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moec.cli import main
from moec.external_data import INLINE_BELOW, layer_key, plan_shards


def _value(name, nbytes):
    return SimpleNamespace(name=name, const_value=SimpleNamespace(nbytes=nbytes))


def test_shards_hold_whole_layers_in_order():
    values = [_value("embed.weight", 300), _value("model.layers.0.a", 200), _value("model.layers.0.b", 200),
              _value("model.layers.1.a", 500), _value("model.layers.2.a", 900), _value("lm_head.weight", 300)]
    shards = plan_shards(values, 700, "model.onnx")
    assert [[v.name for v in s.tensors] for s in shards] == [
        ["embed.weight", "lm_head.weight"],  # the non-layer tensors are one group, placed where it first appears
        ["model.layers.0.a", "model.layers.0.b"], ["model.layers.1.a"], ["model.layers.2.a"]]
    assert [s.file for s in shards][0] == "model.onnx-00001-of-00004.data"
    assert shards[3].bytes == 900  # one layer over the size gets a shard of its own
    assert [s.file for s in plan_shards(values, 10**9, "model.onnx")] == ["model.onnx.data"]
    assert layer_key("model.model.layers.12.mlp.fc1") == "layers.12" and layer_key("val_3") == ""


@pytest.mark.slow
def test_compile_writes_sharded_weights_onnxruntime_loads(tmp_path):
    out, repo = tmp_path / "a", tmp_path / "repo"
    assert main(["compile", "--out", str(out), "--shard-size", "700KiB", "--triton-repo", str(repo), "--quiet"]) == 0
    report = json.load(open(out / "report.json"))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".data"))
    assert len(shards) >= 3 and set(shards) <= set(report["files"])
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inline = [i.name for i in model.graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL and len(i.raw_data) >= INLINE_BELOW]
    assert not inline, inline  # the graph holds no weight bytes
    where = {}
    for i in model.graph.initializer:
        if i.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in i.external_data}["location"]
            where.setdefault(layer_key(i.name) or i.name, set()).add(loc)
    assert all(len(files) == 1 for files in where.values()), where  # a layer never split
    layers = {k for k in where if k.startswith("layers.")}
    assert len(layers) == 4
    sizes = {f: os.path.getsize(out / f) for f in shards}
    single_layer = {next(iter(fs)) for k, fs in where.items() if k.startswith("layers.")}
    assert all(s <= 700 * 1024 or f in single_layer for f, s in sizes.items()), sizes
    assert report["numerics"]["passed"] and main(["verify", str(out)]) == 0
    version = repo / "moe_model" / "1"
    assert set(shards) <= set(os.listdir(version))  # the Triton model carries every shard
    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.load(out / "golden" / "probe0.input.input_ids.npy")
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0],
                               np.load(out / "golden" / "probe0.output.logits.npy"), rtol=1e-4, atol=1e-4)


def test_shard_size_must_be_positive(tmp_path, capsys):
    assert main(["compile", "--out", str(tmp_path / "a"), "--shard-size", "0"]) == 2
    assert "--shard-size 0" in capsys.readouterr().err and not os.path.exists(tmp_path / "a")

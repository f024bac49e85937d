"""Broken checkpoints are refused before loading, naming the file and the tensor (exit 3, nothing written)."""

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from moec import zoo
from moec.cli import main
from moec.errors import SourceError
from moec.sources import load_source


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real transformers checkpoint (qwen3_moe, tiny config), saved in two shards with an index."""
    root = tmp_path_factory.mktemp("ckpt") / "qwen3"
    zoo.build_hf_model("qwen3_moe").save_pretrained(root, max_shard_size="200KB")
    assert (root / "model.safetensors.index.json").exists()
    return root


def _copy(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def _shards(root):
    return sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))


def test_a_truncated_shard_is_named_with_its_tensor(checkpoint, tmp_path, capsys):
    bad = _copy(checkpoint, tmp_path / "bad")
    shard = bad / _shards(bad)[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(SourceError, match=rf"'{shard}' is truncated: .* but tensor '[\w.]+' needs bytes up to"):
        load_source(str(bad))
    assert main(["compile", str(bad), "--out", str(tmp_path / "out")]) == 3
    assert "truncated" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")


def test_a_corrupted_header_is_named(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "bad")
    shard = bad / _shards(bad)[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at!"
    shard.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=rf"'{shard}' has a corrupted safetensors header"):
        load_source(str(bad))


def test_a_shard_missing_from_the_directory_is_named(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "bad")
    gone = _shards(bad)[0]
    os.remove(bad / gone)
    with pytest.raises(SourceError, match=rf"lists shard '{gone}' \(tensor '[\w.]+' and \d+ more\), which is not"):
        load_source(str(bad))


def test_an_index_that_disagrees_with_its_shard_is_named(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first, second = _shards(bad)[:2]
    moved = next(t for t, s in index["weight_map"].items() if s == first)
    index["weight_map"][moved] = second
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=rf"does not hold tensor '{moved}'"):
        load_source(str(bad))


@pytest.mark.slow
def test_a_tensor_the_config_needs_but_the_checkpoint_lacks_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    zoo.build_hf_model("qwen3_moe").save_pretrained(root)
    tensors = load_file(root / "model.safetensors")
    gone = next(k for k in tensors if "q_proj" in k)
    del tensors[gone]
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=rf"lacks 1 tensor\(s\) .* e\.g\. '{gone}'"):
        load_source(str(root))

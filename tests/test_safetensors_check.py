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


def test_tensor_files_read_each_tensor_as_safetensors_does(tmp_path):
    """moec.safetensors_check.TensorFiles (plain reads, no mapping): every dtype per-Linear checkpoints use, an
    empty tensor, bf16 bit for bit; a tensor the header lacks and a header whose byte range disagrees with the
    shape are named with the file."""
    import struct

    import torch

    from moec.safetensors_check import TensorFiles

    g = torch.Generator().manual_seed(0)
    state = {"w.qweight": torch.randint(-2**31, 2**31 - 1, (6, 5), generator=g, dtype=torch.int32),
             "w.scales": torch.rand(2, 5, generator=g).half(), "w.bf": torch.randn(3, 4, generator=g).bfloat16(),
             "w.u8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8), "w.empty": torch.zeros(0, 4),
             "w.shape": torch.tensor([5, 48])}
    file = str(tmp_path / "a.safetensors")
    save_file(state, file)
    files = TensorFiles()
    for name, want in load_file(file).items():
        got = files.read(file, name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
    with pytest.raises(SourceError, match="a.safetensors': tensor 'w.nope' is not in its header"):
        files.read(file, "w.nope")
    raw = open(file, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["w.u8"]["shape"] = [8]  # 8 bytes claimed over the 7 stored (the file still holds the range)
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    bad = str(tmp_path / "b.safetensors")
    open(bad, "wb").write(raw[:8] + text + raw[8 + n:])
    with pytest.raises(SourceError, match="b.safetensors' has a corrupted safetensors header: tensor 'w.u8'"):
        TensorFiles().read(bad, "w.u8")

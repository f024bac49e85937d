"""LazyCheckpoint: one layer group read at a time, through transformers' own checkpoint conversion."""

import pytest
import torch

from moec import zoo
from moec.errors import SourceError
from moec.lazy_checkpoint import LazyCheckpoint, decoder_layers, parameters_on_meta, release


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lazy") / "qwen3_moe")
    zoo.build_hf_model("qwen3_moe").save_pretrained(path, max_shard_size="100KB")
    return path


def test_groups_are_the_decoder_layers_and_the_rest(checkpoint):
    ck = LazyCheckpoint(checkpoint)
    assert ck.layer_groups() == ["", "layers.0", "layers.1"]
    assert any(".experts.0.gate_proj." in n for n in ck.groups["layers.0"])  # per-expert tensors on disk
    assert len(set(ck.files.values())) > 1  # sharded with an index


def test_a_skeleton_allocates_no_parameter(checkpoint):
    model = LazyCheckpoint(checkpoint).skeleton()
    assert all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())  # rotary frequencies: computed, not in the checkpoint


def test_materialising_a_layer_loads_only_it_and_equals_from_pretrained(checkpoint):
    from transformers import AutoModelForCausalLM

    ck = LazyCheckpoint(checkpoint)
    model = ck.skeleton()
    ck.materialise(model, "layers.1")
    _, layers = decoder_layers(model)
    assert all(p.is_meta for p in layers[0].parameters())
    assert all(not p.is_meta for p in layers[1].parameters())
    assert model.model.embed_tokens.weight.is_meta
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    want = dict(full.named_parameters())
    for name, p in layers[1].named_parameters():
        assert torch.equal(p, want[f"model.layers.1.{name}"]), name  # stacked experts included
    release(layers[1])
    assert all(p.is_meta for p in layers[1].parameters())


def test_parameters_on_meta_is_undone_after_the_block():
    with parameters_on_meta():
        inside = torch.nn.Linear(4, 4)
    outside = torch.nn.Linear(4, 4)
    assert inside.weight.is_meta and not outside.weight.is_meta


def test_a_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="no safetensors"):
        LazyCheckpoint(str(tmp_path))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_a_large_tensor_is_converted_in_chunks_exactly(stored, tmp_path, monkeypatch):
    """Rows converted a chunk at a time, each through a mapping of its own (the stored form is never resident
    whole beside the converted one), give exactly what converting the whole tensor gives; small reads and
    other slices are passed through unconverted."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moec.lazy_checkpoint import Reopened

    file = str(tmp_path / "t.safetensors")
    weight = (torch.randn(101, 37) * 3).to(stored)
    save_file({"w": weight}, file)
    monkeypatch.setattr(Reopened, "CHUNK", 700)  # bytes: 9 rows of 37 two-byte values a chunk
    reads = []
    read = Reopened._read
    monkeypatch.setattr(Reopened, "_read", lambda self, index: reads.append(index) or read(self, index))
    with safe_open(file, "pt") as f:
        lazy = Reopened(file, "w", f.get_slice("w"), torch.float32)
    whole = lazy[...]
    assert whole.dtype == torch.float32 and torch.equal(whole, weight.float())
    assert len(reads) == 12 and all(isinstance(r, slice) for r in reads)  # ceil(101 / 9)
    assert lazy[3:5].dtype == stored and torch.equal(lazy[3:5], weight[3:5])

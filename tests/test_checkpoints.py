"""Every checkpoint layout gives the same model, and every bad input gets an error naming what is wrong."""
import json
import shutil

import pytest
import torch
from helpers import hf_llama, save_hf, save_hf_bin, save_meta

import zoo
from zoo.formats.files import CheckpointError

TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(directory, **kwargs):
    with torch.no_grad():
        return zoo.load(directory, dtype=torch.float32, device="cpu", **kwargs)(TOKENS)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(hf_llama("gqa"), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def reference(hf_dir):
    with torch.no_grad():
        return hf_llama("gqa")(TOKENS).logits


@pytest.fixture(scope="module")
def meta_dir(hf_dir, tmp_path_factory):
    return save_meta(zoo.load(hf_dir, dtype=torch.float32), tmp_path_factory.mktemp("meta"))


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- layouts ----------------------------------------------------------------------------------

def test_hf_safetensors(hf_dir, reference):
    assert (hf_dir / "model.safetensors").exists()
    assert (logits(hf_dir) - reference).abs().max() < 1e-4


def test_hf_sharded_safetensors_with_index(tmp_path, reference):
    directory = save_hf(hf_llama("gqa"), tmp_path, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").exists() and len(list(directory.glob("*.safetensors"))) > 2
    assert (logits(directory) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_pytorch_bin(tmp_path, reference, shards):
    directory = save_hf_bin(hf_llama("gqa"), tmp_path, shards=shards)
    assert len(list(directory.glob("pytorch_model*.bin"))) == shards and not list(directory.glob("*.safetensors"))
    assert (logits(directory) - reference).abs().max() < 1e-4


def test_meta_layout_equals_hf_layout(meta_dir, hf_dir, reference):
    assert (meta_dir / "consolidated.00.pth").exists()
    assert torch.equal(logits(meta_dir), logits(hf_dir))
    assert (logits(meta_dir) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("shards,vocab_parallel", [(2, False), (2, True), (4, False)])
def test_meta_model_parallel_shards_merge(hf_dir, meta_dir, tmp_path, shards, vocab_parallel):
    """A checkpoint split for 2 or 4 ranks (embedding split on dim 1 as LLaMA 1/2, or dim 0 as LLaMA 3)."""
    model = zoo.load(hf_dir, dtype=torch.float32)
    directory = save_meta(model, tmp_path, shards=shards, vocab_parallel=vocab_parallel)
    assert len(list(directory.glob("consolidated.*.pth"))) == shards
    assert torch.equal(logits(directory), logits(meta_dir))


def test_meta_vocab_size_minus_one_comes_from_tokenizer(tiny_dir, tmp_path):
    directory = copy(tiny_dir, tmp_path / "t")
    params = json.loads((directory / "params.json").read_text())
    params["vocab_size"] = -1
    (directory / "params.json").write_text(json.dumps(params))
    model = zoo.load(directory, dtype=torch.float32)
    assert model.config.vocab_size == model.tokenizer.n_words == model.embed.weight.shape[0]


def test_bare_name_found_in_zoo_checkpoints_env(hf_dir, monkeypatch, tmp_path):
    shutil.copytree(hf_dir, tmp_path / "my-model")
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert zoo.find_checkpoint("my-model") == tmp_path / "my-model"
    assert zoo.find_checkpoint("tiny-llama").name == "tiny-llama"  # zoo's own checkpoints/ comes first


def test_loaded_in_requested_dtype_and_frozen(hf_dir):
    model = zoo.load(hf_dir, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())


# ---- errors -----------------------------------------------------------------------------------

def test_missing_checkpoint_directory():
    with pytest.raises(FileNotFoundError, match="no-such-model.*looked at"):
        zoo.load("no-such-model")


def test_directory_without_config(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither params.json.*, config.json.*nor a zoo-quantized "
                                              "model.safetensors found; the directory holds: model.safetensors"):
        zoo.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # and an empty one is named as such
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        zoo.load(tmp_path)


def test_hf_without_weights(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path / "w")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights: expected one of model.safetensors"):
        zoo.load(directory)


def test_unknown_model_type_lists_supported(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path / "w")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "mamba"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: unknown model_type 'mamba'; supported: llama"):
        zoo.load(directory)


def test_missing_tensor_named_in_checkpoint_terms(tmp_path):
    from safetensors.torch import load_file, save_file
    directory = save_hf(hf_llama("gqa"), tmp_path)
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        zoo.load(directory)


def test_extra_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    directory = save_hf(hf_llama("gqa"), tmp_path)
    state = load_file(directory / "model.safetensors")
    state["model.layers.9.mlp.down_proj.weight"] = torch.zeros(4, 4)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.9.mlp.down_proj"):
        zoo.load(directory)


def test_shape_that_does_not_match_config(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path / "w")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 192
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.0.mlp.gate_proj.weight: shape "
                                              r"\(176, 64\) does not match the config, which gives \(192, 64\)"):
        zoo.load(directory)


def test_truncated_safetensors(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path / "w")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' ends at byte"):
        zoo.load(directory)


def test_truncated_pth(meta_dir, tmp_path):
    directory = copy(meta_dir, tmp_path / "m")
    data = (directory / "consolidated.00.pth").read_bytes()
    (directory / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: cannot read as a PyTorch checkpoint"):
        zoo.load(directory)


def test_garbage_safetensors_header(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path / "w")
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        zoo.load(directory)


def test_missing_meta_shard(hf_dir, tmp_path):
    directory = save_meta(zoo.load(hf_dir, dtype=torch.float32), tmp_path / "m", shards=4)
    (directory / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"shard consolidated.01.pth is missing"):
        zoo.load(directory)


def test_missing_last_meta_shards(hf_dir, tmp_path):
    directory = save_meta(zoo.load(hf_dir, dtype=torch.float32), tmp_path / "m", shards=4)
    (directory / "consolidated.03.pth").unlink()
    (directory / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"a checkpoint of 4 model-parallel shards whose consolidated.02.pth "
                                              r"... consolidated.03.pth are missing"):
        zoo.load(directory)


def test_missing_shard_listed_in_index(tmp_path):
    directory = save_hf(hf_llama("gqa"), tmp_path, max_shard_size="100KB")
    victim = sorted(directory.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in model.safetensors.index.json is missing"):
        zoo.load(directory)


def test_missing_params_entry(meta_dir, tmp_path):
    directory = copy(meta_dir, tmp_path / "m")
    params = json.loads((directory / "params.json").read_text())
    del params["dim"]
    (directory / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="params.json: .*dim"):
        zoo.load(directory)


def test_world_size_of_heads_error_in_config(hf_dir, tmp_path):
    directory = copy(hf_dir, tmp_path / "w")
    config = json.loads((directory / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"n_heads \(4\) is not a multiple of n_kv_heads \(3\)"):
        zoo.load(directory)


def test_prompt_longer_than_context(hf_dir):
    model = zoo.load(hf_dir, dtype=torch.float32, max_seq_len=32)
    with pytest.raises(ValueError, match="a prompt of 40 tokens does not fit the model's context of 32"):
        zoo.generate(model, [[1] * 40], max_new_tokens=4)


def test_safetensors_slice_along_a_later_dim_reads_blocks_of_rows(tmp_path, monkeypatch):
    """A rank's slice along dim 1 or 2 (row-parallel weights) is read a block of rows at a time."""
    from safetensors.torch import save_file

    from zoo.formats import files as checkpoint
    from zoo.formats.files import Shard
    t = torch.randn(300, 12, 8).to(torch.bfloat16)
    save_file({"a": t}, tmp_path / "x.safetensors")
    stored = checkpoint.safetensors_tensors(tmp_path / "x.safetensors")["a"]
    monkeypatch.setattr(checkpoint, "CHUNK", 12 * 8 * 2 * 7)  # 7 rows per block: 43 blocks, the last ragged
    for dim, parts in ((1, 2), (1, 4), (2, 2)):
        for index in range(parts):
            for dtype in (None, torch.float32):
                assert torch.equal(stored.read(Shard(dim, index, parts), dtype),
                                   t.chunk(parts, dim)[index].to(dtype or t.dtype))

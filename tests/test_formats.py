"""zoo/formats/lazy.py's protocol: every lazy tensor reads, for every shard, what slicing its whole tensor gives;
and a model built in code (not loaded) can be quantized and saved."""
import pytest
import torch

import zoo
from zoo import quant
from zoo.formats.files import Shard, safetensors_tensors
from zoo.formats.lazy import Chunk, Concat, Mapped, Reduce
from zoo.models import llama


@pytest.fixture
def stored(tmp_path):
    """Four 12 x 8 tensors in a safetensors file, as four ranks' copies."""
    from safetensors.torch import save_file
    parts = {f"p{i}": torch.randn(12, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    save_file(parts, tmp_path / "x.safetensors")
    files = safetensors_tensors(tmp_path / "x.safetensors")
    return [parts[f"p{i}"] for i in range(4)], [files[f"p{i}"] for i in range(4)]


def shards_of(whole: torch.Tensor):
    """Every way a rank may ask for a slice: none, and each part of 1, 2 or 4 along each dim that splits."""
    yield None, whole
    for dim in range(whole.dim()):
        for parts in (1, 2, 4):
            if whole.shape[dim] % parts == 0:
                for index in range(parts):
                    yield Shard(dim, index, parts), whole.chunk(parts, dim)[index]


def check(lazy, whole: torch.Tensor) -> None:
    assert tuple(lazy.shape) == tuple(whole.shape)
    for shard, want in shards_of(whole):
        for dtype in (None, torch.bfloat16):
            got = lazy.read(shard, dtype)
            assert got.dtype == (dtype or whole.dtype) and got.is_contiguous(), shard
            assert torch.equal(got, want.to(dtype or whole.dtype)), shard


@pytest.mark.parametrize("dim", [0, 1])
def test_concat_reads_every_shard(stored, dim):
    tensors, lazy = stored
    check(Concat(lazy, dim), torch.cat(tensors, dim))


@pytest.mark.parametrize("how", ["sum", "mean", "one"])
def test_reduce_reads_every_shard(stored, how):
    tensors, lazy = stored
    whole = {"sum": sum(tensors), "mean": sum(tensors) / 4, "one": tensors[0]}[how]
    check(Reduce(lazy, how), whole)


def test_chunk_and_concat_of_chunks(stored):
    """metaseq's fused qkv: the i-th third of each rank's rows, concatenated over the ranks."""
    tensors, lazy = stored
    for i in range(3):
        check(Chunk(lazy[0], 0, i, 3), tensors[0].chunk(3, 0)[i])
        check(Concat([Chunk(p, 0, i, 3) for p in lazy[:2]], 0), torch.cat([t.chunk(3, 0)[i] for t in tensors[:2]]))


def test_mapped_by_whole_heads(stored):
    """HF's q/k permutation acts on whole heads: a shard of heads maps to the same shard of the result."""
    tensors, lazy = stored
    cfg = llama.LlamaConfig(dim=8, n_heads=2, n_layers=1, vocab_size=4, head_dim=6)
    f = lambda t: llama.hf_tensor_to_zoo("blocks.0.attn.wq.weight", t, cfg)  # noqa: E731
    mapped = Mapped(lazy[0], f, "blocks.0.attn.wq.weight")
    assert torch.equal(mapped.read(), f(tensors[0]))
    for index in range(2):  # one head per rank
        assert torch.equal(mapped.read(Shard(0, index, 2)), f(tensors[0]).chunk(2, 0)[index])


def test_model_built_in_code_is_saved_and_loads(tmp_path):
    cfg = llama.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128)
    torch.manual_seed(0)
    model = quant.quantize(llama.Llama(cfg), "int8")
    out = quant.save(model, tmp_path / "q")
    again = zoo.load(out, dtype=torch.float32)
    tokens = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    assert again.tokenizer is None

"""Meta's LLaMA checkpoints: params.json + consolidated.00.pth ... consolidated.{n-1}.pth, one file per
model-parallel rank of Meta's fairscale model.

Keys and how the ranks split them (fairscale's layers in Meta's llama/model.py):
    tok_embeddings.weight                      dim 1 (ParallelEmbedding, LLaMA 1/2) or dim 0 (VocabParallelEmbedding, LLaMA 3)
    layers.{i}.attention.w{q,k,v}.weight       dim 0 (ColumnParallelLinear)
    layers.{i}.attention.wo.weight             dim 1 (RowParallelLinear)
    layers.{i}.feed_forward.w1 / w3 / w2       dim 0 / dim 0 / dim 1 (w1 the gate, w3 the up projection)
    layers.{i}.attention_norm, ffn_norm, norm  replicated
    output.weight                              dim 0
    rope.freqs                                 LLaMA 1/2's precomputed table: skipped
Weights are in Meta's own rotary layout (interleaved pairs), which is zoo's.
"""
import re
from pathlib import Path

from zoo.checks import FLAG, LAYERS, POSITIVE, SIZE, is_int, key, read_json
from zoo.formats.files import CheckpointError, open_tensors
from zoo.formats.lazy import Checkpoint, Concat, Reduce
from zoo.models.llama import LlamaConfig
from zoo.tokenizer import load_tokenizer

META_NAMES = {"tok_embeddings": "embed", "layers": "blocks", "attention": "attn", "feed_forward": "mlp",
              "attention_norm": "attn_norm", "ffn_norm": "mlp_norm", "w1": "w_gate", "w3": "w_in", "w2": "w_out"}
META_IGNORED = re.compile(r"^rope\.freqs$")  # a precomputed table in LLaMA 1/2 files
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
ROW_PARALLEL = ("wo", "w2")


def meta_to_zoo(key: str) -> str | None:
    """Our name for a key of Meta's consolidated.NN.pth, or None for a key to skip."""
    if META_IGNORED.search(key):
        return None
    return ".".join(META_NAMES.get(part, part) for part in key.split("."))


def zoo_to_meta(name: str) -> str:
    inverse = {v: k for k, v in META_NAMES.items()}
    return ".".join(inverse.get(part, part) for part in name.split("."))


def detect(directory: Path) -> bool:
    return (directory / "params.json").exists()


def llama_config(params: dict, vocab_size: int | None = None) -> LlamaConfig:
    """LLaMA's config from Meta's params.json. vocab_size -1 there means 'the tokenizer's size' (passed in)."""
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len"}
    # Meta's defaults are 7B's: a file without dim, n_layers or n_heads would silently build the wrong model
    dim, n_layers, n_heads = key(params, "dim", SIZE), key(params, "n_layers", LAYERS), key(params, "n_heads", SIZE)
    vocab = key(params, "vocab_size", ("an int >= 1, or -1 for the tokenizer's", lambda v: is_int(v) and v >= -1
                                       and v != 0), default=-1)
    if vocab == -1:
        if vocab_size is None:
            raise ValueError("vocab_size -1 means the tokenizer's, and there is no tokenizer.model beside it")
        vocab = vocab_size
    scaled = key(params, "use_scaled_rope", FLAG, default=False)
    theta = key(params, "rope_theta", POSITIVE, default=10000.0)
    return LlamaConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=key(params, "n_kv_heads", SIZE, None, nullable=True),
        vocab_size=vocab, multiple_of=key(params, "multiple_of", SIZE, default=256),
        ffn_dim_multiplier=key(params, "ffn_dim_multiplier", POSITIVE, None, nullable=True),
        norm_eps=key(params, "norm_eps", POSITIVE, default=1e-5), rope_theta=float(theta),
        # LLaMA 3.1's constants (llama-models' apply_scaling)
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192} if scaled else None,
        # not in Meta's files: LLaMA 2 4096, LLaMA 3 8192, 3.1 131072
        max_seq_len=key(params, "max_seq_len", SIZE, default=131072 if scaled else 8192 if theta >= 500000 else 4096),
        extra={k: v for k, v in params.items() if k not in known})


def read_config(directory: Path, vocab_size: int | None) -> LlamaConfig:
    """params.json's config; an error in it names the file. vocab_size: for a vocab_size of -1 without a tokenizer."""
    params = read_json(directory / "params.json")
    tokenizer = load_tokenizer(directory)
    try:
        return llama_config(params, tokenizer.n_words if tokenizer else vocab_size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'params.json'}: {e}") from None


def config(directory: Path):
    """(family, config, config file) without reading tensors; without a tokenizer, vocab_size -1 is LLaMA 1/2's 32000."""
    return "llama", read_config(directory, 32000), directory / "params.json"


def open(directory: Path) -> Checkpoint:
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{directory}: params.json but no consolidated.NN.pth files")
    for rank, path in enumerate(shards):  # consolidated.00.pth ... consolidated.{n-1}.pth, none missing
        if path.name != f"consolidated.{rank:02d}.pth":
            raise CheckpointError(f"{directory}: model-parallel shard consolidated.{rank:02d}.pth is missing "
                                  f"(found {', '.join(p.name for p in shards)})")
    files = [open_tensors(p) for p in shards]
    embedding = files[0].get("tok_embeddings.weight")  # vocab_size -1 (LLaMA 1/2) split the embedding dim
    cfg = read_config(directory, embedding.shape[0] if embedding is not None else None)
    for path, f in zip(shards[1:], files[1:]):
        for k in f.keys() - files[0].keys():
            raise CheckpointError(f"{path}: unexpected tensor {k!r} (not in {shards[0].name})")
    tensors = {}
    for k in files[0]:
        name = meta_to_zoo(k)
        if name is None:
            continue
        parts = []
        for path, f in zip(shards, files):
            if k not in f:
                raise CheckpointError(f"{path}: tensor {k!r} is missing (it is in {shards[0].name})")
            parts.append(f[k])
        dim = split_dim(k, parts[0].shape, cfg)
        tensors[name] = parts[0] if len(parts) == 1 else Reduce(parts, "one") if dim is None else Concat(parts, dim)

    def short(name: str, shape: tuple, want: tuple) -> str | None:
        """A tensor with fewer rows than params.json gives: a wrong params.json, or shards missing at the end."""
        dims = [d for d in range(len(want)) if len(shape) == len(want) and shape[d] != want[d]]
        if len(dims) != 1 or shape[dims[0]] >= want[dims[0]] or want[dims[0]] % (shape[dims[0]] // len(shards)):
            return None
        d, n = dims[0], want[dims[0]] // (shape[dims[0]] // len(shards))
        return (f"{directory}: {zoo_to_meta(name)!r} has {shape[d]} of {want[d]} rows along dim {d} in "
                f"{len(shards)} file(s): either params.json does not describe this checkpoint (the sizes follow from "
                f"dim, n_heads, n_kv_heads, multiple_of and ffn_dim_multiplier), or it is a checkpoint of {n} "
                f"model-parallel shards whose consolidated.{len(shards):02d}.pth ... consolidated.{n - 1:02d}.pth "
                f"are missing")

    return Checkpoint("llama", cfg, directory / "params.json", tensors, load_tokenizer(directory), zoo_to_meta, short)


def split_dim(key: str, shard_shape: tuple, cfg: LlamaConfig) -> int | None:
    """The dim along which Meta's ranks split a tensor (None: replicated); see the table above."""
    module = key.split(".")[-2] if "." in key else ""
    if key == "tok_embeddings.weight":
        return 0 if shard_shape[1] == cfg.dim else 1  # LLaMA 3 splits the vocabulary, LLaMA 1/2 the dim
    if module in COLUMN_PARALLEL or key == "output.weight":
        return 0
    if module in ROW_PARALLEL:
        return 1
    return None

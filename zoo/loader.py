"""zoo.load: a checkpoint directory in, a model with its tokenizer out.

The layout is told from the directory: `params.json` + `consolidated.NN.pth` is Meta's, and
`config.json` + safetensors or `pytorch_model*.bin` (sharded with an index, or not) is Hugging
Face's; gpt-neox's DeepSpeed files and metaseq's OPT files are read by zoo/original.py. The model is built on the meta device (no memory), then each parameter is read from disk,
converted (renamed, q/k un-permuted, model-parallel shards merged), cast to the target dtype and
put in place, one tensor at a time: peak memory stays near the size of the finished model.
"""
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from zoo import checks, original, parallel
from zoo import quant as quantization
from zoo.checkpoint import (CheckpointError, StoredTensor, open_tensors, release_freed_memory, safetensors_metadata,
                            safetensors_tensors)
from zoo.kernels import dequantize_int4
from zoo.models import gpt_neox, llama, opt
from zoo.tokenizer import load_tokenizer


class Family(NamedTuple):
    """What the loader needs to know of a model family stored in Hugging Face's layout."""
    config: type  # with from_hf(config.json dict)
    model: type
    hf_to_zoo: Callable  # checkpoint key -> our parameter names ([]: skip the key; several: a fused tensor)
    zoo_to_hf: Callable  # the other way, to name a missing tensor in the checkpoint's words
    hf_tensor_to_zoo: Callable  # (name, tensor or its slice, config) -> the tensor of `name` in our layout


# config.json's model_type -> family
FAMILIES = {
    "llama": Family(llama.LlamaConfig, llama.Llama, llama.hf_to_zoo, llama.zoo_to_hf, llama.hf_tensor_to_zoo),
    "opt": Family(opt.OPTConfig, opt.OPT, opt.hf_to_zoo, opt.zoo_to_hf, opt.hf_tensor_to_zoo),
    "gpt_neox": Family(gpt_neox.GPTNeoXConfig, gpt_neox.GPTNeoX, gpt_neox.hf_to_zoo, gpt_neox.zoo_to_hf,
                       gpt_neox.hf_tensor_to_zoo),
}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Split(NamedTuple):
    """The slice of a tensor one rank holds: part `index` of `parts` equal parts along `dim`."""
    dim: int
    index: int
    parts: int


class Source(NamedTuple):
    where: str  # "file: key", for error messages
    shape: tuple  # the whole tensor's
    read: Callable[[Split | None, torch.dtype], torch.Tensor]  # the tensor (or a slice) in our layout, on the CPU


def find_checkpoint(ckpt: str | os.PathLike) -> Path:
    """A directory as given, else a bare name under ./checkpoints, zoo's own checkpoints/, $ZOO_CHECKPOINTS."""
    path = Path(ckpt)
    if path.is_dir():
        return path
    tried = [path]
    if not path.is_absolute() and len(path.parts) == 1:
        roots = [Path.cwd() / "checkpoints", Path(__file__).resolve().parent.parent / "checkpoints"]
        if os.environ.get("ZOO_CHECKPOINTS"):
            roots.append(Path(os.environ["ZOO_CHECKPOINTS"]))
        for root in roots:
            if (root / path).is_dir():
                return root / path
            tried.append(root / path)
    raise FileNotFoundError(f"checkpoint {str(ckpt)!r} not found; looked at: {', '.join(map(str, tried))}")


def load(ckpt: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
         max_seq_len: int | None = None, progress: bool | None = None, quant: str | None = None,
         group_size: int = 128, refine: bool = False) -> nn.Module:
    """Load a checkpoint directory (or a bare name, see `find_checkpoint`): Meta, Hugging Face, gpt-neox,
    metaseq or zoo-quantized.

    dtype: what the floating-point weights are cast to while loading. device: default CUDA if
    present, else CPU. max_seq_len: the longest sequence the model will be asked to hold
    (default: the checkpoint's context length). progress: a bar on stderr (default: when stderr
    is a terminal and the checkpoint is over 256 MB). quant: "int8" or "int4" quantizes each linear
    layer of the blocks, and the untied output layer, as soon as it is read (zoo/quant), never
    holding the whole model in `dtype`;
    group_size: int4's (32, 64, 128, 256); refine: int4's scales and zeros by least squares rather
    than min/max (zoo.quant.refine_int4: less error, slower to load). Parameters come back frozen
    (requires_grad=False): zoo is for inference; call `requires_grad_()` to train.
    """
    dtype, device = checks.floating_dtype("dtype", dtype), checks.device("device", device)
    directory = find_checkpoint(ckpt)
    if quant is not None and quant not in quantization.SCHEMES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(quantization.SCHEMES)}")
    if refine and quant != "int4":
        raise ValueError(f"refine=True applies to quant='int4' only (quant={quant!r})")
    if original.layout(directory):  # before config.json: a metaseq checkpoint may have one beside it
        model, sources, checkpoint_name = _original_checkpoint(directory, max_seq_len)
    elif (directory / "params.json").exists():
        model, sources, checkpoint_name = _meta_checkpoint(directory, max_seq_len)
        model.model_type = "llama"
    elif (directory / "config.json").exists():
        model, sources, checkpoint_name = _hf_checkpoint(directory, max_seq_len)
    elif _is_quantized(directory):
        if quant is not None:
            raise ValueError(f"{directory} is already quantized; load it without quant=")
        model, sources, checkpoint_name = _quantized_checkpoint(directory, max_seq_len, device)
    else:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise CheckpointError(f"{directory}: neither params.json (Meta layout), config.json (Hugging Face layout), "
                              f"gpt-neox's layer_*-model_*-model_states.pt / mp_rank_*_model_states.pt, metaseq's "
                              f"restored.pt / reshard-model_part-*.pt nor a zoo-quantized model.safetensors found; "
                              f"the directory holds: {found}")
    _fill(model, sources, dtype, device, progress, directory, checkpoint_name, quant, group_size, refine)
    model.checkpoint_dir = directory
    return model.to(device).eval()


def _set_context(cfg, max_seq_len: int | None) -> None:
    """zoo.load(max_seq_len=...): any length for rotary models, at most the learned positions for OPT."""
    if max_seq_len is None:
        return
    checks.integer("max_seq_len", max_seq_len, low=1)
    learned = getattr(cfg, "positions", None)
    if learned is not None and max_seq_len > learned:
        raise ValueError(f"max_seq_len={max_seq_len} is not accepted: this model learned {learned} positions; "
                         f"choose at most {learned}")
    cfg.max_seq_len = max_seq_len


def build_empty(ckpt: str | os.PathLike) -> nn.Module:
    """The model a checkpoint describes, from its config alone (params.json, config.json, a YAML or a
    stored cfg, a zoo-quantized file's metadata): parameters on the meta device, no weights read (for
    counting parameters and bytes: `python -m zoo inspect`)."""
    directory = find_checkpoint(ckpt)
    if original.layout(directory):
        found = original.read(directory)
        return _build(FAMILIES[found.model_type].model, found.config, found.config_file)
    if (directory / "params.json").exists():
        params = _read_json(directory / "params.json")
        tokenizer = load_tokenizer(directory)
        # vocab_size -1 means the tokenizer's; without one, LLaMA 1/2's SentencePiece vocabulary of 32000
        cfg = _parsed(directory / "params.json", llama.LlamaConfig.from_meta, params,
                      tokenizer.n_words if tokenizer else 32000)
        return _build(llama.Llama, cfg, directory / "params.json")
    if _is_quantized(directory):  # the float model of the same shapes
        _, family, cfg = _quantized_config(directory / "model.safetensors")
        return _build(family.model, cfg, directory / "model.safetensors")
    _, family, cfg = _hf_config(directory)
    return _build(family.model, cfg, directory / "config.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _meta_checkpoint(directory: Path, max_seq_len: int | None):
    params = _read_json(directory / "params.json")
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{directory}: params.json but no consolidated.NN.pth files")
    for rank, path in enumerate(shards):  # consolidated.00.pth ... consolidated.{n-1}.pth, none missing
        if path.name != f"consolidated.{rank:02d}.pth":
            raise CheckpointError(f"{directory}: model-parallel shard consolidated.{rank:02d}.pth is missing "
                                  f"(found {', '.join(p.name for p in shards)})")
    files = [open_tensors(p) for p in shards]
    tokenizer = load_tokenizer(directory)
    vocab = tokenizer.n_words if tokenizer else None
    if vocab is None and "tok_embeddings.weight" in files[0]:
        vocab = files[0]["tok_embeddings.weight"].shape[0]  # vocab_size -1 (LLaMA 1/2) split the embedding dim
    cfg = _parsed(directory / "params.json", llama.LlamaConfig.from_meta, params, vocab)
    _set_context(cfg, max_seq_len)
    model = _build(llama.Llama, cfg, directory / "params.json")
    expected = _full_shapes(model)
    sources = {}
    for key in files[0]:
        name = llama.meta_to_zoo(key)
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"{shards[0]}: unexpected tensor {key!r} (no such parameter in a LLaMA "
                                  f"with this params.json)")
        parts = []
        for path, f in zip(shards, files):
            if key not in f:
                raise CheckpointError(f"{path}: tensor {key!r} is missing (it is in {shards[0].name})")
            parts.append(f[key])
        sources[name] = _merge_shards(parts, expected[name])
    for path, f in zip(shards[1:], files[1:]):
        for key in f.keys() - files[0].keys():
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (not in {shards[0].name})")
    model.tokenizer = tokenizer
    return model, sources, llama.zoo_to_meta


def _merge_shards(parts: list[StoredTensor], full: tuple) -> Source:
    """Meta's model-parallel shards of one tensor, merged on the one dimension where they are split.

    Column-parallel weights (wq, wk, wv, w1, w3, output) are split on dim 0, row-parallel ones
    (wo, w2) on dim 1, the embedding on dim 1 (LLaMA 1/2) or 0 (LLaMA 3); norms are replicated.
    The split dimension is the one where a shard's shape differs from the full shape. A rank that
    wants a slice of the result reads only the pieces of the shards that fall in it.
    """
    where = f"{parts[0].path}: {parts[0].key}"
    shapes = [p.shape for p in parts]
    dims = [d for d in range(len(full)) if len(shapes[0]) == len(full) and shapes[0][d] != full[d]]
    if len(dims) == 1 and all(len(s) == len(full) for s in shapes):
        have = sum(s[dims[0]] for s in shapes)
        if have < full[dims[0]] and full[dims[0]] % shapes[0][dims[0]] == 0:  # shards at the end are missing
            n = full[dims[0]] // shapes[0][dims[0]]
            raise CheckpointError(f"{parts[0].path.parent}: {parts[0].key!r} has {have} of {full[dims[0]]} rows "
                                  f"along dim {dims[0]} in {len(parts)} file(s): either params.json does not describe "
                                  f"this checkpoint (the sizes follow from dim, n_heads, n_kv_heads, multiple_of and "
                                  f"ffn_dim_multiplier), or it is a checkpoint of {n} model-parallel shards whose "
                                  f"consolidated.{len(parts):02d}.pth ... consolidated.{n - 1:02d}.pth are missing")
    if len(parts) == 1 or all(s == full for s in shapes):  # one file, or a replicated tensor
        return Source(where, shapes[0], lambda split, dtype: parts[0].read(*(split or ()), dtype=dtype))
    if (len(dims) != 1 or any(len(s) != len(full) for s in shapes)
            or any(s[i] != full[i] for s in shapes for i in range(len(full)) if i != dims[0])
            or sum(s[dims[0]] for s in shapes) != full[dims[0]]):
        raise CheckpointError(f"{parts[0].path.parent}: shards of {parts[0].key!r} have shapes {shapes}, "
                              f"which do not merge into the expected {full}")
    cat_dim = dims[0]

    def read(split: Split | None, dtype: torch.dtype) -> torch.Tensor:
        if split is not None and split.dim != cat_dim:  # e.g. an embedding saved split on dim 1, wanted on dim 0
            pieces = [lambda p=p: p.read(*split, dtype=dtype) for p in parts]
            shape = list(full)
            shape[split.dim] //= split.parts
        else:  # the rows [start, end) along cat_dim (all of them without a split), from the shards they lie in
            step = full[cat_dim] // (split.parts if split else 1)
            start = split.index * step if split else 0
            end, pieces, offset, shape = start + step, [], 0, list(full)
            shape[cat_dim] = step
            for p in parts:
                lo, hi = max(start, offset), min(end, offset + p.shape[cat_dim])
                if lo < hi:
                    pieces.append(lambda p=p, lo=lo - offset, n=hi - lo: p.read(dtype=dtype).narrow(cat_dim, lo, n))
                offset += p.shape[cat_dim]
        out, at = torch.empty(shape, dtype=dtype if parts[0].dtype.is_floating_point else parts[0].dtype), 0
        for piece in pieces:  # one shard's piece in memory at a time, copied into its place
            t = piece()
            out.narrow(cat_dim, at, t.shape[cat_dim]).copy_(t)
            at += t.shape[cat_dim]
        return out

    return Source(where, full, read)


def _hf_config(directory: Path):
    """config.json's contents, its model family and that family's config object (errors name the file)."""
    config = _read_json(directory / "config.json")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{directory / 'config.json'}: unknown model_type {model_type!r}; "
                              f"supported: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    return config, family, _parsed(directory / "config.json", family.config.from_hf, config)


def _parsed(path: Path, read: Callable, *args):
    """read(*args): a config read from the file at `path`; an error in it names the file."""
    try:
        return read(*args)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hf_checkpoint(directory: Path, max_seq_len: int | None):
    config, family, cfg = _hf_config(directory)
    _set_context(cfg, max_seq_len)
    model = _build(family.model, cfg, directory / "config.json")
    sources = _hf_sources(model, family, cfg, _hf_tensors(directory), f"with this {directory / 'config.json'}")
    model.tokenizer = load_tokenizer(directory, config)
    model.model_type = config["model_type"]
    return model, sources, family.zoo_to_hf


def _original_checkpoint(directory: Path, max_seq_len: int | None):
    """gpt-neox's or metaseq's own checkpoint (zoo/original.py), read with the Hugging Face names."""
    found = original.read(directory)
    family = FAMILIES[found.model_type]
    _set_context(found.config, max_seq_len)
    model = _build(family.model, found.config, found.config_file)
    sources = _hf_sources(model, family, found.config, found.tensors, f"as {found.config_file} describes")
    model.tokenizer, model.model_type = found.tokenizer, found.model_type
    return model, sources, found.checkpoint_name


def _hf_sources(model: nn.Module, family: Family, cfg, tensors: dict[str, StoredTensor], described: str):
    """Our parameter name -> its Source, from tensors under Hugging Face's names."""
    expected = _full_shapes(model)
    sources = {}
    for key, stored in tensors.items():
        for name in family.hf_to_zoo(key):  # one name, none (a key to skip), or several (a fused tensor)
            if name not in expected:
                raise CheckpointError(f"{stored.path}: unexpected tensor {key!r} (no such parameter in the "
                                      f"{type(model).__name__} model {described})")
            try:  # the shape after conversion, found by converting a tensor without data
                shape = family.hf_tensor_to_zoo(name, torch.empty(stored.shape, device="meta"), cfg).shape
            except RuntimeError:
                raise CheckpointError(f"{stored.path}: {key}: shape {stored.shape} does not match the config, "
                                      f"which gives {expected[name]} for zoo's {name}") from None

            def read(split, dtype, stored=stored, name=name):
                return family.hf_tensor_to_zoo(name, stored.read(*(split or ()), dtype=dtype), cfg)
            sources[name] = Source(f"{stored.path}: {key}", tuple(shape), read)
    return sources


def _is_quantized(directory: Path) -> bool:
    path = directory / "model.safetensors"  # written by zoo.quant.save
    return path.exists() and safetensors_metadata(path).get("format") == quantization.FORMAT


def _quantized_config(path: Path):
    """A zoo-quantized file's metadata, model family and config, checking the format version."""
    meta = safetensors_metadata(path)
    if meta.get("version") != quantization.VERSION:
        raise CheckpointError(f"{path}: zoo-quantized format version {meta.get('version')!r} is not supported; this "
                              f"zoo reads version {quantization.VERSION}")
    scheme, model_type = meta.get("scheme"), meta.get("model_type")
    if scheme not in quantization.SCHEMES or model_type not in FAMILIES:
        raise CheckpointError(f"{path}: metadata names scheme {scheme!r} and model_type {model_type!r}; supported: "
                              f"{', '.join(quantization.SCHEMES)} and {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    return meta, family, family.config(**json.loads(meta["config"]))


def _quantized_checkpoint(directory: Path, max_seq_len: int | None, device: torch.device):
    """A checkpoint written by zoo.quant.save: quantized layers built from their stored parts, the rest filled as usual."""
    path = directory / "model.safetensors"
    meta, family, cfg = _quantized_config(path)
    scheme, model_type = meta["scheme"], meta["model_type"]
    _set_context(cfg, max_seq_len)
    model = _build(family.model, cfg, path)
    tensors = safetensors_tensors(path)
    quantized_keys = set()
    group_size, world, rank = int(meta.get("group_size", 0)), parallel.world_size(), parallel.rank()

    def read(key: str, dim: int | None) -> torch.Tensor:  # this rank's slice along dim (None: whole)
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key!r}, which the {scheme} layout needs "
                                  f"({quantization.LAYOUTS[scheme]})")
        quantized_keys.add(key)
        return tensors[key].read(*(() if dim is None else (dim, rank, world))).to(device)

    # A layer is quantized where the file stores it so; others (a tied output, an int4 layer whose inputs did
    # not split into groups, the output of files older than its quantization) are stored as float L.weight.
    sources, floating = {}, {}
    for name, module in list(model.named_modules()):
        if not (isinstance(module, quantization.LINEARS)
                and f"{name}.{'qweight' if scheme == 'int8' else 'packed'}" in tensors):
            continue
        split_dim = _split_dim(model, f"{name}.weight")
        why = quantization.int4_misfit(module, group_size) if scheme == "int4" else None
        if why:  # under TP, groups that would straddle two ranks: this rank's slice of the dequantized weight
            floating[name] = why
            whole = quantization.stored_weight(name, scheme, group_size, read)
            sources[f"{name}.weight"] = Source(
                f"{path}: {name}.packed", (whole.packed.shape[0], 2 * whole.packed.shape[1]),
                lambda split, dtype, w=whole: dequantize_int4(w.packed, w.scales, w.zeros, w.group_size).chunk(
                    split.parts, split.dim)[split.index].to(dtype).contiguous())
            continue
        weight = quantization.stored_weight(name, scheme, group_size, read, split_dim)
        bias = torch.empty(module.weight.shape[0], device="meta") if module.bias is not None else None
        quantization.replace_module(model, name, quantization.QuantLinear.replacing(module, weight, bias))
    if floating and rank == 0:
        print(f"zoo: {path}: at world size {world} these int4 layers run in floating point (their weights "
              f"dequantized): {quantization.describe_layers(floating, model)}", file=sys.stderr)
    expected = dict(model.named_parameters(remove_duplicate=False))
    for key, stored in tensors.items():
        if key in quantized_keys:
            continue
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        sources[key] = Source(f"{path}: {key}", stored.shape,
                              lambda split, dtype, stored=stored: stored.read(*(split or ()), dtype=dtype))
    model.tokenizer = load_tokenizer(directory, json.loads(meta.get("tokenizer", "{}")))
    model.model_type = model_type
    return model, sources, lambda name: name


def _hf_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face checkpoint: one weights file, or the shards an index lists."""
    for index_name in HF_INDEXES:
        index = directory / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            tensors = {}
            for file in sorted(set(weight_map.values())):
                if not (directory / file).exists():
                    raise CheckpointError(f"{directory / file}: shard listed in {index_name} is missing")
                tensors.update(open_tensors(directory / file))
            for key, file in weight_map.items():
                if key not in tensors or tensors[key].path.name != file:
                    raise CheckpointError(f"{directory / file}: tensor {key!r} listed in {index_name} is missing")
            return tensors
    for name in HF_WEIGHTS:
        if (directory / name).exists():
            return open_tensors(directory / name)
    raise CheckpointError(f"{directory}: no weights: expected one of {', '.join(HF_WEIGHTS + HF_INDEXES)}")


def _build(model_class: type, cfg, config_file: Path) -> nn.Module:
    """The model with parameters on the meta device (no memory), for _fill to put real tensors in.

    nn.Embedding's random init is skipped: the weights are about to be read, and the first normal_
    on a meta tensor costs a one-time import of about 2 s and 170 MB.
    """
    init, nn.Embedding.reset_parameters = nn.Embedding.reset_parameters, lambda self: None
    try:
        with torch.device("meta"):
            return model_class(cfg)
    except ValueError as e:  # a config the model cannot be built from (at this world size)
        raise CheckpointError(f"{config_file}: {e}") from None
    finally:
        nn.Embedding.reset_parameters = init


def _split_dim(model: nn.Module, name: str) -> int | None:
    """Which dimension of a parameter tensor parallelism splits (a parallel layer's `split_dims`), if any."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), "split_dims", {}).get(attr)


def _full_shapes(model: nn.Module) -> dict[str, tuple]:
    """Every parameter's shape in the checkpoint: this rank's shape, times the world size on its split dim."""
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shape, dim = list(p.shape), _split_dim(model, name)
        if dim is not None:
            shape[dim] *= parallel.world_size()
        shapes[name] = tuple(shape)
    return shapes


def _fill(model: nn.Module, sources: dict[str, Source], dtype: torch.dtype, device: torch.device,
          progress: bool | None, directory: Path, checkpoint_name: Callable[[str], str],
          quant: str | None = None, group_size: int = 128, refine: bool = False) -> None:
    """Put every parameter in place from `sources`, checking that none is missing or misshapen.

    Parameters tied together (output and embedding) are one group: either name may provide it.
    Under tensor parallelism (zoo.parallel) a parallel layer's `split_dims` say which dimension of
    a parameter is split, and only this rank's slice is read.
    """
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    full = _full_shapes(model)
    if getattr(model.config, "tie_embeddings", False) and "output.weight" not in sources:
        sources["output.weight"] = sources.get("embed.weight")  # under TP the two are split differently
    for names in groups.values():
        if not any(sources.get(n) for n in names):
            raise CheckpointError(f"{directory}: missing tensor {checkpoint_name(names[0])!r} "
                                  f"(zoo's {names[0]}, shape {full[names[0]]})")
    bar = _Progress(directory, sum(math.prod(s.shape) for s in sources.values() if s), progress)
    world, rank = parallel.world_size(), parallel.rank()
    to_quantize = set(quantization.plan(model, quant, group_size)) if quant is not None else set()  # by shapes
    for names in groups.values():
        source = sources[next(n for n in names if sources.get(n))]
        dim, want = _split_dim(model, names[0]), full[names[0]]  # the whole tensor; this rank reads a slice
        if tuple(source.shape) != want:
            raise CheckpointError(f"{source.where}: shape {tuple(source.shape)} does not match the config, "
                                  f"which gives {want} for zoo's {names[0]}")
        t = source.read(None if dim is None else Split(dim, rank, world), dtype).to(device)
        param = nn.Parameter(t, requires_grad=False)
        for name in names:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, param)
        if quant is not None:  # quantize a linear layer as soon as all its parameters are read
            module_name = names[0].rpartition(".")[0]
            module = model.get_submodule(module_name)
            if module_name in to_quantize and not any(p.is_meta for p in module.parameters()):
                layer = quantization.quantize_linear(module, quant, group_size, name=module_name, refine=refine)
                quantization.replace_module(model, module_name, layer)
                release_freed_memory()  # the layer's float weight and the quantizer's temporaries
        bar.update(math.prod(source.shape))
    bar.close()
    release_freed_memory()


class _Progress:
    """`loading <dir>:  42% (1.3/3.1 G params)` on stderr, redrawn in place; silent when not a terminal."""

    def __init__(self, directory: Path, total: int, enabled: bool | None):
        self.total, self.done, self.label = total, 0, directory.name
        self.enabled = enabled if enabled is not None else (sys.stderr.isatty() and total > 128_000_000)

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            print(f"\rloading {self.label}: {100 * self.done // max(self.total, 1):3d}% "
                  f"({self.done / 1e9:.2f}/{self.total / 1e9:.2f} G params)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)

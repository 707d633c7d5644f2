"""zoo.save: a model (loaded from any layout, edited, or built in code) written as a Hugging Face checkpoint
that transformers loads, one tensor at a time.

    zoo.save(model, "out")                                          # then, anywhere:
    transformers.AutoModelForCausalLM.from_pretrained("out")        # the same logits
    python -m zoo convert llama-2-7b out/                           # Meta's, metaseq's, gpt-neox's files -> HF's

What is written (the metadata of each safetensors file lists them all, for a later force=True):
    config.json                        the family's to_hf_config, the tokenizer's bos/eos ids, the dtype
    model.safetensors                  every weight under Hugging Face's names, in its layout (zoo_tensors_to_hf:
                                       LLaMA's q/k rows in the half-split rotary order, NeoX's q, k, v fused)
    or model-0000i-of-0000n.safetensors  shards of at most max_shard_size bytes (a larger tensor alone in one)
       + model.safetensors.index.json  Hugging Face's index (its metadata and weight_map, as save_pretrained's)
    the tokenizer's files              as zoo read them (tokenizer.model, tokenizer.json, vocab.json, ...)

Streaming: the files are planned from the parameters' shapes, so each safetensors header is written before
any data, then each tensor as it comes. Under tensor parallelism every rank takes part in gathering each
split parameter to rank 0 (its padding cut); rank 0 converts it, writes it and lets it go, so a rank holds
at most one whole tensor beside its shards. Rank 0 checks the output and writes; every rank returns the
same directory or raises the same error. The output rule is zoo/output.py's (never the source, nor inside
or around it; never over a file zoo did not write; a checkpoint zoo wrote only with force=True), and the
files are written into a temporary directory renamed into place at the end.

A quantized model is refused for format="hf" (the weights are not floating point); format="zoo" writes
zoo's quantized format (zoo.quant.save).
"""
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from zoo import parallel, quant
from zoo.checks import is_int, require
from zoo.formats.files import SAFETENSORS_DTYPES
from zoo.loader import full_shapes
from zoo.models import FAMILIES, family_of
from zoo.output import WRITTEN_BY, output_for, tokenizer_files, writing

FORMATS = ("hf", "zoo")
INDEX = "model.safetensors.index.json"
SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # HF's
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
QUANTIZED = ("a Hugging Face checkpoint holds floating-point weights: save the model loaded without quant= "
             "(zoo.load(ckpt)), or keep zoo's quantized format (format=\"zoo\", python -m zoo save --format zoo, "
             "zoo.quant.save)")


class Entry(NamedTuple):
    """One tensor of the Hugging Face checkpoint: its key, the zoo parameters it is made of, its shape and dtype."""
    key: str
    names: list[str]
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * torch.Size(self.shape).numel()


def save(model: nn.Module, directory: str | Path, format: str = "hf", force: bool = False,
         source: str | Path | None = None, max_shard_size: int | str = "50GB") -> Path:
    """Write `model` as a Hugging Face checkpoint in `directory` (the module docstring); returns the directory.

    force: replace a checkpoint zoo wrote there (never another file). source: a checkpoint not to write over
    besides `model.source` (where zoo.load read it). max_shard_size: bytes per safetensors file, an int or
    Hugging Face's "5GB", "500MB", "2GiB" (transformers' default, 50GB). format="zoo": zoo.quant.save.
    """
    require(format in FORMATS, "format", format, "'hf' (Hugging Face's) or 'zoo' (zoo's quantized, zoo.quant.save)")
    if format == "zoo":
        return quant.save(model, directory, force=force, source=source)
    limit = shard_size(max_shard_size)
    family = FAMILIES[family_of(model)]
    quantized = [name for name, m in model.named_modules() if isinstance(m, quant.QuantLinear)]
    if quantized:
        raise ValueError(f"the model has {len(quantized)} quantized layers ({quantized[0]}, ...): {QUANTIZED}")
    if family.to_hf_config is None or family.zoo_tensors_to_hf is None:
        raise ValueError(f"the {family.name} family has no to_hf_config and zoo_tensors_to_hf "
                         f"(zoo/models/__init__.py): it cannot be written as a Hugging Face checkpoint")
    shards = plan_shards(plan(model, family), limit)
    config = hf_config(model, family)
    out, error = None, None
    if parallel.rank() == 0:
        try:
            out = output_for(model, directory, source, force)
        except (OSError, TypeError, ValueError) as e:
            error = e
    out = parallel.rank0_outcome(out, error)
    tensors = _hf_tensors(model, family, [e for shard in shards.values() for e in shard])
    error = None
    if parallel.rank() == 0:
        try:
            with writing(out) as partial:
                _write(partial, shards, tensors, config, tokenizer_files(model))
        except Exception as e:  # told to every rank below
            error = e
    if parallel.world_size() > 1:
        for _ in tensors:  # the other ranks gather every tensor; so does rank 0 after a failure, writing nothing
            pass
    return parallel.rank0_outcome(out, error)


def shard_size(size: int | str) -> int:
    """max_shard_size in bytes: an int, or "5GB" / "500MB" / "100KB" (powers of 1000) / "2GiB" (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*((?:[KMG]i?)?B)?\s*", size, re.IGNORECASE) if isinstance(size, str) else None
    n = size if is_int(size) else int(match[1]) * SIZE_UNITS[(match[2] or "").upper()] if match else 0
    require(n > 0, "max_shard_size", size, "a number of bytes > 0, or a size such as '5GB', '500MB', '2GiB'")
    return n


def plan(model: nn.Module, family) -> list[Entry]:
    """Every tensor of the Hugging Face checkpoint, in the order of the model's parameters, from shapes alone
    (the family's zoo_tensors_to_hf on meta tensors of the whole, unsplit, parameters)."""
    params = dict(model.named_parameters())  # a tied output and embedding once, as Hugging Face stores them
    full = full_shapes(model)
    entries, covered = [], set()
    for key in dict.fromkeys(family.zoo_to_hf(name) for name in params):
        names = family.hf_to_zoo(key)
        if not names or any(name not in params for name in names) or covered & set(names):
            raise RuntimeError(f"{family.name}: Hugging Face's {key!r} maps to zoo's {names}, which are not "
                               f"parameters of the model each written once (zoo/models/{family.name}.py's tables)")
        shaped = [torch.empty(full[name], dtype=params[name].dtype, device="meta") for name in names]
        t = family.zoo_tensors_to_hf(key, shaped, model.config)
        entries.append(Entry(key, names, tuple(t.shape), t.dtype))
        covered.update(names)
    return entries


def plan_shards(entries: list[Entry], limit: int) -> dict[str, list[Entry]]:
    """File name -> its tensors, in safetensors' order (wider dtypes first, then by key): a new file whenever
    the next tensor would take this one past `limit` bytes; model.safetensors when one file holds them all."""
    groups, size = [[]], 0
    for e in entries:
        if groups[-1] and size + e.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return {name: sorted(group, key=lambda e: (-e.dtype.itemsize, e.key)) for name, group in zip(names, groups)}


def hf_config(model: nn.Module, family) -> dict:
    """config.json: the family's keys, the tokenizer's bos and eos ids (every stop id, eos first, when it has
    more), and the dtype the weights are written in."""
    config = {**family.to_hf_config(model.config), "dtype": str(model.embed.weight.dtype).removeprefix("torch.")}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            config["bos_token_id"] = tokenizer.bos_id
        if tokenizer.eos_id is not None:
            others = sorted(set(getattr(tokenizer, "stop_ids", ())) - {tokenizer.eos_id})
            config["eos_token_id"] = [tokenizer.eos_id, *others] if others else tokenizer.eos_id
    return config


def _hf_tensors(model: nn.Module, family, entries: list[Entry]) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(key, tensor) for each entry in turn, the tensor whole on rank 0 (None on the others), in HF's layout."""
    params = dict(model.named_parameters())
    for e in entries:  # nothing held here between two tensors
        yield e.key, _hf_tensor(model, family, e, params)


def _hf_tensor(model: nn.Module, family, e: Entry, params: dict) -> torch.Tensor | None:
    parts = [_whole(model, name, params[name]) for name in e.names]
    return None if parts[0] is None else family.zoo_tensors_to_hf(e.key, parts, model.config).contiguous()


def _whole(model: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor | None:
    """Parameter `name` whole, on the CPU, on rank 0 (None on the others). A split one (its layer's split_dims,
    zoo/parallel/layers.py) is gathered from every rank (a collective) and its padding past full_size cut;
    a replicated one is rank 0's."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    dim = getattr(module, "split_dims", {}).get(attr)
    first = parallel.rank() == 0
    if dim is None or parallel.world_size() == 1:
        return p.detach().cpu() if first else None
    parts = [torch.empty_like(p) for _ in range(parallel.world_size())] if first else None
    dist.gather(p.detach().contiguous(), parts, dst=0)
    return torch.cat(parts, dim).narrow(dim, 0, module.full_size).cpu() if first else None


def _write(partial: Path, shards: dict[str, list[Entry]], tensors: Iterator, config: dict,
           tokenizer: dict[str, Path]) -> None:
    """The checkpoint's files, into `partial`: the shards (from `tensors`, in the plan's order), the index when
    there are several, config.json, the tokenizer's files."""
    files = ["config.json", *shards, *([INDEX] if len(shards) > 1 else []), *tokenizer]
    metadata = {"format": "pt", "written_by": WRITTEN_BY, "files": json.dumps(files)}  # "pt": transformers asks
    for name, entries in shards.items():
        write_safetensors(partial / name, entries, tensors, metadata)
    if len(shards) > 1:
        entries = [e for group in shards.values() for e in group]
        index = {"metadata": {"total_parameters": sum(torch.Size(e.shape).numel() for e in entries),
                              "total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.key: name for name, group in shards.items() for e in group}}
        (partial / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, path in tokenizer.items():
        shutil.copyfile(path, partial / name)


def write_safetensors(path: Path, entries: list[Entry], tensors: Iterator, metadata: dict[str, str]) -> None:
    """A safetensors file (an 8-byte little-endian header size, the JSON header padded with spaces to 8 bytes,
    then the tensors' bytes in header order), its header written from `entries` before any data, then each
    tensor as `tensors` yields it: one in memory at a time."""
    header, offset = {"__metadata__": metadata}, 0
    for e in entries:
        header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for e in entries:
            _write_tensor(f, e, *next(tensors))  # nothing held here between two tensors


def _write_tensor(f, e: Entry, key: str, t: torch.Tensor) -> None:
    if key != e.key or tuple(t.shape) != e.shape or t.dtype != e.dtype:
        raise RuntimeError(f"{f.name}: {key} {tuple(t.shape)} {t.dtype} came where the plan has {e.key} {e.shape} "
                           f"{e.dtype}")
    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

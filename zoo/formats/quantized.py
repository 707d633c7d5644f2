"""zoo's own quantized checkpoints: written by `save`, read by `open` and `place_layers`.

    zoo.quant.save(model, "llama-int4")                           # a quantized checkpoint...
    model = zoo.load("llama-int4")                                 # ...that loads as any other

A quantized checkpoint is one `model.safetensors` under zoo's own parameter names (a quantized
layer `L` stores `L.qweight` + `L.scales`, or `L.packed` + `L.scales` + `L.zeros`, and `L.bias`),
whose metadata records the format and its version, the scheme, the group size, the layout and the
model's config; the tokenizer's files are copied beside it. Nothing is guessed from file names, and
kernel-specific layouts (torch's int4 CPU packing) are made on the first forward, never stored: on
the CPU that frees zoo's int4 copy (so the weight is held once), and a model that has run can no
longer be saved.

A quantized checkpoint loads under tensor parallelism too, each rank reading its slice of the
stored tensors (a stored int4 layer whose groups would straddle two ranks is dequantized to
floating point there: the same weights); saving is single-process. `save` never writes into a
checkpoint it could damage (`check_output`) and writes into a temporary directory beside the
output, renamed into place at the end: an interrupted save leaves no half-written checkpoint.
"""
import dataclasses
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

from zoo import checks
from zoo.formats.files import CheckpointError, Shard, safetensors_metadata, safetensors_tensors
from zoo.formats.lazy import Checkpoint, read_split
from zoo.kernels import Int4Weight, Int8Weight, dequantize_int4
from zoo.models import FAMILIES
from zoo.parallel import rank, world_size
from zoo.tokenizer import TOKENIZER_FILES, load_tokenizer

FORMAT, VERSION = "zoo-quantized", "1"
LAYOUTS = {  # scheme -> what its layers store
    "int8": "L.qweight int8 [N, K], L.scales fp32 [N]: w = qweight * scales[:, None]",
    "int4": "L.packed uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high), L.scales and L.zeros "
            "fp32 [N, K/group_size]: w = (q - zeros) * scales, per group",
}


# ---- reading ---------------------------------------------------------------------------------------

def detect(directory: Path) -> bool:
    path = directory / "model.safetensors"  # written by save
    return path.exists() and safetensors_metadata(path).get("format") == FORMAT


def config(directory: Path):
    """(family, config, file) from the metadata, checking the format version: the float model of the same shapes."""
    path = directory / "model.safetensors"
    meta = safetensors_metadata(path)
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: zoo-quantized format version {meta.get('version')!r} is not supported; this "
                              f"zoo reads version {VERSION}")
    scheme, model_type = meta.get("scheme"), meta.get("model_type")
    if scheme not in LAYOUTS or model_type not in FAMILIES:
        raise CheckpointError(f"{path}: metadata names scheme {scheme!r} and model_type {model_type!r}; supported: "
                              f"{', '.join(LAYOUTS)} and {', '.join(FAMILIES)}")
    return model_type, FAMILIES[model_type].config(**json.loads(meta["config"])), path


def open(directory: Path) -> Checkpoint:
    """Every stored tensor under its own name: the float parameters, and the quantized layers' parts, which
    `place_layers` takes out once the model is built."""
    family, cfg, path = config(directory)
    meta = safetensors_metadata(path)
    tokenizer = load_tokenizer(directory, json.loads(meta.get("tokenizer", "{}")))
    return Checkpoint(family, cfg, path, safetensors_tensors(path), tokenizer, lambda name: name, quantized=meta)


def place_layers(model: nn.Module, checkpoint: Checkpoint, device: torch.device) -> dict:
    """Put the stored quantized layers into `model` (built on the meta device), this rank's slice of each, and
    return the lazy tensors left for the loader to fill: the float parameters, and under TP an int4 layer
    whose groups would straddle two ranks, dequantized (said once on stderr).

    A layer is quantized where the file stores it so; others (a tied output, an int4 layer whose inputs did
    not split into groups, the output of files older than its quantization) are stored as float L.weight.
    """
    from zoo import quant  # here, not at the top: zoo.quant re-exports save, so it imports this module first
    path, tensors = checkpoint.config_file, dict(checkpoint.tensors)
    scheme, group_size = checkpoint.quantized["scheme"], int(checkpoint.quantized.get("group_size", 0))
    world = world_size()

    def read(key: str, dim: int | None) -> torch.Tensor:  # this rank's slice along dim (None: whole)
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key!r}, which the {scheme} layout needs "
                                  f"({LAYOUTS[scheme]})")
        return (tensors[key].read() if dim is None else read_split(tensors[key], dim, rank(), world)).to(device)

    used, floating = set(), {}
    for name, module in list(model.named_modules()):
        parts = [f"{name}.{k}" for k in (("qweight", "scales") if scheme == "int8" else ("packed", "scales", "zeros"))]
        if not (isinstance(module, quant.LINEARS) and parts[0] in tensors):
            continue
        why = quant.int4_misfit(module, group_size) if scheme == "int4" else None
        if why:  # under TP, groups that would straddle two ranks: this rank's slice of the dequantized weight
            floating[name] = why
            tensors[f"{name}.weight"] = Dequantized(f"{path}: {name}.packed", stored_weight(name, scheme, group_size,
                                                                                            read))
        else:
            split_dim = getattr(module, "split_dims", {}).get("weight")
            weight = stored_weight(name, scheme, group_size, read, split_dim)
            bias = torch.empty(module.weight.shape[0], device="meta") if module.bias is not None else None
            quant.replace_module(model, name, quant.QuantLinear.replacing(module, weight, bias))
        used.update(parts)
    if floating and rank() == 0:
        print(f"zoo: {path}: at world size {world} these int4 layers run in floating point (their weights "
              f"dequantized): {quant.describe_layers(floating, model)}", file=sys.stderr)
    return {k: t for k, t in tensors.items() if k not in used}


class Dequantized:
    """A stored int4 weight as a lazy float tensor (whole groups, cut after dequantizing)."""

    def __init__(self, where: str, weight: Int4Weight):
        self.where, self.weight, self.dtype = where, weight, weight.scales.dtype
        self.shape = (weight.packed.shape[0], 2 * weight.packed.shape[1])

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight
        t = dequantize_int4(w.packed, w.scales, w.zeros, w.group_size)
        t = t if shard is None else t.chunk(shard.parts, shard.dim)[shard.index]
        return t.to(dtype or self.dtype).contiguous()


def stored_weight(name: str, scheme: str, group_size: int, read, split_dim: int | None = None) -> Int8Weight | Int4Weight:
    """The quantized weight of layer `name` from a quantized checkpoint; read(key, dim) gives a stored tensor,
    this rank's slice of it along `dim` under tensor parallelism (None: whole).

    split_dim is the float weight's (0: column-parallel, 1: row-parallel). Every stored tensor is
    [N, ...] so a column split cuts them all on dim 0; a row split cuts the inputs: int8's qweight
    on dim 1 (its per-row scales are whole), int4's packed bytes and its per-group scales and zeros
    on dim 1, which needs a whole number of groups per rank.
    """
    if scheme == "int8":
        return Int8Weight(read(f"{name}.qweight", split_dim), read(f"{name}.scales", 0 if split_dim == 0 else None))
    return Int4Weight(read(f"{name}.packed", split_dim), read(f"{name}.scales", split_dim),
                      read(f"{name}.zeros", split_dim), group_size)


# ---- writing ---------------------------------------------------------------------------------------

def check_output(directory: str | Path, source: str | Path | None = None, force: bool = False) -> Path:
    """The output directory of a quantized checkpoint, resolved; refuses one where writing could lose data.

    Refused, with a ValueError naming the path, whatever `force`: the source checkpoint directory, a
    directory inside it (a second checkpoint beside the first, which loading would not pick), one
    that contains it, a file, and a directory holding anything zoo did not write (named in the
    error). A directory holding only a checkpoint zoo wrote (`written_by_zoo`) is replaced with
    `force` and refused without it. Reads nothing but directory listings and safetensors headers.
    """
    for name, path in (("directory", directory), ("source", source)):
        checks.require(path is None and name == "source" or isinstance(path, (str, os.PathLike)), name, path,
                       "a path (str or os.PathLike)", TypeError)
    out = Path(directory).expanduser().resolve()
    if source is not None:
        src = Path(source).expanduser().resolve()
        if out == src:
            raise ValueError(f"{out}: the output is the source checkpoint; write the quantized copy to a new directory")
        if src in out.parents:
            raise ValueError(f"{out}: the output lies inside the source checkpoint {src}; write it outside")
        if out in src.parents:
            raise ValueError(f"{out}: the output contains the source checkpoint {src}; write it elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; the output is a directory")
    held = _listing(out)
    if not held:
        return out
    ours = written_by_zoo(out)
    others = [name for name in held if name not in ours]
    if others:
        raise ValueError(f"{out}: holds files zoo did not write ({_names(others)}); choose a new or empty directory "
                         f"(--force, force=True, replaces only a checkpoint zoo wrote and removes no other file)")
    if not force:
        raise ValueError(f"{out}: already holds a checkpoint zoo wrote ({_names(held)}); choose a new directory, or "
                         f"pass --force (force=True) to replace those files")
    return out


def written_by_zoo(directory: Path) -> set[str]:
    """The names of the files a zoo-quantized checkpoint in `directory` consists of, as its metadata lists
    them (files written before the list was kept: model.safetensors and the tokenizer files zoo copies);
    empty when the directory holds no checkpoint zoo wrote."""
    path = directory / "model.safetensors"
    try:
        meta = safetensors_metadata(path) if path.is_file() else {}
    except CheckpointError:  # not a safetensors file: not ours
        return set()
    if meta.get("format") != FORMAT:
        return set()
    try:
        files = json.loads(meta["files"]) if "files" in meta else ["model.safetensors", *TOKENIZER_FILES]
    except ValueError:
        return set()
    return {name for name in files if isinstance(name, str) and "/" not in name} | {"model.safetensors"}


def _listing(directory: Path) -> list[str]:
    """The entries of a directory (sub-directories with a trailing /), or [] if it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")


def save(model: nn.Module, directory: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """Write a quantized model (loaded by zoo.load or built in code) as a zoo-quantized checkpoint; returns the
    directory.

    The directory is checked first (`check_output`: never the checkpoint the model was loaded from
    (`model.source`, which zoo.load sets) nor `source`, nor a place inside either; a checkpoint zoo
    wrote only with force=True; never a directory holding other files), written as a temporary
    sibling and renamed into place when complete. Layers that stayed in floating point are stored as
    `L.weight`; the tokenizer's files (`model.tokenizer.files`) are copied beside it, and the
    metadata lists every file written, so that a later `force=True` removes only those."""
    from zoo import quant  # here, not at the top: zoo.quant re-exports save, so it imports this module first
    if world_size() > 1:
        raise NotImplementedError("saving a quantized model under tensor parallelism is not supported")
    model_type = next((name for name, family in FAMILIES.items() if isinstance(model, family.model)), None)
    if model_type is None:
        raise ValueError(f"a {type(model).__name__} is not one of zoo's models ({', '.join(FAMILIES)})")
    loaded_from = getattr(model, "source", None)
    if loaded_from is not None and source is not None:
        check_output(directory, loaded_from)  # neither may be overwritten
    directory = check_output(directory, source if source is not None else loaded_from, force)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, quant.QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers: zoo.quant.quantize(model, ...) or zoo.load(..., quant=...)")
    kinds = {"int8" if isinstance(m.qweight, Int8Weight) else ("int4", m.qweight.group_size) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(map(str, kinds))}: one scheme per checkpoint")
    kind = kinds.pop()
    scheme, group_size = (kind, 0) if kind == "int8" else kind
    tensors = {}
    for name, m in layers.items():
        w = m.qweight
        if scheme == "int4" and w.packed is None:
            raise ValueError(f"{name}: this int4 weight was repacked for torch's CPU kernel when the model first ran "
                             f"and zoo's format was freed: save before running the model (python -m zoo quantize)")
        stored = {"qweight": w.qweight, "scales": w.scales} if scheme == "int8" else \
            {"packed": w.packed, "scales": w.scales, "zeros": w.zeros}
        tensors.update({f"{name}.{k}": v for k, v in stored.items()})
    tensors.update({name: p for name, p in model.named_parameters()})  # floats, quantized layers' biases; tied once
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "extra"}
    tokenizer = model.tokenizer
    special = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None)}
    metadata = {"format": FORMAT, "version": VERSION, "scheme": scheme, "group_size": str(group_size),
                "layout": LAYOUTS[scheme], "model_type": model_type, "config": json.dumps(config),
                "tokenizer": json.dumps(special)}  # the ids a config.json would give (it is not copied)
    from safetensors.torch import save_file
    files = {name: path for name, path in (tokenizer.files if tokenizer is not None else {}).items() if path.exists()}
    metadata["files"] = json.dumps(["model.safetensors", *files])
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"  # renamed when complete
    partial.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial / "model.safetensors",
                  metadata=metadata)
        for name, path in files.items():
            shutil.copyfile(path, partial / name)
        _replace_directory(partial, directory)
    except BaseException:  # interrupted or failed: no half-written checkpoint stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def _replace_directory(new: Path, directory: Path) -> None:
    """Rename `new` to `directory`. A checkpoint zoo wrote there (check_output let it through) is moved
    aside first, checked again, and its files removed one by one once `new` is in its place: nothing
    zoo did not write is ever removed, even if it appeared after check_output."""
    held = _listing(directory)
    if not held:
        os.replace(new, directory)  # onto an empty directory, or a new name
        return
    ours = written_by_zoo(directory)
    if any(name not in ours for name in held):
        raise ValueError(f"{directory}: files zoo did not write appeared while saving; nothing was replaced")
    old = directory.parent / f".{directory.name}.replaced-{uuid.uuid4().hex[:8]}"
    directory.rename(old)
    new.rename(directory)
    for name in held:
        (old / name).unlink()
    old.rmdir()

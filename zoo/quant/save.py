"""Writing zoo's own quantized checkpoints (read by zoo/formats/quantized.py), never where it could lose data.

    zoo.quant.save(model, "llama-int4")                           # a quantized checkpoint...
    model = zoo.load("llama-int4")                                 # ...that loads as any other

`check_output` refuses, before anything is read, an output where writing could damage a checkpoint or a
file zoo did not write; `save` writes into a temporary directory beside the output, renamed into place
when complete, and its metadata lists the files it wrote: a later force=True replaces only those.
"""
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from zoo import checks
from zoo.formats.files import CheckpointError, safetensors_metadata
from zoo.formats.quantized import FORMAT, VERSION
from zoo.models import family_of
from zoo.parallel import world_size
from zoo.quant.linear import QuantLinear
from zoo.tokenizer import TOKENIZER_FILES


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
    if not isinstance(files, list):
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
    if world_size() > 1:
        raise NotImplementedError("saving a quantized model under tensor parallelism is not supported")
    model_type = family_of(model)
    loaded_from = getattr(model, "source", None)
    if loaded_from is not None and source is not None:
        check_output(directory, loaded_from)  # neither may be overwritten
    directory = check_output(directory, source if source is not None else loaded_from, force)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers: zoo.quant.quantize(model, ...) or zoo.load(..., quant=...)")
    kinds = {m.scheme.label(m.group_size) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(kinds)}: one scheme per checkpoint")
    first = next(iter(layers.values()))
    scheme, group_size = first.scheme, first.group_size
    tensors = {}
    for name, m in layers.items():
        if m.quantized is None:
            raise ValueError(f"{name}: this {scheme.name} weight was laid out for its device's kernel when the "
                             f"model first ran and zoo's format was freed: save before running the model "
                             f"(python -m zoo quantize)")
        tensors.update({f"{name}.{k}": v for k, v in scheme.stored(m.quantized).items()})
    tensors.update({name: p for name, p in model.named_parameters()})  # floats, quantized layers' biases; tied once
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "extra"}
    tokenizer = model.tokenizer
    special = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None)}
    metadata = {"format": FORMAT, "version": VERSION, "scheme": scheme.name, "group_size": str(group_size),
                "layout": scheme.layout, "model_type": model_type, "config": json.dumps(config),
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

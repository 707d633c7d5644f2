"""Where zoo writes a checkpoint (zoo.quant.save's quantized ones, zoo.save's Hugging Face ones), never where
it could lose data.

    out = output_for(model, directory, source, force)     # refused before anything is read or written
    with writing(out) as partial:                          # a temporary sibling, renamed into place at the end
        ...write the files into partial, their names in the metadata of each safetensors file...

`check_output` refuses an output where writing could damage a checkpoint or a file zoo did not write. The
safetensors files zoo writes list, in their metadata, every file of the checkpoint (`written_by_zoo`
reads them back), so that a later force=True replaces only those files.
"""
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from zoo import checks
from zoo.formats.files import CheckpointError, safetensors_metadata
from zoo.formats.quantized import FORMAT
from zoo.tokenizer import TOKENIZER_FILES

WRITTEN_BY = "zoo"  # the metadata of a Hugging Face safetensors file zoo wrote: written_by "zoo", files [...]


def check_output(directory: str | Path, source: str | Path | None = None, force: bool = False) -> Path:
    """The output directory of a checkpoint, resolved; refuses one where writing could lose data.

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
            raise ValueError(f"{out}: the output is the source checkpoint; write the new copy to a new directory")
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


def output_for(model: nn.Module, directory: str | Path, source: str | Path | None, force: bool) -> Path:
    """check_output against both the checkpoint the model was loaded from (`model.source`, set by zoo.load)
    and `source`: neither may be written over, into, or around."""
    loaded_from = getattr(model, "source", None)
    if loaded_from is not None and source is not None:
        check_output(directory, loaded_from, force)
    return check_output(directory, source if source is not None else loaded_from, force)


def written_by_zoo(directory: Path) -> set[str]:
    """The names of the files of the checkpoint zoo wrote in `directory`, as the metadata of its safetensors
    files lists them (a zoo-quantized model.safetensors from before the list was kept: itself and the
    tokenizer files zoo copies); empty when the directory holds no checkpoint zoo wrote."""
    return set().union(*(_listed(path) for path in sorted(directory.glob("*.safetensors"))))


def _listed(path: Path) -> set[str]:
    """The files a safetensors file zoo wrote says its checkpoint consists of (itself included); else none."""
    try:
        meta = safetensors_metadata(path) if path.is_file() else {}
    except CheckpointError:  # not a safetensors file: not ours
        return set()
    quantized = meta.get("format") == FORMAT and path.name == "model.safetensors"
    if not (quantized or meta.get("written_by") == WRITTEN_BY):
        return set()
    if "files" not in meta:  # a zoo-quantized file from before the list was kept
        files = ["model.safetensors", *TOKENIZER_FILES] if quantized else []
    else:
        try:
            files = json.loads(meta["files"])
        except ValueError:
            return set()
    if not isinstance(files, list):
        return set()
    return {name for name in files if isinstance(name, str) and "/" not in name} | {path.name}


def _listing(directory: Path) -> list[str]:
    """The entries of a directory (sub-directories with a trailing /), or [] if it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")


def tokenizer_files(model: nn.Module) -> dict[str, Path]:
    """The files the model's tokenizer was read from (name in the checkpoint -> path), those that still exist."""
    tokenizer = getattr(model, "tokenizer", None)
    return {name: path for name, path in (tokenizer.files if tokenizer is not None else {}).items() if path.exists()}


@contextmanager
def writing(directory: Path):
    """A new temporary directory beside `directory` to write a checkpoint into, renamed to `directory` when the
    block completes (`_replace_directory`); removed, with all it holds, when the block fails or is interrupted:
    no half-written checkpoint stays behind."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        yield partial
        _replace_directory(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


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

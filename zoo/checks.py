"""Checks of what users pass in, at the public API's entry: an error names the argument, its value and
what is accepted, before any work is done (never a raw error from deep inside)."""
import argparse
import json
import os
import sys
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt, or does not match its config (zoo.formats raise it, and
    zoo.tokenizer for a tokenizer's files: defined here, where both can import it)."""


def read_utf8(path: os.PathLike) -> str:
    """A checkpoint's UTF-8 text file (merges.txt, dict.txt, chat_template.jinja); else an error naming it."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_text(path: str | os.PathLike, purpose: str = "read") -> str:
    """A text file's contents, UTF-8; an error naming the file when it cannot be read or holds no text (to
    `purpose`: "there is no text to score")."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: {'empty' if not text else 'only whitespace'}: there is no text to {purpose}")
    return text


def shown(value) -> str:
    """A value as an error message shows it: tensors by dtype and shape, long things cut short."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (an int too large for a float, as JSON may hold, is none)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def require(ok: bool, name: str, value, accepted: str, error: type = ValueError) -> None:
    """Raise `error` naming the argument, its value and what is accepted, unless ok."""
    if not ok:
        raise error(f"{name}={shown(value)} is not accepted: {accepted}")


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """value, checked to be an int in [low, high] (either bound optional)."""
    span = (f" >= {low}" if high is None else f" in {low}..{high}") if low is not None else \
        (f" <= {high}" if high is not None else "")
    require(is_int(value), name, value, f"an int{span}", TypeError)
    require((low is None or value >= low) and (high is None or value <= high), name, value, f"an int{span}")
    return value


def token_ids(name: str, ids, vocab_size: int) -> list[int]:
    """A sequence of token ids, each an int in 0..vocab_size-1."""
    require(isinstance(ids, (list, tuple)), name, ids, "a list of token ids (ints)", TypeError)
    for i in ids:
        if not is_int(i) or not 0 <= i < vocab_size:
            raise (TypeError if not is_int(i) else ValueError)(
                f"{name} holds {shown(i)}: token ids are ints in 0..{vocab_size - 1} (the vocabulary's size is "
                f"{vocab_size})")
    return list(ids)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def floating_dtype(name: str, value, quant: tuple[str, ...] = ()) -> torch.dtype:
    """torch.float32 / bfloat16 / float16, or one of their names ("bf16", "float32", ...). quant: the
    quantization schemes the caller takes, named in the error for an integer dtype or a scheme's name."""
    accepted = "torch.float32, torch.bfloat16 or torch.float16 (or a name: " + ", ".join(DTYPES) + ")"
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    integer = isinstance(value, torch.dtype) and not (value.is_floating_point or value.is_complex or value == torch.bool)
    if quant and (integer or value in quant):
        accepted += "; for quantized weights pass " + " or ".join(f"quant={q!r}" for q in quant)
    require(isinstance(value, torch.dtype) and value in DTYPES.values(), name, value, accepted)
    return value


def device(name: str, value) -> torch.device:
    """A CPU or CUDA device that this torch can use: "cpu", "cuda", "cuda:1", a torch.device; None: CUDA if present."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "'cpu', 'cuda', 'cuda:N' or a torch.device (None: CUDA if present, else the CPU)"
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={shown(value)} is not accepted: {accepted}") from None
    require(dev.type in ("cpu", "cuda"), name, value, accepted)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={shown(value)} is not accepted: this torch ({torch.__version__}) sees no CUDA GPU; "
                             f"use 'cpu'")
        count = torch.cuda.device_count()
        require(dev.index is None or dev.index < count, name, value, f"a GPU index in 0..{count - 1}")
    return dev


# ---- config files: each key read once, checked as it is read ------------------------------------
REQUIRED = object()
COUNT = ("an int >= 1", lambda v: is_int(v) and v >= 1)
# A model's sizes, bounded so that a corrupt config is refused rather than built: a size (a width, a vocabulary,
# heads) fits an int32, and a number of layers is at most 1024 (the largest published models have under 200).
SIZE = ("an int in 1..2**31-1", lambda v: is_int(v) and 1 <= v < 2**31)
LAYERS = ("an int in 1..1024", lambda v: is_int(v) and 1 <= v <= 1024)
POSITIVE = ("a number > 0", lambda v: is_number(v) and v > 0)
FRACTION = ("a number in 0..1", lambda v: is_number(v) and 0 <= v <= 1)
FLAG = ("true or false", lambda v: isinstance(v, bool))
TEXT = ("a string", lambda v: isinstance(v, str))
MAPPING = ("a mapping of keys to values", lambda v: isinstance(v, dict))


def key(cfg: dict, name: str, kind: tuple, default=REQUIRED, nullable: bool = False, numeric_text: bool = False):
    """cfg[name], checked to be of `kind` (COUNT, POSITIVE, ...), else a ValueError naming the key and the value.

    default: the value when the key is absent (REQUIRED: an error). nullable: null (None) also means
    the default. numeric_text: a string that reads as a number is that number (YAML reads 1e-5 as text).
    """
    accepted, ok = kind
    if name not in cfg or (nullable and cfg[name] is None):
        if default is REQUIRED:
            raise ValueError(f"missing key {name!r} ({accepted})")
        return default
    value = cfg[name]
    if numeric_text and isinstance(value, str):
        try:
            value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            pass
    if not ok(value):
        raise ValueError(f"key {name!r}: {shown(value)} is not accepted: {accepted}")
    return value


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words: 'an object', 'an array', 'a string', 'a number', ..."""
    return {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")


def read_json(path) -> dict:
    """A JSON file holding an object (config.json, params.json, an index, ...); else an error naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError, or a number of more digits than Python reads
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({{...}}), found {json_kind(value)}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse for zoo's commands (run.py, python -m zoo): a user error is one line on stderr, printed by
    rank 0 only under torchrun, and exit status 2 on every rank. `see`: the help to point to (default:
    this parser's own, "python -m zoo perplexity --help")."""

    def __init__(self, *args, see: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.see = see

    def error(self, message):  # argparse's own prints the usage too
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message} (see {self.see or self.prog + ' --help'})", file=sys.stderr)
        sys.exit(2)

"""zoo's own quantized checkpoints: read here (`detect`, `config`, `open`); written by zoo/quant/save.py, whose
layers zoo/quant/surgery.py's `place_layers` puts into a built model (each scheme of zoo/quant says what
it stores and how it splits: its Scheme).

    zoo.quant.save(model, "llama-int4")                           # a quantized checkpoint...
    model = zoo.load("llama-int4")                                 # ...that loads as any other

A quantized checkpoint is one `model.safetensors` under zoo's own parameter names (a quantized
layer `L` stores its scheme's tensors, `L.qweight` + `L.scales` for int8, `L.packed` + `L.scales` +
`L.zeros` for int4, and `L.bias`), whose metadata records the format and its version, the scheme,
the group size, the layout and the model's config; the tokenizer's files are copied beside it.
Nothing is guessed from file names, and kernel-specific layouts (torch's int4 CPU packing) are made
on the first forward, never stored: on the CPU that frees zoo's int4 copy (so the weight is held
once), and a model that has run can no longer be saved.

A quantized checkpoint loads under tensor parallelism too, each rank reading its slice of the
stored tensors (a stored int4 layer whose groups would straddle two ranks is dequantized to
floating point there: the same weights); saving is single-process. `save` never writes into a
checkpoint it could damage (`check_output`, zoo/output.py) and writes into a temporary directory
beside the output, renamed into place at the end: an interrupted save leaves no half-written checkpoint.
"""
import json
from pathlib import Path

from zoo.formats.files import CheckpointError, safetensors_metadata, safetensors_tensors
from zoo.formats.lazy import Checkpoint
from zoo.models import FAMILIES
from zoo.tokenizer import load_tokenizer

FORMAT, VERSION = "zoo-quantized", "1"
WEIGHTS = "model.safetensors"  # the one file of weights (save writes it)


def detect(directory: Path) -> bool:
    path = directory / WEIGHTS
    return path.exists() and safetensors_metadata(path).get("format") == FORMAT


def config(directory: Path):
    """(family, config, file) from the metadata, checking the format version: the float model of the same shapes.
    The scheme is checked where the layers are placed (zoo/quant/surgery.py's place_layers)."""
    path = directory / WEIGHTS
    meta = safetensors_metadata(path)
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: zoo-quantized format version {meta.get('version')!r} is not supported; this "
                              f"zoo reads version {VERSION}")
    model_type = meta.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: metadata names model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    fields = _json(path, meta, "config", dict)
    try:
        return model_type, FAMILIES[model_type].config(**fields), path
    except (TypeError, ValueError) as e:  # a field the config does not have, or of another type
        raise CheckpointError(f"{path}: the metadata's config does not describe a {model_type} model: {e}") from None


def open(directory: Path) -> Checkpoint:
    """Every stored tensor under its own name: the float parameters, and the quantized layers' parts, which
    `place_layers` takes out once the model is built."""
    family, cfg, path = config(directory)
    meta = safetensors_metadata(path)
    tokenizer = load_tokenizer(directory, _json(path, meta, "tokenizer", dict, "{}"))
    return Checkpoint(family, cfg, path, safetensors_tensors(path), tokenizer, lambda name: name, quantized=meta)


def _json(path: Path, meta: dict, key: str, kind: type, default: str | None = None):
    """The metadata's string `key` read as JSON of type `kind`; a CheckpointError naming the file if it is not."""
    text = meta.get(key, default)
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: the metadata's {key!r} is not a JSON {kind.__name__}: {str(text)[:80]!r}")
    return value

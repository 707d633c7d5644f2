"""Checkpoint formats, one file each, all on one lazy-tensor protocol (lazy.py):

    meta.py       Meta's LLaMA files: params.json + consolidated.NN.pth
    hf.py         Hugging Face's: config.json + safetensors or pytorch_model*.bin (sharded or not)
    gpt_neox.py   EleutherAI gpt-neox's DeepSpeed files: layer_*-model_*-model_states.pt or mp_rank_*
    metaseq.py    metaseq's OPT files: restored.pt or reshard-model_part-*.pt
    quantized.py  zoo's own int8/int4 model.safetensors (written by zoo.quant.save, read here)
    files.py      reading tensors out of safetensors, .pth and training pickles, one at a time

Each format has `detect(directory)`, `config(directory)` (family, config and config file, reading
no weights where it can) and `open(directory)` -> lazy.Checkpoint: the family, its config, every
tensor under zoo's parameter names as a lazy tensor, the tokenizer, and `where(name)`, the format's
own name of a tensor for error messages. Its config reading and its merge rules live in its file.
"""
from pathlib import Path

from zoo.formats import gpt_neox, hf, meta, metaseq, quantized
from zoo.formats.files import CheckpointError, safetensors_metadata
from zoo.formats.lazy import Checkpoint

# Asked in this order: gpt-neox's and metaseq's training files first, as a config.json may lie beside them.
FORMATS = (gpt_neox, metaseq, meta, hf, quantized)


def format_of(directory: Path):
    """The module of the format the directory holds."""
    found = [fmt for fmt in FORMATS if fmt.detect(directory)]
    if quantized in found and len(found) > 1:  # never load one of two models silently
        other = found[0].__name__.rsplit(".", 1)[-1]
        raise CheckpointError(f"{directory}: holds both a zoo-quantized model.safetensors and a {other} checkpoint; "
                              f"zoo cannot tell which one to load: move one of them to a directory of its own")
    if found:
        return found[0]
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    weights, named = directory / quantized.WEIGHTS, ""
    if weights.is_file():  # a safetensors file alone must say it is zoo's (a corrupt header: its own error)
        named = f"{weights}: its metadata's format is {safetensors_metadata(weights).get('format')!r}, not " \
                f"{quantized.FORMAT!r}; "
    latest = gpt_neox.broken_latest(directory)
    raise CheckpointError(f"{named}{directory}: neither params.json (Meta layout), config.json (Hugging Face layout), "
                          f"gpt-neox's layer_*-model_*-model_states.pt / mp_rank_*_model_states.pt, metaseq's "
                          f"restored.pt / reshard-model_part-*.pt nor a zoo-quantized model.safetensors found; "
                          f"the directory holds: {found}" + (f"; {latest}" if latest else ""))


def open(directory: Path) -> Checkpoint:
    return format_of(directory).open(directory)


def config(directory: Path):
    """(family, config, config file) as the checkpoint describes them, reading no weights where the format allows."""
    return format_of(directory).config(directory)

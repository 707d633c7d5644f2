"""Writing zoo's own quantized checkpoints (read by zoo/formats/quantized.py), never where it could lose data.

    zoo.quant.save(model, "llama-int4")                           # a quantized checkpoint...
    model = zoo.load("llama-int4")                                 # ...that loads as any other

The rule is zoo/output.py's, shared with zoo.save: `check_output` refuses, before anything is read, an
output where writing could damage a checkpoint or a file zoo did not write; `save` writes into a
temporary directory beside the output, renamed into place when complete, and its metadata lists the
files it wrote: a later force=True replaces only those.
"""
import dataclasses
import json
import shutil
from pathlib import Path

from torch import nn

from zoo.formats.quantized import FORMAT, VERSION
from zoo.models import family_of
from zoo.output import check_output, output_for, tokenizer_files, writing
from zoo.parallel import world_size
from zoo.quant.linear import QuantLinear

__all__ = ["check_output", "save"]


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
    directory = output_for(model, directory, source, force)
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
    files = tokenizer_files(model)
    metadata["files"] = json.dumps(["model.safetensors", *files])
    with writing(directory) as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial / "model.safetensors",
                  metadata=metadata)
        for name, path in files.items():
            shutil.copyfile(path, partial / name)
    return directory

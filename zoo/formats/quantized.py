"""zoo's own quantized checkpoints: read here (`detect`, `config`, `open`, and each layer's `stored_weight`);
written by zoo/quant/save.py, whose layers zoo/quant/surgery.py's `place_layers` puts into a built model.

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
checkpoint it could damage (`check_output`, zoo/quant/save.py) and writes into a temporary directory
beside the output, renamed into place at the end: an interrupted save leaves no half-written checkpoint.
"""
import json
from pathlib import Path

import torch

from zoo.formats.files import CheckpointError, Shard, safetensors_metadata, safetensors_tensors
from zoo.formats.lazy import Checkpoint
from zoo.kernels import Int4Weight, Int8Weight, dequantize_int4
from zoo.models import FAMILIES
from zoo.tokenizer import load_tokenizer

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

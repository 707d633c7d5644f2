"""Hugging Face checkpoints: config.json + model.safetensors or pytorch_model.bin, or the shards an index
(model.safetensors.index.json, pytorch_model.bin.index.json) lists.

config.json's model_type names the family (zoo/models/__init__.py), whose `from_hf_config` reads its keys
into the family's config, each checked (zoo.checks.key). The tensors keep HF's names in the files; the
family's name table (`hf_to_zoo`) gives zoo's, and `hf_tensor_to_zoo` its layout (LLaMA's q/k rows
permuted back to Meta's rotary pairs, GPT-NeoX's fused query_key_value cut into wq, wk, wv, GPT-2's
transposed Conv1D weights, read whole: `whole_tensors`).
gpt-neox's and metaseq's own formats come here too (`zoo_tensors`), once under HF's names.
"""
from functools import partial
from pathlib import Path, PurePath

from zoo.checks import read_json, shown
from zoo.formats.files import CheckpointError, StoredTensor, open_tensors
from zoo.formats.lazy import Checkpoint, Mapped
from zoo.models import FAMILIES
from zoo.tokenizer import load_tokenizer

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def detect(directory: Path) -> bool:
    return (directory / "config.json").exists()


def has_weights(directory: Path) -> bool:
    """config.json with its weights: a Hugging Face checkpoint, whatever else lies beside it (HF's Trainer
    under DeepSpeed leaves DeepSpeed's `latest` and global_stepN/mp_rank_00_model_states.pt there)."""
    return detect(directory) and any((directory / f).exists() for f in WEIGHTS + INDEXES)


def read_config(path: Path, family: str, config: dict):
    """config.json's contents (or a config.json beside another format's files) as `family`'s config;
    an error in it names the file."""
    try:
        return FAMILIES[family].from_hf_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def config(directory: Path):
    """(family, config, config file) from config.json alone."""
    path = directory / "config.json"
    config = read_json(path)
    family = config.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise CheckpointError(f"{path}: unknown model_type {family!r}; supported: {', '.join(FAMILIES)}")
    return family, read_config(path, family, config), path


def open(directory: Path) -> Checkpoint:
    family, cfg, path = config(directory)
    tokenizer = load_tokenizer(directory, read_json(path), path)
    return Checkpoint(family, cfg, path, zoo_tensors(family, cfg, weight_file_tensors(directory)), tokenizer,
                      FAMILIES[family].zoo_to_hf)


def zoo_tensors(family: str, cfg, tensors: dict) -> dict:
    """Lazy tensors under Hugging Face's names -> under zoo's, in zoo's layout (a fused tensor gives several)."""
    family = FAMILIES[family]
    out = {}
    for hf_key, t in tensors.items():
        for name in family.hf_to_zoo(hf_key):  # one name, none (a key to skip), or several (a fused tensor)
            out[name] = Mapped(t, partial(family.hf_tensor_to_zoo, name, cfg=cfg), name, family.whole_tensors)
    return out


def weight_file_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face checkpoint: one weights file, or the shards an index lists."""
    for index_name in INDEXES:
        index = directory / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: expected a 'weight_map' object giving each tensor's shard file name, "
                                      f"found {shown(weight_map)}")
            tensors = {}
            for file in sorted(set(weight_map.values())):
                if PurePath(file).is_absolute() or ".." in PurePath(file).parts or PurePath(file) == PurePath():
                    raise CheckpointError(f"{index}: shard {file!r} points outside the checkpoint directory "
                                          f"{directory}; expected the name of a file in it")
                if not (directory / file).is_file():
                    raise CheckpointError(f"{directory / file}: shard listed in {index_name} is missing")
                tensors.update(open_tensors(directory / file))
            for k, file in weight_map.items():
                if k not in tensors or tensors[k].path != directory / file:
                    raise CheckpointError(f"{directory / file}: tensor {k!r} listed in {index_name} is missing")
            return tensors
    for name in WEIGHTS:
        if (directory / name).exists():
            return open_tensors(directory / name)
    raise CheckpointError(f"{directory}: no weights: expected one of {', '.join(WEIGHTS + INDEXES)}")

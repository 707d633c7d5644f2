"""Checkpoints as the training code that made them saved them: EleutherAI's gpt-neox (DeepSpeed) and metaseq (OPT).

`read(directory)` turns either into what zoo.loader's Hugging Face path takes: the family, its
config, and its tensors under Hugging Face's names, with the model-parallel ranks' files merged by
each tensor's rule (concatenated, summed, averaged or taken from one rank; see `neox_merge` and
`metaseq_merge` in the model files). Nothing is read until the loader asks for a tensor, so loading
one still holds at most one tensor beside the model.
"""
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from zoo.checkpoint import CheckpointError, StoredTensor, load_training_checkpoint, plain, stored_tensors
from zoo.models import gpt_neox, opt
from zoo.tokenizer import BPETokenizer, load_tokenizer

NEOX_PIPELINE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")  # one file per (layer, rank)
NEOX_SEQUENTIAL = re.compile(r"mp_rank_(\d+)_model_states\.pt")  # one file per rank
METASEQ_PARTS = re.compile(r"reshard-model_part-(\d+)\.pt")  # one file per rank; or one restored.pt


class Original(NamedTuple):
    model_type: str  # a key of zoo.loader.FAMILIES
    config: object  # the family's config
    tensors: dict  # Hugging Face key -> Merged
    tokenizer: object
    config_file: Path  # for error messages
    checkpoint_name: object  # zoo name -> where the checkpoint keeps it, for error messages


def layout(directory: Path) -> str | None:
    """"neox" or "metaseq" when the directory holds such a checkpoint (see `checkpoint_dir`), else None."""
    names = {p.name for p in checkpoint_dir(directory).iterdir()}
    if any(NEOX_PIPELINE.fullmatch(n) or NEOX_SEQUENTIAL.fullmatch(n) for n in names):
        return "neox"
    if "restored.pt" in names or any(METASEQ_PARTS.fullmatch(n) for n in names):
        return "metaseq"
    return None


def checkpoint_dir(directory: Path) -> Path:
    """DeepSpeed writes each checkpoint to a `global_stepN/` folder and its name to `latest`: follow it."""
    latest = directory / "latest"
    if latest.is_file() and (directory / latest.read_text().strip()).is_dir():
        return directory / latest.read_text().strip()
    return directory


def read(directory: Path) -> Original:
    return _read_neox(checkpoint_dir(directory)) if layout(directory) == "neox" else _read_metaseq(directory)


class Merged:
    """One tensor of the model, made of the model-parallel ranks' copies: reads like a StoredTensor.

    how: "dim0" / "dim1" concatenate, "sum" / "mean" add up (in fp32), "one" takes rank 0's.
    third: 0, 1 or 2 takes that third of the rows of each rank's copy first (a fused qkv).
    """

    def __init__(self, parts: list[StoredTensor], how: str, third: int | None = None):
        self.parts, self.how, self.third = parts, how, third
        self.path, self.key, self.dtype = parts[0].path, parts[0].key, parts[0].dtype
        shapes = [p.shape for p in parts]
        shape = list(shapes[0])
        if third is not None:
            if shape[0] % 3:
                raise CheckpointError(f"{self.path}: fused {self.key!r} of shape {tuple(shape)} has rows that do "
                                      f"not split in three")
            shape[0] //= 3
        if how in ("dim0", "dim1"):
            dim = int(how[-1])
            if any(len(s) <= dim or s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:] for s in shapes):
                raise CheckpointError(f"{self.path.parent}: the model-parallel copies of {self.key!r} have shapes "
                                      f"{shapes}, which do not concatenate along dim {dim}")
            shape[dim] = sum(s[dim] // (3 if third is not None and dim == 0 else 1) for s in shapes)
        elif any(s != shapes[0] for s in shapes):
            raise CheckpointError(f"{self.path.parent}: the model-parallel copies of {self.key!r} should be whole, "
                                  f"but have different shapes {shapes}")
        self.shape = tuple(shape)

    def read(self, dim: int | None = None, index: int = 0, parts: int = 1,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.how in ("sum", "mean"):
            t = sum(self._piece(p, torch.float32) for p in self.parts)
            t = (t / len(self.parts) if self.how == "mean" else t).to(dtype or self.dtype)
        elif self.how == "one" or len(self.parts) == 1:
            t = self._piece(self.parts[0], dtype)
        else:
            t = torch.cat([self._piece(p, dtype) for p in self.parts], dim=int(self.how[-1]))
        return t if dim is None else t.chunk(parts, dim)[index].clone()

    def _piece(self, part: StoredTensor, dtype: torch.dtype | None) -> torch.Tensor:
        return part.read(dtype=dtype) if self.third is None else part.read(0, self.third, 3, dtype=dtype)


def _ranks(files: dict[int, Path], what: str, directory: Path, n: int = 0) -> list[Path]:
    """Files numbered 0..n-1 (n: at least one more than the highest number found), none missing."""
    missing = [i for i in range(max(n, max(files) + 1)) if i not in files]
    if missing:
        raise CheckpointError(f"{directory}: the {what} of model-parallel rank(s) {missing} is missing "
                              f"(found ranks {sorted(files)})")
    return [files[i] for i in sorted(files)]


def _gathered(copies: list[dict[str, StoredTensor]], files: list[Path], where: str) -> dict[str, list[StoredTensor]]:
    """key -> every rank's copy, checking that each rank has the same keys."""
    for path, c in zip(files[1:], copies[1:]):
        for key in c.keys() ^ copies[0].keys():
            holder, other = (path, files[0]) if key in c else (files[0], path)
            raise CheckpointError(f"{holder}: tensor {key!r}{where} is not in {other.name}")
    return {key: [c[key] for c in copies] for key in copies[0]}


# ---- gpt-neox ------------------------------------------------------------------------------------

def _read_neox(directory: Path) -> Original:
    config_file, args = _neox_config(directory)
    n_layers = args.get("num_layers", args.get("num-layers"))
    if not isinstance(n_layers, int):
        raise CheckpointError(f"{config_file}: num-layers is missing or not a number")
    parallel_residual = args.get("gpt_j_residual", args.get("gpt-j-residual", False))
    pipeline, sequential = {}, {}
    for p in directory.iterdir():
        if m := NEOX_PIPELINE.fullmatch(p.name):
            pipeline.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
        elif m := NEOX_SEQUENTIAL.fullmatch(p.name):
            sequential[int(m.group(1))] = p
    n_ranks = max([args.get("model_parallel_size") or 1, *(r + 1 for f in pipeline.values() for r in f),
                   *(r + 1 for r in sequential)])
    if sequential:
        _check_neox_version(sequential.get(0) or next(iter(sequential.values())))
    by_layer: dict[int, dict[str, list[StoredTensor]]] = {}
    if pipeline:  # layer_XX-model_RR-model_states.pt: a plain state dict per file
        for idx, files in sorted(pipeline.items()):
            files = _ranks(files, f"layer_{idx:02d} file", directory, n_ranks)
            copies = [stored_tensors(f, _state_dict(f, None)) for f in files]
            by_layer[idx] = _gathered(copies, files, "")
    elif sequential:  # mp_rank_RR_model_states.pt: everything under ["module"] as sequential.{idx}.{key}
        files = _ranks(sequential, "mp_rank file", directory, n_ranks)
        copies = [stored_tensors(f, _state_dict(f, "module")) for f in files]
        for key, parts in _gathered(copies, files, " (under 'module')").items():
            m = re.fullmatch(r"sequential\.(\d+)\.(.+)", key)
            if m is None:
                raise CheckpointError(f"{files[0]}: unexpected tensor {key!r} under 'module' (expected "
                                      f"'sequential.<layer>.<name>')")
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = parts
    tensors = {}
    for idx, keys in by_layer.items():
        for key, parts in keys.items():
            hf_key = gpt_neox.neox_to_hf(idx, key, n_layers)
            if hf_key:
                tensors[hf_key] = Merged(parts, gpt_neox.neox_merge(key, parallel_residual))
    for hf_key, required in (("gpt_neox.embed_in.weight", "word_embeddings.weight of layer 0"),
                             ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.weight of layer 2")):
        if hf_key not in tensors:
            raise CheckpointError(f"{directory}: missing tensor {required} (gpt-neox layout, {n_layers} layers "
                                  f"per {config_file.name})")
    try:
        cfg = gpt_neox.GPTNeoXConfig.from_neox(args, vocab_size=tensors["gpt_neox.embed_in.weight"].shape[0],
                                               hidden_dim=tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape[0])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return Original("gpt_neox", cfg, tensors, _neox_tokenizer(directory, args), config_file,
                    lambda name: _neox_name(gpt_neox.zoo_to_hf(name), n_layers, bool(pipeline)))


def _neox_config(directory: Path) -> tuple[Path, dict]:
    """gpt-neox's YAML config files (it saves them in the checkpoint's configs/), merged in name order."""
    import yaml  # a dependency of zoo (setup.py), imported here: only this layout needs it

    files = sorted([*directory.glob("*.yml"), *directory.glob("*.yaml"), *directory.glob("configs/*.yml"),
                    *directory.glob("configs/*.yaml"), *directory.parent.glob("configs/*.yml")])
    if not files:
        raise CheckpointError(f"{directory}: a gpt-neox checkpoint, but no YAML config (*.yml) beside it or in "
                              f"configs/")
    args = {}
    for f in files:
        try:
            part = yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{f}: not valid YAML ({e})") from None
        if not isinstance(part, dict):
            raise CheckpointError(f"{f}: expected a mapping of gpt-neox arguments")
        args.update(part)
    return files[0], {k.replace("-", "_"): v for k, v in args.items()}


def _check_neox_version(path: Path) -> None:
    """Megatron's checkpoint_version below 2 ordered the fused qkv rows otherwise; zoo reads the current order."""
    state = load_training_checkpoint(path)
    version = state.get("checkpoint_version") if isinstance(state, dict) else None
    if version is not None and float(version) < 2:
        raise CheckpointError(f"{path}: checkpoint_version {version} (an old Megatron order of the fused qkv rows) "
                              f"is not supported; zoo reads version 2 and later")


def _neox_name(hf_key: str, n_layers: int, pipeline: bool) -> str:
    """Where a gpt-neox checkpoint keeps a tensor: 'layer_05 file: attention.dense.weight'."""
    m = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)", hf_key)
    idx, key = (int(m.group(1)) + 2, m.group(2)) if m else \
        (0, "word_embeddings.weight") if hf_key == "gpt_neox.embed_in.weight" else \
        (n_layers + 3, "norm." + hf_key.rpartition(".")[2]) if hf_key.startswith("gpt_neox.final_layer_norm") else \
        (n_layers + 4, "final_linear.weight")
    return f"layer_{idx:02d} files: {key}" if pipeline else f"sequential.{idx}.{key}"


def _neox_tokenizer(directory: Path, args: dict):
    """tokenizer.json beside the checkpoint, else the config's vocab-file (as given, or by name beside the checkpoint)."""
    found = load_tokenizer(directory)
    if found is not None or not args.get("vocab_file"):
        return found
    vocab = Path(args["vocab_file"])
    for path in (vocab, directory / vocab.name, directory.parent / vocab.name):
        if path.is_file() and path.suffix == ".json":
            spec = json.loads(path.read_text())
            eos = "<|endoftext|>" if any(t.get("content") == "<|endoftext|>" for t in spec.get("added_tokens", [])) \
                else None
            return BPETokenizer.from_tokenizer_json(path, eos=eos)
    return None


def _state_dict(path: Path, under: str | None) -> dict:
    state = load_training_checkpoint(path)
    if under is not None:
        if not isinstance(state, dict) or not isinstance(state.get(under), dict):
            found = ", ".join(map(repr, state)) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path}: expected the model's tensors under {under!r}; found {found}")
        state = state[under]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: v for k, v in state.items() if v is not None}


# ---- metaseq -------------------------------------------------------------------------------------

def _read_metaseq(directory: Path) -> Original:
    parts = {int(m.group(1)): p for p in directory.iterdir() if (m := METASEQ_PARTS.fullmatch(p.name))}
    files = _ranks(parts, "reshard-model_part file", directory) if parts else [directory / "restored.pt"]
    states = [load_training_checkpoint(f) for f in files]
    copies = []
    for f, state in zip(files, states):
        if not isinstance(state, dict):
            raise CheckpointError(f"{f}: expected a dict, found {type(state).__name__}")
        model = state.get("model", state)
        if any(".flat_param" in k for k in model):
            raise CheckpointError(f"{f}: FSDP-flattened parameters (flat_param_*); consolidate the shards with "
                                  f"metaseq's reshard script first")
        copies.append(stored_tensors(f, {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}))
    tensors = {}
    for key, stored in _gathered(copies, files, "").items():
        hf_keys = opt.metaseq_to_hf(key)
        for i, hf_key in enumerate(hf_keys):
            tensors[hf_key] = Merged(stored, opt.metaseq_merge(key), third=i if len(hf_keys) == 3 else None)
    config_file = directory / "config.json"
    try:
        if config_file.exists():
            cfg = opt.OPTConfig.from_hf(json.loads(config_file.read_text()))
        else:
            config_file = files[0]
            stored_cfg = plain(states[0].get("cfg"))
            model_cfg = stored_cfg.get("model") if isinstance(stored_cfg, dict) else None
            cfg = opt.OPTConfig.from_metaseq(model_cfg or plain(states[0].get("args")) or {},
                                             {k: t.shape for k, t in tensors.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {type(e).__name__}: {e}") from None
    names = {hf: key for key in copies[0] for hf in opt.metaseq_to_hf(key)}
    return Original("opt", cfg, tensors, load_tokenizer(directory), config_file,
                    lambda name: names.get(opt.zoo_to_hf(name).removeprefix("model."),
                                           _metaseq_name(opt.zoo_to_hf(name))))


def _metaseq_name(hf_key: str) -> str:
    key = hf_key.removeprefix("model.")
    for old, new in opt.METASEQ_RENAMES.items():
        if key.startswith(new):
            return old + key.removeprefix(new)
    return key

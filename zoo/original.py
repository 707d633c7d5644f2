"""Checkpoints as the training code that made them saved them: EleutherAI's gpt-neox (DeepSpeed) and metaseq (OPT).

`read(directory)` turns either into what zoo.loader's Hugging Face path takes: the family, its
config, and its tensors under Hugging Face's names, with the model-parallel ranks' files merged by
each tensor's rule (concatenated, summed, averaged or taken from one rank; see `neox_merge` and
`metaseq_merge` in the model files). Nothing is read until the loader asks for a tensor, and then
only the ranks' copies that hold (a rank's slice of) it, so loading holds about one tensor beside
the model.
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
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class Original(NamedTuple):
    model_type: str  # a key of zoo.loader.FAMILIES
    config: object  # the family's config
    tensors: dict  # Hugging Face key -> Merged
    tokenizer: object
    config_file: Path  # for error messages
    checkpoint_name: object  # zoo name -> where the checkpoint keeps it, for error messages


def layout(directory: Path) -> str | None:
    """"neox" or "metaseq" when the directory holds such a checkpoint, else None.

    A Hugging Face checkpoint (config.json with its weights) is never one: HF's Trainer under
    DeepSpeed leaves DeepSpeed's `latest` and global_stepN/mp_rank_00_model_states.pt beside it.
    """
    if (directory / "config.json").exists() and any((directory / f).exists() for f in HF_WEIGHTS):
        return None
    if any(NEOX_PIPELINE.fullmatch(p.name) or NEOX_SEQUENTIAL.fullmatch(p.name) for p in checkpoint_dir(directory).iterdir()):
        return "neox"
    if (directory / "restored.pt").exists() or any(METASEQ_PARTS.fullmatch(p.name) for p in directory.iterdir()):
        return "metaseq"
    return None


def checkpoint_dir(directory: Path) -> Path:
    """DeepSpeed writes each checkpoint to a `global_stepN/` folder and its name to `latest`: follow it."""
    latest = directory / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    return directory / tag if tag and (directory / tag).is_dir() else directory


def read(directory: Path) -> Original:
    return _read_neox(directory) if layout(directory) == "neox" else _read_metaseq(directory)


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
        """The whole tensor, or part `index` of `parts` along `dim` (under tensor parallelism)."""
        if self.how in ("dim0", "dim1") and len(self.parts) > 1:
            return self._concatenated(int(self.how[-1]), dim, index, parts, dtype)
        if self.how in ("sum", "mean"):
            t = sum(self._piece(p, torch.float32) for p in self.parts)
            t = (t / len(self.parts) if self.how == "mean" else t).to(dtype or self.dtype)
        else:  # "one", or a single rank
            t = self._piece(self.parts[0], dtype)
        return t if dim is None else t.chunk(parts, dim)[index].clone()

    def _concatenated(self, cat: int, dim: int | None, index: int, parts: int, dtype) -> torch.Tensor:
        """The rows [start, end) along `cat` (all without a split), read from the ranks' copies they lie in."""
        if dim is not None and dim != cat:  # a split across the ranks' own split: whole, then cut
            whole = torch.cat([self._piece(p, dtype) for p in self.parts], dim=cat)
            return whole.chunk(parts, dim)[index].clone()
        step = self.shape[cat] // (parts if dim is not None else 1)
        start = index * step if dim is not None else 0
        pieces, offset = [], 0
        for p in self.parts:
            size = p.shape[cat] // (3 if self.third is not None and cat == 0 else 1)
            lo, hi = max(start, offset), min(start + step, offset + size)
            if lo < hi:
                pieces.append(self._piece(p, dtype).narrow(cat, lo - offset, hi - lo))
            offset += size
        return torch.cat(pieces, dim=cat) if len(pieces) > 1 else pieces[0].clone()

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

def _read_neox(given: Path) -> Original:
    directory = checkpoint_dir(given)  # global_stepN/ when `given` has DeepSpeed's `latest`
    places = list(dict.fromkeys([directory, given]))  # where configs and tokenizer files may lie
    config_file, args = _neox_config(places)
    n_layers = args.get("num_layers")
    if not isinstance(n_layers, int):
        raise CheckpointError(f"{config_file}: num-layers is missing or not a number")
    parallel_residual = args.get("gpt_j_residual", False)
    pipeline, sequential = {}, {}
    for p in directory.iterdir():
        if m := NEOX_PIPELINE.fullmatch(p.name):
            pipeline.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
        elif m := NEOX_SEQUENTIAL.fullmatch(p.name):
            sequential[int(m.group(1))] = p
    n_ranks = max([args.get("model_parallel_size") or 1, *(r + 1 for f in pipeline.values() for r in f),
                   *(r + 1 for r in sequential)])
    by_layer: dict[int, dict[str, list[StoredTensor]]] = {}
    if pipeline:  # layer_XX-model_RR-model_states.pt: a plain state dict per file
        if sequential:  # here the mp_rank files hold the training state, and the checkpoint's version
            first = sequential.get(0) or next(iter(sequential.values()))
            _check_neox_version(load_training_checkpoint(first), first)
        for idx, files in sorted(pipeline.items()):
            files = _ranks(files, f"layer_{idx:02d} file", directory, n_ranks)
            copies = [stored_tensors(f, _tensors_under(load_training_checkpoint(f), f, None)) for f in files]
            by_layer[idx] = _gathered(copies, files, "")
    elif sequential:  # mp_rank_RR_model_states.pt: everything under ["module"] as sequential.{idx}.{key}
        files = _ranks(sequential, "mp_rank file", directory, n_ranks)
        states = [load_training_checkpoint(f) for f in files]
        _check_neox_version(states[0], files[0])
        copies = [stored_tensors(f, _tensors_under(state, f, "module")) for f, state in zip(files, states)]
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
    if parallel_residual and args.get("gpt_j_tied", False):  # one layer norm feeds attention and MLP alike:
        for hf_key in [k for k in tensors if ".input_layernorm." in k]:  # post_attention_layernorm is unused
            tensors[hf_key.replace(".input_layernorm.", ".post_attention_layernorm.")] = tensors[hf_key]
    for hf_key, required in (("gpt_neox.embed_in.weight", "word_embeddings.weight of layer 0"),
                             ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                              "mlp.dense_h_to_4h.weight (or mlp.linear1.weight) of layer 2")):
        if hf_key not in tensors:
            raise CheckpointError(f"{directory}: missing tensor {required} (gpt-neox layout, {n_layers} layers "
                                  f"per {config_file.name})")
    try:
        cfg = gpt_neox.GPTNeoXConfig.from_neox(args, vocab_size=tensors["gpt_neox.embed_in.weight"].shape[0],
                                               hidden_dim=tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape[0])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return Original("gpt_neox", cfg, tensors, _neox_tokenizer(places, args), config_file,
                    lambda name: _neox_name(gpt_neox.zoo_to_hf(name), n_layers, bool(pipeline)))


def _neox_config(places: list[Path]) -> tuple[Path, dict]:
    """gpt-neox's YAML config files (it saves them in the checkpoint's configs/), merged in name order."""
    import yaml  # a dependency of zoo (setup.py), imported here: only this layout needs it

    files = sorted({f for d in places for pattern in ("*.yml", "*.yaml", "configs/*.yml", "configs/*.yaml")
                    for f in d.glob(pattern)})
    if not files:
        raise CheckpointError(f"{places[0]}: a gpt-neox checkpoint, but no YAML config (*.yml) beside it or in "
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


def _check_neox_version(state: object, path: Path) -> None:
    """Megatron's checkpoint_version below 2 ordered the fused qkv rows otherwise; zoo reads the current order."""
    version = state.get("checkpoint_version") if isinstance(state, dict) else None
    if version is not None and float(version) < 2:
        raise CheckpointError(f"{path}: checkpoint_version {version} (an old Megatron order of the fused qkv rows) "
                              f"is not supported; zoo reads version 2 and later")


def _neox_name(hf_key: str, n_layers: int, pipeline: bool) -> str:
    """Where a gpt-neox checkpoint keeps a tensor: 'layer_05 files: attention.dense.weight'."""
    block = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)", hf_key)
    if block:
        idx, key = int(block.group(1)) + 2, block.group(2)
    elif hf_key == "gpt_neox.embed_in.weight":
        idx, key = 0, "word_embeddings.weight"
    elif hf_key.startswith("gpt_neox.final_layer_norm."):
        idx, key = n_layers + 3, "norm." + hf_key.rpartition(".")[2]
    else:
        idx, key = n_layers + 4, "final_linear.weight"
    return f"layer_{idx:02d} files: {key}" if pipeline else f"sequential.{idx}.{key}"


def _neox_tokenizer(places: list[Path], args: dict):
    """A tokenizer.json beside the checkpoint, else the one its config names, as given or by name beside
    it: `vocab-file` (a tokenizer.json for tokenizer-type HFTokenizer; GPT-2's vocab.json, with
    `merge-file`, for GPT2BPETokenizer, gpt-neox's default). Its <|endoftext|> is gpt-neox's eos."""
    def find(name):
        return next((p for p in (Path(name), *(d / Path(name).name for d in places)) if p.is_file()), None)

    kind, vocab, merges = args.get("tokenizer_type", "GPT2BPETokenizer"), args.get("vocab_file"), args.get("merge_file")
    tokenizer_json = next((d / "tokenizer.json" for d in places if (d / "tokenizer.json").is_file()), None)
    if tokenizer_json is None and kind == "HFTokenizer" and vocab:
        tokenizer_json = find(vocab)
    vocab, merges = (find(vocab) if vocab else None), (find(merges) if merges else None)
    source = tokenizer_json or vocab
    try:
        if tokenizer_json is not None:
            tok = BPETokenizer.from_tokenizer_json(tokenizer_json)
            tok.files = {"tokenizer.json": tokenizer_json}
        elif kind == "GPT2BPETokenizer" and vocab and merges:
            eot = json.loads(vocab.read_text(encoding="utf-8")).get("<|endoftext|>")
            tok = BPETokenizer.from_vocab_merges(vocab, merges, {} if eot is None else {"<|endoftext|>": eot})
            tok.files = {"vocab.json": vocab, "merges.txt": merges}
        else:
            return None
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{source}: cannot read it as a {kind} tokenizer: {type(e).__name__}: {e}") from None
    if "<|endoftext|>" in tok.token_ids:
        tok.eos_id = tok.token_ids["<|endoftext|>"]
        tok.stop_ids = {tok.eos_id}
    return tok


def _tensors_under(state: object, path: Path, under: str | None) -> dict:
    """The loaded file's state dict (or its entry `under`), without DeepSpeed's None placeholders."""
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

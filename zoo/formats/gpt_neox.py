"""EleutherAI gpt-neox's own checkpoints (DeepSpeed), as its training saved them: GPT-NeoX and Pythia.

One model-parallel rank per file: `layer_{idx:02d}-model_{rank:02d}-model_states.pt` (pipeline
layout, one file per layer) or `mp_rank_{rank:02d}_model_states.pt` (sequential layout, tensors
under ["module"] as "sequential.{idx}.{key}"), in DeepSpeed's `global_stepN/` folder that `latest`
names. idx 0 holds word_embeddings, idx i + 2 block i, idx n_layers + 3 the final norm, idx
n_layers + 4 final_linear (absent when the output is tied). Within a block the keys are Hugging
Face's (which were taken from these); newer versions name the MLP linear1 / linear2. The config is
gpt-neox's YAML (configs/*.yml), the tokenizer the one it names.

The ranks' copies merge by `neox_merge`; the merged tensors take Hugging Face's names
(`neox_to_hf`) and then zoo's, as a Hugging Face checkpoint's do (formats/hf.py). Nothing is read
until the loader asks for a tensor, and then only the copies that hold (a rank's slice of) it.
"""
import re
from pathlib import Path

from zoo.checks import COUNT, FLAG, FRACTION, LAYERS, POSITIVE, SIZE, is_number, key, read_json, shown
from zoo.formats.files import CheckpointError, StoredTensor, load_training_checkpoint, stored_tensors
from zoo.formats.hf import has_weights, zoo_tensors
from zoo.formats.lazy import Checkpoint, gathered, merged, ranks
from zoo.models import gpt_neox
from zoo.models.gpt_neox import GPTNeoXConfig
from zoo.tokenizer import BPETokenizer, HFTokenizer

PIPELINE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")  # one file per (layer, rank)
SEQUENTIAL = re.compile(r"mp_rank_(\d+)_model_states\.pt")  # one file per rank

# One model-parallel rank per file: `layer_{idx:02d}-model_{rank:02d}-model_states.pt` (pipeline
# layout, one file per layer) or `mp_rank_{rank:02d}_model_states.pt` (sequential layout, tensors
# under ["module"] as "sequential.{idx}.{key}"). idx 0 holds word_embeddings, idx i + 2 block i, idx
# n_layers + 3 the final norm, idx n_layers + 4 final_linear (absent when the output is tied).
# Within a block the keys are Hugging Face's (which were taken from these), newer versions name
# the MLP linear1 / linear2.
COLUMN_PARALLEL = re.compile(r"word_embeddings\.weight|final_linear\.weight|"
                                  r"attention\.query_key_value\..*|mlp\.(dense_h_to_4h|linear1)\..*")
ROW_PARALLEL = re.compile(r"(attention\.dense|mlp\.(dense_4h_to_h|linear2))\.(weight|bias)")
MLP_NAMES = {"linear1": "dense_h_to_4h", "linear2": "dense_4h_to_h"}


def neox_to_hf(idx: int, key: str, n_layers: int) -> str:
    """The Hugging Face key of tensor `key` of gpt-neox layer `idx` ('' for one without a parameter here)."""
    if idx == 0 and key == "word_embeddings.weight":
        return "gpt_neox.embed_in.weight"
    if 2 <= idx < n_layers + 2:
        module = re.sub(r"^mlp\.(linear1|linear2)\.", lambda m: f"mlp.{MLP_NAMES[m.group(1)]}.", key)
        return f"gpt_neox.layers.{idx - 2}.{module}"
    if idx == n_layers + 3 and key.startswith("norm."):
        return f"gpt_neox.final_layer_norm.{key.removeprefix('norm.')}"
    if idx == n_layers + 4 and key == "final_linear.weight":
        return "embed_out.weight"
    if idx == n_layers + 4 and key == "word_embeddings.weight":  # the tied output layer's copy
        return ""
    return f"layer {idx}: {key}"  # not a parameter of this model: the loader reports it


def neox_merge(key: str, parallel_residual: bool) -> str:
    """How the model-parallel ranks' copies of a gpt-neox tensor make the whole one.

    "dim0"/"dim1": concatenated (column-parallel layers and the vocab-parallel embedding on dim 0,
    row-parallel weights on dim 1). A row-parallel bias is whole on every rank: with the parallel
    (GPT-J) residual each rank adds its copy before the one all-reduce, so the model's bias is their
    "sum"; with the sequential residual it is added once after the all-reduce ("one"). Everything
    else (norms) is replicated: the "mean", as gpt-neox's converter takes it.
    """
    if COLUMN_PARALLEL.fullmatch(key):
        return "dim0"
    if ROW_PARALLEL.fullmatch(key):
        return "dim1" if key.endswith(".weight") else "sum" if parallel_residual else "one"
    return "mean"


def detect(directory: Path) -> bool:
    """A gpt-neox checkpoint, in `directory` or the global_stepN/ its `latest` names; never a Hugging Face one
    beside which training left such files."""
    return not has_weights(directory) and any(PIPELINE.fullmatch(p.name) or SEQUENTIAL.fullmatch(p.name)
                                              for p in checkpoint_dir(directory).iterdir())


def checkpoint_dir(directory: Path) -> Path:
    """DeepSpeed writes each checkpoint to a `global_stepN/` folder and its name to `latest`: follow it."""
    latest = directory / "latest"
    tag = latest.read_bytes().decode("utf-8", "replace").strip() if latest.is_file() else ""
    return directory / tag if tag and (directory / tag).is_dir() else directory


def broken_latest(directory: Path) -> str | None:
    """What is wrong with a DeepSpeed `latest` file that names no folder beside it, if there is one."""
    latest = directory / "latest"
    if not latest.is_file() or checkpoint_dir(directory) != directory:
        return None
    return f"{latest} names {latest.read_bytes()[:60].decode('utf-8', 'replace').strip()!r}, which is no folder here"


def config(directory: Path):
    """(family, config, config file): the sizes come from the tensors' shapes, so the files are opened (mmap'd)."""
    found = open(directory)
    return found.family, found.config, found.config_file


def open(given: Path) -> Checkpoint:
    directory = checkpoint_dir(given)  # global_stepN/ when `given` has DeepSpeed's `latest`
    places = list(dict.fromkeys([directory, given]))  # where configs and tokenizer files may lie
    config_file, args = _yaml_config(places)
    try:
        yaml = dict(numeric_text=True)  # PyYAML reads a number without a dot, like 1e-5, as a string
        n_layers = key(args, "num_layers", LAYERS, **yaml)
        mp_size = key(args, "model_parallel_size", COUNT, 1, nullable=True, **yaml)
        parallel_residual = key(args, "gpt_j_residual", FLAG, False)
        tied_norm = key(args, "gpt_j_tied", FLAG, False)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    pipeline, sequential = {}, {}
    for p in directory.iterdir():
        if m := PIPELINE.fullmatch(p.name):
            pipeline.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
        elif m := SEQUENTIAL.fullmatch(p.name):
            sequential[int(m.group(1))] = p
    n_ranks = max([mp_size, *(r + 1 for f in pipeline.values() for r in f),
                   *(r + 1 for r in sequential)])
    by_layer: dict[int, dict[str, list[StoredTensor]]] = {}
    if pipeline:  # layer_XX-model_RR-model_states.pt: a plain state dict per file
        if sequential:  # here the mp_rank files hold the training state, and the checkpoint's version
            first = sequential.get(0) or next(iter(sequential.values()))
            _check_version(load_training_checkpoint(first), first)
        for idx, files in sorted(pipeline.items()):
            files = ranks(files, f"layer_{idx:02d} file", directory, n_ranks)
            copies = [stored_tensors(f, _tensors_under(load_training_checkpoint(f), f, None)) for f in files]
            by_layer[idx] = gathered(copies, files, "")
    elif sequential:  # mp_rank_RR_model_states.pt: everything under ["module"] as sequential.{idx}.{key}
        files = ranks(sequential, "mp_rank file", directory, n_ranks)
        states = [load_training_checkpoint(f) for f in files]
        _check_version(states[0], files[0])
        copies = [stored_tensors(f, _tensors_under(state, f, "module")) for f, state in zip(files, states)]
        for name, parts in gathered(copies, files, " (under 'module')").items():
            m = re.fullmatch(r"sequential\.(\d+)\.(.+)", name)
            if m is None:
                raise CheckpointError(f"{files[0]}: unexpected tensor {name!r} under 'module' (expected "
                                      f"'sequential.<layer>.<name>')")
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = parts
    tensors = {}
    for idx, keys in by_layer.items():
        for name, parts in keys.items():
            hf_key = neox_to_hf(idx, name, n_layers)
            if hf_key:
                tensors[hf_key] = merged(parts, neox_merge(name, parallel_residual))
    if parallel_residual and tied_norm:  # one layer norm feeds attention and MLP alike:
        for hf_key in [k for k in tensors if ".input_layernorm." in k]:  # post_attention_layernorm is unused
            tensors[hf_key.replace(".input_layernorm.", ".post_attention_layernorm.")] = tensors[hf_key]
    for hf_key, required in (("gpt_neox.embed_in.weight", "word_embeddings.weight of layer 0"),
                             ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                              "mlp.dense_h_to_4h.weight (or mlp.linear1.weight) of layer 2")):
        if hf_key not in tensors:
            raise CheckpointError(f"{directory}: missing tensor {required} (gpt-neox layout, {n_layers} layers "
                                  f"per {config_file.name})")
    try:
        cfg = neox_config(args, vocab_size=tensors["gpt_neox.embed_in.weight"].shape[0],
                          hidden_dim=tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape[0])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return Checkpoint("gpt_neox", cfg, config_file, zoo_tensors("gpt_neox", cfg, tensors), _tokenizer(places, args, config_file),
                      lambda name: _neox_name(gpt_neox.zoo_to_hf(name), n_layers, bool(pipeline)))


def _yaml_config(places: list[Path]) -> tuple[Path, dict]:
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
            part = yaml.safe_load(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise CheckpointError(f"{f}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) for k in part):
            raise CheckpointError(f"{f}: expected a mapping of gpt-neox arguments (names to values)")
        args.update(part)
    return files[0], {k.replace("-", "_"): v for k, v in args.items()}


def _check_version(state: object, path: Path) -> None:
    """Megatron's checkpoint_version below 2 ordered the fused qkv rows otherwise; zoo reads the current order."""
    version = state.get("checkpoint_version") if isinstance(state, dict) else None
    if version is not None and not is_number(version):
        raise CheckpointError(f"{path}: checkpoint_version {shown(version)} is not a number")
    if version is not None and version < 2:
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


def _tokenizer(places: list[Path], args: dict, config_file: Path):
    """A tokenizer.json beside the checkpoint, else the one its config names, as given or by name beside
    it: `vocab-file` (a tokenizer.json for tokenizer-type HFTokenizer; GPT-2's vocab.json, with
    `merge-file`, for GPT2BPETokenizer, gpt-neox's default). Its <|endoftext|> is gpt-neox's eos."""
    def find(name):
        return next((p for p in (Path(name), *(d / Path(name).name for d in places)) if p.is_file()), None)

    kind, vocab, merges = args.get("tokenizer_type", "GPT2BPETokenizer"), args.get("vocab_file"), args.get("merge_file")
    for name, value in (("tokenizer-type", kind), ("vocab-file", vocab), ("merge-file", merges)):
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{config_file}: {name} {shown(value)} is not a string")
    tokenizer_json = next((d / "tokenizer.json" for d in places if (d / "tokenizer.json").is_file()), None)
    if tokenizer_json is None and kind == "HFTokenizer" and vocab:
        tokenizer_json = find(vocab)
    vocab, merges = (find(vocab) if vocab else None), (find(merges) if merges else None)
    if tokenizer_json is not None:
        return HFTokenizer(tokenizer_json, files={"tokenizer.json": tokenizer_json}, end_of_text="<|endoftext|>")
    if kind == "GPT2BPETokenizer" and vocab and merges:
        eot = read_json(vocab).get("<|endoftext|>")
        return BPETokenizer.from_vocab_merges(vocab, merges, {} if eot is None else {"<|endoftext|>": eot},
                                              files={"vocab.json": vocab, "merges.txt": merges},
                                              end_of_text="<|endoftext|>")
    return None


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


def neox_config(args: dict, vocab_size: int, hidden_dim: int) -> GPTNeoXConfig:
    """From gpt-neox's YAML config (keys with '-' or '_'), as its own defaults read it. The
    vocabulary (padded for model parallelism) and the MLP width come from the tensors' shapes."""
    args = {k.replace("-", "_"): v for k, v in args.items()}
    missing = [k for k in ("hidden_size", "num_layers", "num_attention_heads") if k not in args]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(k.replace('_', '-') for k in missing)}")
    unsupported = {"pos_emb": ("learned", "rotary"), "norm": ("layernorm", "layernorm"),
                   "mlp_type": ("regular", "regular"),
                   "use_bias_in_norms": (True, True), "use_bias_in_mlp": (True, True),
                   "activation": ("gelu", ("gelu", "relu"))}  # key: (gpt-neox's default, what zoo supports)
    for option, (default, supported) in unsupported.items():
        value = args.get(option, default)
        if value not in (supported if isinstance(supported, tuple) else (supported,)):
            raise ValueError(f"{option.replace('_', '-')}: {value!r} is not supported by zoo's GPT-NeoX "
                             f"(supported: {supported!r})")
    if args.get("num_kv_heads") not in (None, args["num_attention_heads"]):
        raise ValueError("num-kv-heads: grouped-query attention is not supported by zoo's GPT-NeoX")
    activation = "gelu_new" if args.get("activation", "gelu") == "gelu" and args.get("openai_gelu") else \
        args.get("activation", "gelu")
    yaml = dict(numeric_text=True)  # PyYAML reads a number without a dot, like 1e-5, as a string
    return GPTNeoXConfig(dim=key(args, "hidden_size", SIZE, **yaml), n_layers=key(args, "num_layers", LAYERS, **yaml),
               n_heads=key(args, "num_attention_heads", SIZE, **yaml), hidden_dim=hidden_dim, vocab_size=vocab_size,
               max_seq_len=key(args, "max_position_embeddings", SIZE, None, nullable=True, **yaml)
               or key(args, "seq_length", SIZE, 2048, nullable=True, **yaml),
               rotary_pct=key(args, "rotary_pct", FRACTION, 1.0, **yaml),
               rope_theta=float(key(args, "rotary_emb_base", POSITIVE, 10000, **yaml)),
               norm_eps=key(args, "layernorm_epsilon", POSITIVE, 1e-5, **yaml),
               parallel_residual=key(args, "gpt_j_residual", FLAG, False),
               bias=key(args, "use_bias_in_attn_linear", FLAG, True), activation=activation,
               tie_embeddings=not key(args, "no_weight_tying", FLAG, False))

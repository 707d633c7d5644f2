"""Hugging Face checkpoints: config.json + model.safetensors or pytorch_model.bin, or the shards an index
(model.safetensors.index.json, pytorch_model.bin.index.json) lists.

config.json's model_type names the family; its keys are read here into the family's config, each
checked (zoo.checks.key). The tensors keep HF's names in the files; each family's name table
(`hf_to_zoo`, in its model file) gives zoo's, and `hf_tensor_to_zoo` its layout (LLaMA's q/k rows
permuted back to Meta's rotary pairs, GPT-NeoX's fused query_key_value cut into wq, wk, wv).
gpt-neox's and metaseq's own formats come here too (`zoo_tensors`), once under HF's names.
"""
from functools import partial
from pathlib import Path, PurePath

from zoo.checks import FLAG, FRACTION, LAYERS, MAPPING, POSITIVE, SIZE, TEXT, key, read_json, shown
from zoo.formats.files import CheckpointError, StoredTensor, open_tensors
from zoo.formats.lazy import Checkpoint, Mapped
from zoo.models import FAMILIES, gpt_neox, llama, opt
from zoo.tokenizer import load_tokenizer

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def llama_config(cfg: dict) -> llama.LlamaConfig:
    """From a LLaMA config.json (rope settings in the v4 or the v5 `rope_parameters` layout)."""
    if key(cfg, "hidden_act", TEXT, default="silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported by LLaMA (silu only)")
    rope = dict(key(cfg, "rope_parameters", MAPPING, None, nullable=True) or
                key(cfg, "rope_scaling", MAPPING, None, nullable=True) or {})
    theta = key(rope, "rope_theta", POSITIVE, default=None) or key(cfg, "rope_theta", POSITIVE, default=10000.0)
    rope.pop("rope_theta", None)
    if "type" in rope:  # legacy name of rope_type
        rope.setdefault("rope_type", rope.pop("type"))
    return llama.LlamaConfig(
        dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
        n_heads=key(cfg, "num_attention_heads", SIZE),
        n_kv_heads=key(cfg, "num_key_value_heads", SIZE, None, nullable=True),
        vocab_size=key(cfg, "vocab_size", SIZE), hidden_dim=key(cfg, "intermediate_size", SIZE),
        head_dim=key(cfg, "head_dim", SIZE, None, nullable=True), norm_eps=key(cfg, "rms_norm_eps", POSITIVE, 1e-6),
        rope_theta=float(theta), rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
        max_seq_len=key(cfg, "max_position_embeddings", SIZE, default=2048),
        tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=False),
        attention_bias=key(cfg, "attention_bias", FLAG, default=False),
        mlp_bias=key(cfg, "mlp_bias", FLAG, default=False),
    )


def opt_config(cfg: dict) -> opt.OPTConfig:
    pre_norm = key(cfg, "do_layer_norm_before", FLAG, default=True)
    return opt.OPTConfig(dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
                         n_heads=key(cfg, "num_attention_heads", SIZE), hidden_dim=key(cfg, "ffn_dim", SIZE),
                         vocab_size=key(cfg, "vocab_size", SIZE),
                         max_seq_len=key(cfg, "max_position_embeddings", SIZE, default=2048),
                         embed_dim=key(cfg, "word_embed_proj_dim", SIZE, None, nullable=True),
                         pre_norm=pre_norm,
                         final_norm=pre_norm and not key(cfg, "_remove_final_layer_norm", FLAG, False),
                         norm_affine=key(cfg, "layer_norm_elementwise_affine", FLAG, default=True),
                         bias=key(cfg, "enable_bias", FLAG, default=True),
                         activation=key(cfg, "activation_function", TEXT, default="relu"),
                         tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=True))


def gpt_neox_config(cfg: dict) -> gpt_neox.GPTNeoXConfig:
    """From config.json: rotary settings as `rotary_pct`/`rotary_emb_base` or transformers 5's `rope_parameters`."""
    rope = key(cfg, "rope_parameters", MAPPING, None, nullable=True) or \
        key(cfg, "rope_scaling", MAPPING, None, nullable=True) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope['rope_type']!r} is not supported for GPT-NeoX")
    return gpt_neox.GPTNeoXConfig(
        dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
        n_heads=key(cfg, "num_attention_heads", SIZE), hidden_dim=key(cfg, "intermediate_size", SIZE),
        vocab_size=key(cfg, "vocab_size", SIZE), max_seq_len=key(cfg, "max_position_embeddings", SIZE, default=2048),
        rotary_pct=key(rope, "partial_rotary_factor", FRACTION, None) or key(cfg, "rotary_pct", FRACTION, 0.25),
        rope_theta=float(key(rope, "rope_theta", POSITIVE, None) or key(cfg, "rotary_emb_base", POSITIVE, 10000.0)),
        norm_eps=key(cfg, "layer_norm_eps", POSITIVE, default=1e-5),
        parallel_residual=key(cfg, "use_parallel_residual", FLAG, default=True),
        bias=key(cfg, "attention_bias", FLAG, default=True), activation=key(cfg, "hidden_act", TEXT, default="gelu"),
        tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=False))


CONFIGS = {"llama": llama_config, "opt": opt_config, "gpt_neox": gpt_neox_config}  # model_type -> its reader


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
        return CONFIGS[family](config)
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
    return Checkpoint(family, cfg, path, zoo_tensors(family, cfg, stored_tensors(directory)), tokenizer,
                      FAMILIES[family].zoo_to_hf)


def zoo_tensors(family: str, cfg, tensors: dict) -> dict:
    """Lazy tensors under Hugging Face's names -> under zoo's, in zoo's layout (a fused tensor gives several)."""
    names, layout = FAMILIES[family].hf_to_zoo, FAMILIES[family].hf_tensor_to_zoo
    out = {}
    for hf_key, t in tensors.items():
        for name in names(hf_key):  # one name, none (a key to skip), or several (a fused tensor)
            out[name] = Mapped(t, partial(layout, name, cfg=cfg), name)
    return out


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
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

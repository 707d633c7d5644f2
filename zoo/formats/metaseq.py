"""metaseq's own OPT checkpoints, as its training saved them.

`restored.pt` (one file) or `reshard-model_part-{rank}.pt` (one per model-parallel rank), the
tensors under ["model"] with Hugging Face's names less the "model." prefix, except:
  decoder.project_in_dim / project_out_dim / layer_norm -> decoder.project_in / project_out / final_layer_norm
  decoder.layers.{i}.self_attn.qkv_proj (fused)         -> k_proj, v_proj, q_proj: the thirds of each rank's rows
  decoder.version, decoder.output_projection.weight     -> dropped (the output is tied to embed_tokens)
The ranks' copies merge by Megatron's rules (`metaseq_merge`). The config is a config.json beside
the files if there is one, else the sizes from the tensors' shapes and the options from the
checkpoint's stored cfg (`metaseq_config`).
"""
import re
from pathlib import Path

import torch

from zoo.checks import COUNT, TEXT, key, read_json
from zoo.formats.files import CheckpointError, load_training_checkpoint, plain, stored_tensors
from zoo.formats.hf import has_weights, zoo_tensors
from zoo.formats.lazy import Checkpoint, Chunk, gathered, merged, ranks
from zoo.models import opt
from zoo.models.opt import POSITION_OFFSET, OPTConfig
from zoo.tokenizer import load_tokenizer

PARTS = re.compile(r"reshard-model_part-(\d+)\.pt")  # one file per rank; or one restored.pt
RENAMES = {"decoder.project_in_dim.": "decoder.project_in.", "decoder.project_out_dim.": "decoder.project_out.",
           "decoder.layer_norm.": "decoder.final_layer_norm."}
DROPPED = re.compile(r"(.*\.)?version|decoder\.output_projection\.weight|.*\._float_tensor")
QKV = ("k_proj", "v_proj", "q_proj")  # the order of the fused qkv_proj's thirds
COLUMN_PARALLEL = re.compile(r"decoder\.embed_tokens\.weight|.*\.self_attn\.(q|k|v|qkv)_proj\..*|.*\.fc1\..*")
ROW_PARALLEL = re.compile(r".*\.(self_attn\.out_proj|fc2)\.weight")


def metaseq_to_hf(key: str) -> list[str]:
    """The Hugging Face key(s) of a metaseq tensor: none (dropped), one, or three (the fused qkv_proj)."""
    if DROPPED.fullmatch(key):
        return []
    for old, new in RENAMES.items():
        if key.startswith(old):
            key = new + key.removeprefix(old)
    if ".self_attn.qkv_proj." in key:
        return [key.replace(".qkv_proj.", f".{proj}.") for proj in QKV]
    return [key]


def metaseq_merge(key: str) -> str:
    """How the model-parallel parts of a metaseq tensor make the whole one (Megatron's rules):
    "dim0" column-parallel and the vocab-parallel embedding, "dim1" row-parallel weights, "one"
    replicated (norms, positions, and the row-parallel biases, added once after the all-reduce)."""
    return "dim0" if COLUMN_PARALLEL.fullmatch(key) else "dim1" if ROW_PARALLEL.fullmatch(key) \
        else "one"


def detect(directory: Path) -> bool:
    """A metaseq checkpoint; never a Hugging Face one beside which training left such files."""
    return not has_weights(directory) and ((directory / "restored.pt").exists()
                                           or any(PARTS.fullmatch(p.name) for p in directory.iterdir()))


def config(directory: Path):
    """(family, config, config file): the sizes may come from the tensors' shapes, so the files are opened (mmap'd)."""
    found = open(directory)
    return found.family, found.config, found.config_file


def open(directory: Path) -> Checkpoint:
    parts = {int(m.group(1)): p for p in directory.iterdir() if (m := PARTS.fullmatch(p.name))}
    files = ranks(parts, "reshard-model_part file", directory) if parts else [directory / "restored.pt"]
    states = [load_training_checkpoint(f) for f in files]
    copies = []
    for f, state in zip(files, states):
        if not isinstance(state, dict):
            raise CheckpointError(f"{f}: expected a dict, found {type(state).__name__}")
        model = state.get("model", state)
        if not isinstance(model, dict):
            raise CheckpointError(f"{f}: expected the model's tensors under 'model', found {type(model).__name__}")
        if any(".flat_param" in k for k in model):
            raise CheckpointError(f"{f}: FSDP-flattened parameters (flat_param_*); consolidate the shards with "
                                  f"metaseq's reshard script first")
        copies.append(stored_tensors(f, {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}))
    tensors = {}
    for name, stored in gathered(copies, files, "").items():
        hf_keys = metaseq_to_hf(name)
        for i, hf_key in enumerate(hf_keys):  # a fused qkv_proj: the i-th third of each rank's rows
            parts = [Chunk(p, 0, i, 3) for p in stored] if len(hf_keys) == 3 else stored
            tensors[hf_key] = merged(parts, metaseq_merge(name))
    config_file = directory / "config.json"
    given = read_json(config_file) if config_file.exists() else None
    try:
        if given is not None:
            cfg = opt.from_hf_config(given)
        else:
            config_file = files[0]
            stored_cfg = plain(states[0].get("cfg"))
            model_cfg = stored_cfg.get("model") if isinstance(stored_cfg, dict) else None
            cfg = metaseq_config(model_cfg or plain(states[0].get("args")) or {},
                                 {k: t.shape for k, t in tensors.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {type(e).__name__}: {e}") from None
    names = {hf: name for name in copies[0] for hf in metaseq_to_hf(name)}
    return Checkpoint("opt", cfg, config_file, zoo_tensors("opt", cfg, tensors), load_tokenizer(directory),
                      lambda name: names.get(opt.zoo_to_hf(name).removeprefix("model."),
                                             _metaseq_name(opt.zoo_to_hf(name))))


def _metaseq_name(hf_key: str) -> str:
    key = hf_key.removeprefix("model.")
    for old, new in RENAMES.items():
        if key.startswith(new):
            return old + key.removeprefix(new)
    return key


def metaseq_config(cfg: dict, shapes: dict[str, tuple]) -> OPTConfig:
    """From a metaseq checkpoint: sizes from the (Hugging Face-named) tensors' shapes, the number of
    heads and the options from its stored `cfg["model"]` (or fairseq's `args`). An option it does
    not state is taken as OPT's; one stating what OPT never used (scaled or normalized embeddings,
    sinusoidal positions) is refused, as is a post-LN model with a final norm (HF cannot say it)."""
    if "decoder_attention_heads" not in cfg:
        raise ValueError("the number of attention heads is not stated (no decoder_attention_heads in the "
                         "checkpoint's cfg or args); put the model's Hugging Face config.json beside it")
    unresolved = [k for k, v in cfg.items() if isinstance(v, str) and v.startswith("${")]
    if unresolved:  # an omegaconf interpolation, resolved only by omegaconf itself
        raise ValueError(f"{', '.join(unresolved)}: unresolved omegaconf interpolation(s); put the model's Hugging "
                         f"Face config.json beside the checkpoint")
    for tensor in ("decoder.embed_tokens.weight", "decoder.embed_positions.weight", "decoder.layers.0.fc1.weight"):
        if tensor not in shapes:
            raise ValueError(f"missing tensor {tensor!r} (metaseq names)")
    for option, opt_value in (("no_scale_embedding", True), ("layernorm_embedding", False),
                              ("decoder_learned_pos", True), ("share_decoder_input_output_embed", True)):
        if cfg.get(option, opt_value) != opt_value:
            raise ValueError(f"{option}={cfg[option]!r} is not supported (OPT has {option}={opt_value!r})")
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("decoder.layers.")}
    vocab_size, embed_dim = shapes["decoder.embed_tokens.weight"]
    positions, dim = shapes["decoder.embed_positions.weight"]
    final_norm = "decoder.final_layer_norm.weight" in shapes
    pre_norm = cfg.get("decoder_normalize_before", final_norm)
    if final_norm and not pre_norm:
        raise ValueError("a post-LN model (decoder_normalize_before False) with a final layer norm is not "
                         "supported")
    return OPTConfig(dim=dim, n_layers=len(layers), n_heads=key(cfg, "decoder_attention_heads", COUNT),
               hidden_dim=shapes["decoder.layers.0.fc1.weight"][0], vocab_size=vocab_size,
               max_seq_len=positions - POSITION_OFFSET, embed_dim=embed_dim, pre_norm=pre_norm,
               final_norm=final_norm, norm_affine="decoder.layers.0.self_attn_layer_norm.weight" in shapes,
               bias="decoder.layers.0.fc1.bias" in shapes, activation=key(cfg, "activation_fn", TEXT, "relu"))

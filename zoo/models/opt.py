"""OPT (Meta's Open Pre-trained Transformers, 125M ... 66B), read top to bottom.

    tokens ─ embed ─ [project_in] ─ + pos_embed(position + 2) ─ block 0 ... block n-1 ─ [norm] ─ [project_out] ─ output

    pre-LN block (most sizes):            post-LN block (opt-350m, do_layer_norm_before=False):
        h = x + attn(attn_norm(x))            h = attn_norm(x + attn(x))
        out = h + mlp(mlp_norm(h))            out = mlp_norm(h + mlp(h))

Learned positions with an offset of 2 (rows 0 and 1 of the table are never used by real tokens);
positions count real tokens only, so left padding does not shift them. ReLU MLP, biases everywhere,
output tied to the embedding. `word_embed_proj_dim` < hidden (opt-350m) adds project_in/out.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.attention import Attention, KVCache, check_heads_split, checked_inputs, positions_and_mask
from zoo.checks import COUNT, FLAG, TEXT, key
from zoo.hooks import hook_points, resolve
from zoo.mlp import MLP
from zoo.parallel import check_split, column_parallel_linear, parallel_embedding, world_size

POSITION_OFFSET = 2
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    vocab_size: int = 50272
    max_seq_len: int = 2048  # the longest sequence it will be asked to hold: at most `positions`
    embed_dim: int | None = None  # word_embed_proj_dim; None: same as dim
    pre_norm: bool = True  # do_layer_norm_before
    final_norm: bool = True  # False when _remove_final_layer_norm (or post-LN)
    norm_affine: bool = True  # layer_norm_elementwise_affine
    bias: bool = True  # enable_bias
    activation: str = "relu"
    tie_embeddings: bool = True
    positions: int | None = None  # learned positions (max_position_embeddings); None: max_seq_len

    def __post_init__(self):
        self.positions = self.positions or self.max_seq_len
        self.embed_dim = self.embed_dim or self.dim
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) is not a multiple of n_heads ({self.n_heads})")
        self.head_dim = self.dim // self.n_heads
        self.n_kv_heads = self.n_heads
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation!r} is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, cfg: dict) -> "OPTConfig":
        pre_norm = key(cfg, "do_layer_norm_before", FLAG, default=True)
        return cls(dim=key(cfg, "hidden_size", COUNT), n_layers=key(cfg, "num_hidden_layers", COUNT),
                   n_heads=key(cfg, "num_attention_heads", COUNT), hidden_dim=key(cfg, "ffn_dim", COUNT),
                   vocab_size=key(cfg, "vocab_size", COUNT),
                   max_seq_len=key(cfg, "max_position_embeddings", COUNT, default=2048),
                   embed_dim=key(cfg, "word_embed_proj_dim", COUNT, None, nullable=True),
                   pre_norm=pre_norm, final_norm=pre_norm and not key(cfg, "_remove_final_layer_norm", FLAG, False),
                   norm_affine=key(cfg, "layer_norm_elementwise_affine", FLAG, default=True),
                   bias=key(cfg, "enable_bias", FLAG, default=True),
                   activation=key(cfg, "activation_function", TEXT, default="relu"),
                   tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=True))

    @classmethod
    def from_metaseq(cls, cfg: dict, shapes: dict[str, tuple]) -> "OPTConfig":
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
        return cls(dim=dim, n_layers=len(layers), n_heads=key(cfg, "decoder_attention_heads", COUNT),
                   hidden_dim=shapes["decoder.layers.0.fc1.weight"][0], vocab_size=vocab_size,
                   max_seq_len=positions - POSITION_OFFSET, embed_dim=embed_dim, pre_norm=pre_norm,
                   final_norm=final_norm, norm_affine="decoder.layers.0.self_attn_layer_norm.weight" in shapes,
                   bias="decoder.layers.0.fc1.bias" in shapes, activation=key(cfg, "activation_fn", TEXT, "relu"))


class Block(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn_norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, bias=cfg.bias, rotary=None)
        self.mlp_norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], bias=cfg.bias)

    def forward(self, x, mask, cache, layer, hooks=None):
        if hooks:  # every `if hooks:` line is a hook point (zoo/hooks.py); without hooks they cost nothing
            x = hooks(layer, "resid_pre", x)
        a = self.attn_norm(x) if self.pre_norm else x
        if hooks:
            a = hooks(layer, "attn_in", a)
        a = self.attn(a, None, mask, cache, layer, hooks)
        if hooks:
            a = hooks(layer, "attn_out", a)
        h = x + a if self.pre_norm else self.attn_norm(x + a)
        if hooks:
            h = hooks(layer, "resid_mid", h)
        m = self.mlp_norm(h) if self.pre_norm else h
        if hooks:
            m = hooks(layer, "mlp_in", m)
        m = self.mlp(m, hooks, layer)
        if hooks:
            m = hooks(layer, "mlp_out", m)
        out = h + m if self.pre_norm else self.mlp_norm(h + m)
        if hooks:
            out = hooks(layer, "resid_post", out)
        return out


class OPT(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.config = cfg
        check_heads_split(cfg.n_heads, cfg.n_heads)  # the splits, before any layer is built
        check_split({"the embedding's embed_dim": cfg.embed_dim, "the MLP's hidden_dim": cfg.hidden_dim,
                     "the output layer's vocab_size": cfg.vocab_size})
        self.embed = parallel_embedding(cfg.vocab_size, cfg.embed_dim)
        self.project_in = nn.Linear(cfg.embed_dim, cfg.dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.pos_embed = nn.Embedding(cfg.positions + POSITION_OFFSET, cfg.dim)  # all it learned
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine) if cfg.final_norm else None
        self.project_out = nn.Linear(cfg.dim, cfg.embed_dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.output = column_parallel_linear(cfg.embed_dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings and world_size() == 1:  # split differently under TP: loaded twice instead
            self.output.weight = self.embed.weight
        self.tokenizer = None  # set by zoo.load

    def new_cache(self, batch: int, max_len: int, left_pad: torch.Tensor | None = None, static: bool = False) -> KVCache:
        return KVCache.for_model(self, batch, max_len, left_pad, static)

    def hook_points(self, tokens: torch.Tensor | None = None) -> dict[str, tuple]:
        return hook_points(self, tokens)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, hooks=None,
                left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) fp32; see Llama.forward."""
        left_pad = checked_inputs(tokens, cache, left_pad, self.config, self.embed.weight.device)
        hooks = resolve(hooks, self, cache, left_pad)  # None when there are none
        positions, mask = positions_and_mask(tokens, cache, left_pad)  # (batch or 1, seq)
        h = self.embed(tokens)  # (batch, seq, embed_dim)
        if self.project_in is not None:
            h = self.project_in(h)  # (batch, seq, dim)
        h = h + self.pos_embed(positions + POSITION_OFFSET)
        if hooks:
            h = hooks(None, "embed", h)
        for i, block in enumerate(self.blocks):
            h = block(h, mask, cache, i, hooks)
        if last_only and not (hooks and hooks.wants_every_position()):  # hooked, they see every position
            h = h[:, -1:]
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)  # (batch, seq, embed_dim)
        if hooks:
            h = hooks(None, "ln_final", h)
        logits = self.output(h).float()  # (batch, seq, vocab)
        if hooks:
            logits = hooks(None, "logits", logits)
        if last_only:
            logits = logits[:, -1:]
        if cache is not None:
            cache.advance(tokens.shape[1])
        return logits


# ---- checkpoint names -------------------------------------------------------------------------
# Hugging Face OPTForCausalLM keys, with or without the "model." prefix (opt-350m has none):
#   model.decoder.embed_tokens / embed_positions / project_in / project_out / final_layer_norm
#   model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm
#   lm_head.weight (usually absent: tied to embed_tokens)
TOP_NAMES = {"embed_tokens": "embed", "embed_positions": "pos_embed", "project_in": "project_in",
             "project_out": "project_out", "final_layer_norm": "norm", "lm_head": "output"}
LAYER_NAMES = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
               "self_attn.out_proj": "attn.wo", "self_attn_layer_norm": "attn_norm", "fc1": "mlp.w_in",
               "fc2": "mlp.w_out", "final_layer_norm": "mlp_norm"}


def hf_to_zoo(key: str) -> list[str]:
    """Our name(s) for a key of a Hugging Face OPTForCausalLM checkpoint."""
    key = re.sub(r"^(model\.)?(decoder\.)?", "", key)
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if layer:
        i, module, param = layer.groups()
        return [f"blocks.{i}.{LAYER_NAMES.get(module, module)}.{param}"]
    module, _, param = key.rpartition(".")
    return [f"{TOP_NAMES.get(module, module)}.{param}"]


def zoo_to_hf(name: str) -> str:
    layer = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if layer:
        i, module, param = layer.groups()
        return f"model.decoder.layers.{i}.{_LAYER_KEYS.get(module, module)}.{param}"
    module, _, param = name.rpartition(".")
    key = _TOP_KEYS.get(module, module)
    return f"{key}.{param}" if key == "lm_head" else f"model.decoder.{key}.{param}"


_TOP_KEYS = {v: k for k, v in TOP_NAMES.items()}
_LAYER_KEYS = {v: k for k, v in LAYER_NAMES.items()}


def hf_tensor_to_zoo(name: str, t: torch.Tensor, cfg: OPTConfig) -> torch.Tensor:
    return t  # same layout


# ---- metaseq's own checkpoints, as its training saved them ------------------------------------------
# `restored.pt` (one file) or `reshard-model_part-{rank}.pt` (one per model-parallel rank), the
# tensors under ["model"] with Hugging Face's names less the "model." prefix, except:
#   decoder.project_in_dim / project_out_dim / layer_norm -> decoder.project_in / project_out / final_layer_norm
#   decoder.layers.{i}.self_attn.qkv_proj (fused)         -> k_proj, v_proj, q_proj: the thirds of each rank's rows
#   decoder.version, decoder.output_projection.weight     -> dropped (the output is tied to embed_tokens)
METASEQ_RENAMES = {"decoder.project_in_dim.": "decoder.project_in.", "decoder.project_out_dim.": "decoder.project_out.",
                   "decoder.layer_norm.": "decoder.final_layer_norm."}
METASEQ_DROPPED = re.compile(r"(.*\.)?version|decoder\.output_projection\.weight|.*\._float_tensor")
METASEQ_QKV = ("k_proj", "v_proj", "q_proj")  # the order of the fused qkv_proj's thirds
METASEQ_COLUMN_PARALLEL = re.compile(r"decoder\.embed_tokens\.weight|.*\.self_attn\.(q|k|v|qkv)_proj\..*|.*\.fc1\..*")
METASEQ_ROW_PARALLEL = re.compile(r".*\.(self_attn\.out_proj|fc2)\.weight")


def metaseq_to_hf(key: str) -> list[str]:
    """The Hugging Face key(s) of a metaseq tensor: none (dropped), one, or three (the fused qkv_proj)."""
    if METASEQ_DROPPED.fullmatch(key):
        return []
    for old, new in METASEQ_RENAMES.items():
        if key.startswith(old):
            key = new + key.removeprefix(old)
    if ".self_attn.qkv_proj." in key:
        return [key.replace(".qkv_proj.", f".{proj}.") for proj in METASEQ_QKV]
    return [key]


def metaseq_merge(key: str) -> str:
    """How the model-parallel parts of a metaseq tensor make the whole one (Megatron's rules):
    "dim0" column-parallel and the vocab-parallel embedding, "dim1" row-parallel weights, "one"
    replicated (norms, positions, and the row-parallel biases, added once after the all-reduce)."""
    return "dim0" if METASEQ_COLUMN_PARALLEL.fullmatch(key) else "dim1" if METASEQ_ROW_PARALLEL.fullmatch(key) \
        else "one"

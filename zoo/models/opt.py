"""OPT (Meta's Open Pre-trained Transformers, 125M ... 66B), read top to bottom.

    tokens ─ embed ─ [project_in] ─ + pos_embed(position + 2) ─ block 0 ... block n-1 ─ [norm] ─ [project_out] ─ output

    pre-LN block (most sizes):            post-LN block (opt-350m, do_layer_norm_before=False):
        h = x + attn(attn_norm(x))            h = attn_norm(x + attn(x))
        out = h + mlp(mlp_norm(h))            out = mlp_norm(h + mlp(h))

Learned positions with an offset of 2 (rows 0 and 1 of the table are never used by real tokens);
positions count real tokens only, so left padding does not shift them. ReLU MLP, biases everywhere,
output tied to the embedding. `word_embed_proj_dim` < hidden (opt-350m) adds project_in/out.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.attention import Attention
from zoo.cache import KVCache
from zoo.checks import FLAG, LAYERS, SIZE, TEXT, key
from zoo.forward import Decoder, begin
from zoo.mlp import MLP
from zoo.models import Family, SharedNames
from zoo.models.names import Names
from zoo.parallel import column_parallel_linear, parallel_embedding

POSITION_OFFSET = 2
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTConfig(SharedNames):
    normalization, positional, parallel_residual = "layer", "learned", False  # SharedNames

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


class Block(nn.Module):
    def __init__(self, cfg: OPTConfig, layer: int):
        super().__init__()
        self.layer, self.pre_norm = layer, cfg.pre_norm
        self.attn_norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, layer, bias=cfg.bias, rotary=None)
        self.mlp_norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], layer, bias=cfg.bias)

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim); hook points as in Llama's Block. Pre-LN normalizes each
        branch's input, post-LN each sum (the module docstring's diagram)."""
        hook, i, pre = step.hook, self.layer, self.pre_norm
        resid_pre = hook(i, "resid_pre", x)
        attn_in = hook(i, "attn_in", self.attn_norm(resid_pre) if pre else resid_pre)
        attn_out = hook(i, "attn_out", self.attn(attn_in, step))
        resid_mid = hook(i, "resid_mid", resid_pre + attn_out if pre else self.attn_norm(resid_pre + attn_out))
        mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_mid) if pre else resid_mid)
        mlp_out = hook(i, "mlp_out", self.mlp(mlp_in, step))
        return hook(i, "resid_post", resid_mid + mlp_out if pre else self.mlp_norm(resid_mid + mlp_out))


class OPT(Decoder):
    position_offset = POSITION_OFFSET  # the first row of pos_embed that a real position reads

    def __init__(self, cfg: OPTConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.embed = parallel_embedding(cfg.vocab_size, cfg.embed_dim, tied=cfg.tie_embeddings)
        self.project_in = nn.Linear(cfg.embed_dim, cfg.dim, bias=False) if cfg.embed_dim != cfg.dim else nn.Identity()
        self.pos_embed = nn.Embedding(cfg.positions + POSITION_OFFSET, cfg.dim)  # all it learned
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine) if cfg.final_norm else nn.Identity()
        self.project_out = nn.Linear(cfg.dim, cfg.embed_dim, bias=False) if cfg.embed_dim != cfg.dim else nn.Identity()
        self.output = column_parallel_linear(cfg.embed_dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings:  # one tensor; under TP both are split on the vocabulary
            self.output.weight = self.embed.weight
        self.tokenizer = tokenizer  # zoo.load passes the checkpoint's (zoo/tokenizer.py); None: ids only

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, hooks=None,
                left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) fp32; see Llama.forward."""
        step = begin(self, tokens, cache, hooks, left_pad, last_only)  # zoo/forward.py
        h = self.project_in(self.embed(tokens))  # (batch, seq, dim)
        h = step.hook(None, "embed", h + self.pos_embed(step.positions + POSITION_OFFSET))
        for block in self.blocks:
            h = block(h, step)
        return step.finish(h, self.final_norm, self.output)  # (batch, seq, vocab)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.norm(h))  # what the ln_final point sees (zoo/forward.py)


# ---- checkpoint names -------------------------------------------------------------------------
# Hugging Face OPTForCausalLM keys, with or without the "model." prefix (opt-350m has none):
#   model.decoder.embed_tokens / embed_positions / project_in / project_out / final_layer_norm
#   model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm
#   lm_head.weight (usually absent: tied to embed_tokens)
NAMES = Names(prefix="model.decoder.", layers="layers", unprefixed=("lm_head",),
              top={"embed_tokens": "embed", "embed_positions": "pos_embed", "project_in": "project_in",
                   "project_out": "project_out", "final_layer_norm": "norm", "lm_head": "output"},
              layer={"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
                     "self_attn.out_proj": "attn.wo", "self_attn_layer_norm": "attn_norm", "fc1": "mlp.w_in",
                     "fc2": "mlp.w_out", "final_layer_norm": "mlp_norm"})
hf_to_zoo, zoo_to_hf = NAMES.to_zoo, NAMES.to_hf


def hf_tensor_to_zoo(name: str, t: torch.Tensor, cfg: OPTConfig) -> torch.Tensor:
    return t  # same layout


def zoo_tensors_to_hf(key: str, tensors: list[torch.Tensor], cfg: OPTConfig) -> torch.Tensor:
    (t,) = tensors
    return t  # same layout


# ---- config.json, and the family's registration (zoo/models/__init__.py) ---------------------------

def from_hf_config(cfg: dict) -> OPTConfig:
    pre_norm = key(cfg, "do_layer_norm_before", FLAG, default=True)
    return OPTConfig(dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
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


def to_hf_config(cfg: OPTConfig) -> dict:
    """config.json's contents for `cfg`, the inverse of from_hf_config (max_position_embeddings: the learned
    positions, whatever max_seq_len a load asked for)."""
    if cfg.final_norm and not cfg.pre_norm:
        raise ValueError("a post-LN OPT (pre_norm False) with a final norm has no Hugging Face config")
    return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "ffn_dim": cfg.hidden_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.positions,
            "word_embed_proj_dim": cfg.embed_dim,
            "do_layer_norm_before": cfg.pre_norm, "_remove_final_layer_norm": cfg.pre_norm and not cfg.final_norm,
            "layer_norm_elementwise_affine": cfg.norm_affine, "enable_bias": cfg.bias,
            "activation_function": cfg.activation, "tie_word_embeddings": cfg.tie_embeddings}


FAMILY = Family("opt", OPTConfig, from_hf_config, OPT, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo, to_hf_config,
                zoo_tensors_to_hf)

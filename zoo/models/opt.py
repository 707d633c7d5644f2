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

from zoo.attention import Attention, KVCache, checked_inputs, positions_and_mask
from zoo.hooks import hook_points, resolve
from zoo.mlp import MLP
from zoo.parallel import column_parallel_linear, parallel_embedding

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


class Block(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn_norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, bias=cfg.bias, rotary=None)
        self.mlp_norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], bias=cfg.bias)

    def forward(self, resid_pre, mask, cache, layer, hooks=None):
        """(batch, seq, dim) -> (batch, seq, dim); hook points as in Llama's Block."""
        if hooks:
            resid_pre = hooks(layer, "resid_pre", resid_pre)
        attn_in = self.attn_norm(resid_pre) if self.pre_norm else resid_pre
        if hooks:
            attn_in = hooks(layer, "attn_in", attn_in)
        attn_out = self.attn(attn_in, None, mask, cache, layer, hooks)
        if hooks:
            attn_out = hooks(layer, "attn_out", attn_out)
        resid_mid = resid_pre + attn_out if self.pre_norm else self.attn_norm(resid_pre + attn_out)
        if hooks:
            resid_mid = hooks(layer, "resid_mid", resid_mid)
        mlp_in = self.mlp_norm(resid_mid) if self.pre_norm else resid_mid
        if hooks:
            mlp_in = hooks(layer, "mlp_in", mlp_in)
        mlp_out = self.mlp(mlp_in, hooks, layer)
        if hooks:
            mlp_out = hooks(layer, "mlp_out", mlp_out)
        resid_post = resid_mid + mlp_out if self.pre_norm else self.mlp_norm(resid_mid + mlp_out)
        if hooks:
            resid_post = hooks(layer, "resid_post", resid_post)
        return resid_post


class OPT(nn.Module):
    def __init__(self, cfg: OPTConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.embed = parallel_embedding(cfg.vocab_size, cfg.embed_dim, tied=cfg.tie_embeddings)
        self.project_in = nn.Linear(cfg.embed_dim, cfg.dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.pos_embed = nn.Embedding(cfg.positions + POSITION_OFFSET, cfg.dim)  # all it learned
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine) if cfg.final_norm else None
        self.project_out = nn.Linear(cfg.dim, cfg.embed_dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.output = column_parallel_linear(cfg.embed_dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings:  # one tensor; under TP both are split on the vocabulary
            self.output.weight = self.embed.weight
        self.tokenizer = tokenizer  # zoo.load passes the checkpoint's (zoo/tokenizer.py); None: ids only

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

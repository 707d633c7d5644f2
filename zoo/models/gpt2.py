"""GPT-2 (OpenAI, 124M ... 1.5B), read top to bottom.

    tokens ─ embed + pos_embed(position) ─ block 0 ... block n-1 ─ norm ─ output (tied to embed)

    pre-LN block:
        h = x + attn(attn_norm(x))
        out = h + mlp(mlp_norm(h))

Learned positions from 0, counting real tokens only (left padding does not shift them); LayerNorm with
biases; tanh-approximated GELU ("gelu_new") MLP; biases everywhere; scores scaled by 1/sqrt(head_dim)
(`scale_attn_weights`), and further by 1/(layer + 1) with `scale_attn_by_inverse_layer_idx`.
The checkpoint's linear layers are Conv1D, their weights stored transposed ([in, out]), and it fuses q, k
and v into one `c_attn` (columns: all of q, then k, then v); they are transposed and cut when loading.
"""
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from zoo.attention import Attention
from zoo.cache import KVCache
from zoo.checks import FLAG, LAYERS, POSITIVE, SIZE, TEXT, key
from zoo.forward import Decoder, begin
from zoo.mlp import MLP
from zoo.models import Family, SharedNames
from zoo.models.names import Names
from zoo.parallel import column_parallel_linear, parallel_embedding

ACTIVATIONS = {"gelu_new": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


@dataclass
class GPT2Config(SharedNames):
    normalization, positional, parallel_residual = "layer", "learned", False  # SharedNames

    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072  # n_inner; null in config.json: 4 * n_embd
    vocab_size: int = 50257
    max_seq_len: int = 1024  # the longest sequence it will be asked to hold: at most `positions`
    positions: int | None = None  # learned positions (n_positions); None: max_seq_len
    norm_eps: float = 1e-5  # layer_norm_epsilon
    activation: str = "gelu_new"
    scale_attn: bool = True  # scale_attn_weights: scores / sqrt(head_dim), else unscaled
    scale_by_layer: bool = False  # scale_attn_by_inverse_layer_idx: scores also / (layer + 1)
    tie_embeddings: bool = True

    def __post_init__(self):
        self.positions = self.positions or self.max_seq_len
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) is not a multiple of n_heads ({self.n_heads})")
        self.head_dim = self.dim // self.n_heads
        self.n_kv_heads = self.n_heads
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation!r} is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}")

    def attention_scale(self, layer: int) -> float | None:
        """The scores' factor in block `layer` (None: attention's own, 1/sqrt(head_dim))."""
        if self.scale_attn and not self.scale_by_layer:
            return None
        return (self.head_dim ** -0.5 if self.scale_attn else 1.0) / (layer + 1 if self.scale_by_layer else 1)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, layer, bias=True, rotary=None,
                              scale=cfg.attention_scale(layer))
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], layer, bias=True)

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim); hook points as in Llama's Block."""
        hook, i = step.hook, self.layer
        resid_pre = hook(i, "resid_pre", x)
        attn_in = hook(i, "attn_in", self.attn_norm(resid_pre))
        attn_out = hook(i, "attn_out", self.attn(attn_in, step))
        resid_mid = hook(i, "resid_mid", resid_pre + attn_out)
        mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_mid))
        mlp_out = hook(i, "mlp_out", self.mlp(mlp_in, step))
        return hook(i, "resid_post", resid_mid + mlp_out)


class GPT2(Decoder):
    position_offset = 0  # the first row of pos_embed that a real position reads (zoo.weights' W_pos)

    def __init__(self, cfg: GPT2Config, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.embed = parallel_embedding(cfg.vocab_size, cfg.dim, tied=cfg.tie_embeddings)
        self.pos_embed = nn.Embedding(cfg.positions, cfg.dim)  # all it learned
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = column_parallel_linear(cfg.dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings:  # one tensor; under TP both are split on the vocabulary
            self.output.weight = self.embed.weight
        self.tokenizer = tokenizer  # zoo.load passes the checkpoint's (zoo/tokenizer.py); None: ids only

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, hooks=None,
                left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) fp32; see Llama.forward."""
        step = begin(self, tokens, cache, hooks, left_pad, last_only)  # zoo/forward.py
        h = step.hook(None, "embed", self.embed(tokens) + self.pos_embed(step.positions))  # (batch, seq, dim)
        for block in self.blocks:
            h = block(h, step)
        return step.finish(h, self.norm, self.output)  # (batch, seq, vocab)


# ---- checkpoint names -------------------------------------------------------------------------
# Hugging Face GPT2LMHeadModel keys, with or without the "transformer." prefix (the hub's gpt2 has none):
#   transformer.wte / wpe / ln_f                            -> embed / pos_embed / norm
#   transformer.h.{i}.ln_1 / ln_2                           -> blocks.{i}.attn_norm / mlp_norm
#   transformer.h.{i}.attn.c_attn (fused, Conv1D)           -> blocks.{i}.attn.wq, wk, wv
#   transformer.h.{i}.attn.c_proj, mlp.c_fc, mlp.c_proj     -> blocks.{i}.attn.wo, mlp.w_in, mlp.w_out
#   lm_head.weight (usually absent: tied to wte)            -> output
# Older files also hold the causal-mask buffers h.{i}.attn.bias and h.{i}.attn.masked_bias: skipped.
QKV = ("wq", "wk", "wv")
NAMES = Names(prefix="transformer.", layers="h", unprefixed=("lm_head",),
              top={"wte": "embed", "wpe": "pos_embed", "ln_f": "norm", "lm_head": "output"},
              layer={"ln_1": "attn_norm", "attn.c_proj": "attn.wo", "ln_2": "mlp_norm", "mlp.c_fc": "mlp.w_in",
                     "mlp.c_proj": "mlp.w_out"},
              fused={"attn.c_attn": tuple(f"attn.{w}" for w in QKV)},
              ignored=r"^h\.\d+\.attn\.(bias|masked_bias)$")
hf_to_zoo, zoo_to_hf = NAMES.to_zoo, NAMES.to_hf
CONV1D = re.compile(r"blocks\.\d+\.(attn|mlp)\.\w+\.weight")  # zoo's names of the weights stored [in, out]


def hf_tensor_to_zoo(name: str, t: torch.Tensor, cfg: GPT2Config) -> torch.Tensor:
    """The whole tensor (FAMILY's whole_tensors) in zoo's layout: wq, wk or wv cut out of c_attn's columns
    (weight [dim, 3 dim], bias [3 dim]: all of q, then k, then v), and a Conv1D weight [in, out] transposed."""
    part = re.search(r"attn\.(wq|wk|wv)\.", name)
    if part:
        t = t.chunk(3, dim=-1)[QKV.index(part[1])]
    if CONV1D.fullmatch(name):
        return t.T.contiguous()
    return t.clone() if part else t  # a third of c_attn's bias, not a view of all of it


def zoo_tensors_to_hf(key: str, tensors: list[torch.Tensor], cfg: GPT2Config) -> torch.Tensor:
    """The Hugging Face tensor `key` from zoo's tensors of the names hf_to_zoo(key), the inverse of
    hf_tensor_to_zoo: Conv1D weights transposed back, c_attn's parts side by side."""
    if re.search(r"\.(attn|mlp)\.c_\w+\.weight$", key):
        tensors = [t.T for t in tensors]
    return torch.cat(tensors, dim=-1) if len(tensors) > 1 else tensors[0]


# ---- config.json, and the family's registration (zoo/models/__init__.py) ---------------------------

def from_hf_config(cfg: dict) -> GPT2Config:
    """From config.json (GPT2Config's own key names). What zoo does not run is refused: cross attention."""
    if key(cfg, "add_cross_attention", FLAG, default=False):
        raise ValueError("add_cross_attention true (cross attention over an encoder's states) is not supported")
    # reorder_and_upcast_attn only computes the scores in fp32, which zoo's attention does anyway: accepted
    key(cfg, "reorder_and_upcast_attn", FLAG, default=False)
    dim = key(cfg, "n_embd", SIZE, default=768)
    positions = key(cfg, "n_positions", SIZE, default=1024)
    return GPT2Config(dim=dim, n_layers=key(cfg, "n_layer", LAYERS, default=12),
                      n_heads=key(cfg, "n_head", SIZE, default=12),
                      hidden_dim=key(cfg, "n_inner", SIZE, 4 * dim, nullable=True),
                      vocab_size=key(cfg, "vocab_size", SIZE, default=50257), max_seq_len=positions,
                      positions=positions, norm_eps=key(cfg, "layer_norm_epsilon", POSITIVE, default=1e-5),
                      activation=key(cfg, "activation_function", TEXT, default="gelu_new"),
                      scale_attn=key(cfg, "scale_attn_weights", FLAG, default=True),
                      scale_by_layer=key(cfg, "scale_attn_by_inverse_layer_idx", FLAG, default=False),
                      tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=True))


def to_hf_config(cfg: GPT2Config) -> dict:
    """config.json's contents for `cfg`, the inverse of from_hf_config (n_positions: the learned positions,
    whatever max_seq_len a load asked for)."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.dim, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.hidden_dim, "vocab_size": cfg.vocab_size,
            "n_positions": cfg.positions, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation, "scale_attn_weights": cfg.scale_attn,
            "scale_attn_by_inverse_layer_idx": cfg.scale_by_layer, "tie_word_embeddings": cfg.tie_embeddings}


FAMILY = Family("gpt2", GPT2Config, from_hf_config, GPT2, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo, to_hf_config,
                zoo_tensors_to_hf, whole_tensors=True)

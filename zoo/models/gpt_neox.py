"""GPT-NeoX and the Pythia suite (EleutherAI), read top to bottom.

    tokens ─ embed ─ block 0 ... block n-1 ─ norm ─ output (untied in Pythia and NeoX-20B)

    parallel residual (Pythia, NeoX-20B):        sequential residual (use_parallel_residual=False):
        out = x + attn(attn_norm(x))                 h = x + attn(attn_norm(x))
                + mlp(mlp_norm(x))                   out = h + mlp(mlp_norm(h))

Rotary embeddings on the first `rotary_pct` of each head's dims only, half-split pairing
(i, i + rotary_dim/2), base `rotary_emb_base`; LayerNorm with biases; GELU (exact erf) MLP.
The checkpoint fuses q, k and v into one `query_key_value` weight, interleaved per head
(rows: head 0's q, k, v, then head 1's ...); it is split into wq/wk/wv when loading.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.attention import Attention
from zoo.cache import KVCache
from zoo.checks import FLAG, FRACTION, LAYERS, MAPPING, POSITIVE, SIZE, TEXT, key
from zoo.forward import Decoder, begin
from zoo.mlp import MLP
from zoo.models import Family, SharedNames
from zoo.models.names import Names
from zoo.parallel import column_parallel_linear, parallel_embedding
from zoo.rotary import inv_frequencies

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_fast": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class GPTNeoXConfig(SharedNames):
    normalization, positional = "layer", "rotary"  # SharedNames

    dim: int = 6144
    n_layers: int = 44
    n_heads: int = 64
    hidden_dim: int = 24576
    vocab_size: int = 50432
    max_seq_len: int = 2048
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0  # rotary_emb_base
    norm_eps: float = 1e-5
    parallel_residual: bool = True
    bias: bool = True  # attention_bias
    activation: str = "gelu"
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) is not a multiple of n_heads ({self.n_heads})")
        self.head_dim = self.dim // self.n_heads
        self.n_kv_heads = self.n_heads
        self.rotary_dim = int(self.head_dim * self.rotary_pct)
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dims ({self.rotary_dim} = {self.rotary_pct} of head_dim {self.head_dim}) are odd: "
                             f"rotary embeddings rotate pairs of dims")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")


class Block(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig, layer: int):
        super().__init__()
        self.layer, self.parallel_residual = layer, cfg.parallel_residual
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, layer, bias=cfg.bias, rotary="half")
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], layer, bias=True)

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim); hook points as in Llama's Block."""
        hook, i = step.hook, self.layer
        resid_pre = hook(i, "resid_pre", x)
        attn_in = hook(i, "attn_in", self.attn_norm(resid_pre))
        attn_out = hook(i, "attn_out", self.attn(attn_in, step))
        # parallel:   resid_pre ─┬─ attn_norm ─ attn ─────────────────────────┐
        #                        └─ mlp_norm ── mlp ──────────────────────── (+) ─ resid_post  (no resid_mid)
        # sequential: resid_pre ── attn_norm ─ attn ─ (+) ─ resid_mid ─ mlp_norm ─ mlp ─ (+) ─ resid_post
        if self.parallel_residual:
            mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_pre))
            mlp_out = hook(i, "mlp_out", self.mlp(mlp_in, step))
            return hook(i, "resid_post", resid_pre + attn_out + mlp_out)
        resid_mid = hook(i, "resid_mid", resid_pre + attn_out)
        mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_mid))
        mlp_out = hook(i, "mlp_out", self.mlp(mlp_in, step))
        return hook(i, "resid_post", resid_mid + mlp_out)


class GPTNeoX(Decoder):
    def __init__(self, cfg: GPTNeoXConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.embed = parallel_embedding(cfg.vocab_size, cfg.dim, tied=cfg.tie_embeddings)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = column_parallel_linear(cfg.dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings:  # one tensor; under TP both are split on the vocabulary
            self.output.weight = self.embed.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg.rotary_dim, cfg.rope_theta), persistent=False)
        self.tokenizer = tokenizer  # zoo.load passes the checkpoint's (zoo/tokenizer.py); None: ids only

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, hooks=None,
                left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) fp32; see Llama.forward. The rotary angles
        cover the first rotary_dim dims of each head."""
        step = begin(self, tokens, cache, hooks, left_pad, last_only, self.inv_freq)  # zoo/forward.py
        h = step.hook(None, "embed", self.embed(tokens))  # (batch, seq, dim)
        for block in self.blocks:
            h = block(h, step)
        return step.finish(h, self.norm, self.output)  # (batch, seq, vocab)


# ---- checkpoint names -------------------------------------------------------------------------
# Hugging Face GPTNeoXForCausalLM keys:
#   gpt_neox.embed_in.weight                                    -> embed.weight
#   gpt_neox.layers.{i}.input_layernorm / post_attention_layernorm -> blocks.{i}.attn_norm / mlp_norm
#   gpt_neox.layers.{i}.attention.query_key_value (fused)       -> blocks.{i}.attn.wq, wk, wv
#   gpt_neox.layers.{i}.attention.dense                         -> blocks.{i}.attn.wo
#   gpt_neox.layers.{i}.mlp.dense_h_to_4h / dense_4h_to_h       -> blocks.{i}.mlp.w_in / w_out
#   gpt_neox.final_layer_norm, embed_out                        -> norm, output
# Older files also hold the buffers attention.bias, attention.masked_bias, rotary_emb.inv_freq: skipped.
NAMES = Names(prefix="gpt_neox.", layers="layers", unprefixed=("embed_out",),
              top={"embed_in": "embed", "final_layer_norm": "norm", "embed_out": "output"},
              layer={"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                     "attention.dense": "attn.wo", "mlp.dense_h_to_4h": "mlp.w_in", "mlp.dense_4h_to_h": "mlp.w_out"},
              fused={"attention.query_key_value": ("attn.wq", "attn.wk", "attn.wv")},
              ignored=r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
hf_to_zoo, zoo_to_hf = NAMES.to_zoo, NAMES.to_hf


def hf_tensor_to_zoo(name: str, t: torch.Tensor, cfg: GPTNeoXConfig) -> torch.Tensor:
    """Cut wq, wk or wv out of the fused query_key_value weight (or bias), or of a slice of whole heads of it.

    Its rows are (heads, 3, head_dim): for each head its q rows, then k rows, then v rows.
    """
    which = re.search(r"attn\.(wq|wk|wv)\.", name)
    if which is None:
        return t
    heads = t.shape[0] // (3 * cfg.head_dim)
    part = ("wq", "wk", "wv").index(which.group(1))
    return t.reshape(heads, 3, cfg.head_dim, *t.shape[1:])[:, part].reshape(heads * cfg.head_dim, *t.shape[1:])


def zoo_tensors_to_hf(key: str, tensors: list[torch.Tensor], cfg: GPTNeoXConfig) -> torch.Tensor:
    """The Hugging Face tensor `key` from zoo's tensors of the names hf_to_zoo(key): wq, wk and wv fused back
    into query_key_value, head by head (the inverse of hf_tensor_to_zoo); any other tensor as it is."""
    if len(tensors) == 1:
        return tensors[0]
    q = tensors[0]
    heads = q.shape[0] // cfg.head_dim
    fused = torch.stack([t.reshape(heads, cfg.head_dim, *t.shape[1:]) for t in tensors], dim=1)  # (heads, 3, hd, ...)
    return fused.reshape(3 * q.shape[0], *q.shape[1:])


# ---- config.json, and the family's registration (zoo/models/__init__.py) ---------------------------

def from_hf_config(cfg: dict) -> GPTNeoXConfig:
    """From config.json: rotary settings as `rotary_pct`/`rotary_emb_base` or transformers 5's `rope_parameters`."""
    rope = key(cfg, "rope_parameters", MAPPING, None, nullable=True) or \
        key(cfg, "rope_scaling", MAPPING, None, nullable=True) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope['rope_type']!r} is not supported for GPT-NeoX")
    return GPTNeoXConfig(
        dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
        n_heads=key(cfg, "num_attention_heads", SIZE), hidden_dim=key(cfg, "intermediate_size", SIZE),
        vocab_size=key(cfg, "vocab_size", SIZE), max_seq_len=key(cfg, "max_position_embeddings", SIZE, default=2048),
        rotary_pct=key(rope, "partial_rotary_factor", FRACTION, None) or key(cfg, "rotary_pct", FRACTION, 0.25),
        rope_theta=float(key(rope, "rope_theta", POSITIVE, None) or key(cfg, "rotary_emb_base", POSITIVE, 10000.0)),
        norm_eps=key(cfg, "layer_norm_eps", POSITIVE, default=1e-5),
        parallel_residual=key(cfg, "use_parallel_residual", FLAG, default=True),
        bias=key(cfg, "attention_bias", FLAG, default=True), activation=key(cfg, "hidden_act", TEXT, default="gelu"),
        tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=False))


def to_hf_config(cfg: GPTNeoXConfig) -> dict:
    """config.json's contents for `cfg`, the inverse of from_hf_config; the rotary settings as rotary_pct and
    rotary_emb_base, which transformers 4 and 5 both read."""
    return {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.hidden_dim, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rope_theta,
            "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.bias, "hidden_act": cfg.activation, "tie_word_embeddings": cfg.tie_embeddings}


FAMILY = Family("gpt_neox", GPTNeoXConfig, from_hf_config, GPTNeoX, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo,
                to_hf_config, zoo_tensors_to_hf)

"""Gemma and Gemma 2 (Google) in one file, read top to bottom: config, block, model, checkpoint names.

    tokens ─ embed * sqrt(dim) ─ block 0 ─ ... ─ block n-1 ─ norm ─ output (tied to embed) ─ logits

    Gemma block:    h = x + attn(attn_norm(x))                      RMSNorm scaled by (1 + w)
                    out = h + mlp(mlp_norm(h))                      GeGLU: w_out(gelu_tanh(w_gate h) * w_in h)
    Gemma 2 block:  h = x + attn_out_norm(attn(attn_norm(x)))       a norm before and after each part
                    out = h + mlp_out_norm(mlp(mlp_norm(h)))

Both: LLaMA's rotary attention with grouped-query heads and an explicit head_dim (256 in the published
models), the embeddings scaled by sqrt(dim) (the factor rounded to the model's dtype, as Hugging Face
does), the output tied to the embedding. Gemma 2 also: the attention scores scaled by
query_pre_attn_scalar^-1/2 instead of head_dim^-1/2, scores and final logits soft-capped
(cap * tanh(x / cap)), and a sliding window on the layers `layer_types` says (even layers in the
published models) with full attention on the others. Hook points: LLaMA's, and Gemma 2's
attn_out_normed and mlp_out_normed, the outputs through their post-norms (what is added to the
residual stream; attn_out and mlp_out stay the outputs of wo and w_out, as in every family).
Weights are converted to zoo's interleaved rotary layout on load, as LLaMA's (llama.hf_tensor_to_zoo).
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from zoo.attention import Attention
from zoo.cache import KVCache
from zoo.checks import FLAG, LAYERS, POSITIVE, SIZE, TEXT, key
from zoo.forward import Decoder, begin
from zoo.mlp import GatedMLP
from zoo.models import Family, SharedNames
from zoo.models.llama import TYPES, checked_layer_types, hf_tensor_to_zoo, rope_settings, zoo_tensors_to_hf
from zoo.models.names import PartNames
from zoo.norm import OffsetRMSNorm
from zoo.parallel import column_parallel_linear, parallel_embedding
from zoo.rotary import inv_frequencies

ACTIVATIONS = {"gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


@dataclass
class GemmaConfig(SharedNames):
    normalization, positional, parallel_residual = "rms", "rotary", False  # SharedNames
    dim: int = 2048
    n_layers: int = 18
    n_heads: int = 8
    n_kv_heads: int = 1
    head_dim: int = 256
    hidden_dim: int = 16384
    vocab_size: int = 256000
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 8192
    activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_embeddings: bool = True
    post_norms: bool = False  # Gemma 2: attention's and the MLP's outputs normed too
    query_pre_attn_scalar: float | None = None  # Gemma 2: scores * this^-1/2 (None: head_dim's)
    attn_softcap: float | None = None  # Gemma 2: scores capped as cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits capped so
    sliding_window: int | None = None  # Gemma 2: on the layers layer_types says are sliding_attention
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) is odd: rotary embeddings rotate pairs of dims")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.layer_types = checked_layer_types(self.layer_types, self.n_layers)

    def window(self, layer: int) -> int | None:
        """The sliding window of block `layer`, or None for full attention."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def attention_scale(self) -> float | None:
        """The scores' factor (None: attention's own, head_dim^-1/2)."""
        scalar = self.query_pre_attn_scalar
        return None if scalar is None or scalar == self.head_dim else scalar ** -0.5


class Block(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.layer, self.post_norms = layer, cfg.post_norms
        self.attn_norm = OffsetRMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, layer, bias=cfg.attention_bias,
                              rotary="interleaved", scale=cfg.attention_scale(), window=cfg.window(layer),
                              softcap=cfg.attn_softcap)
        self.mlp_norm = OffsetRMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], layer)  # GeGLU
        if cfg.post_norms:
            self.attn_out_norm = OffsetRMSNorm(cfg.dim, cfg.norm_eps)
            self.mlp_out_norm = OffsetRMSNorm(cfg.dim, cfg.norm_eps)
        self.extra_points = ("attn_out_normed", "mlp_out_normed") if cfg.post_norms else ()  # zoo/hooks/points.py

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim); hook points as in Llama's Block, and Gemma 2's post-norms."""
        hook, i = step.hook, self.layer
        resid_pre = hook(i, "resid_pre", x)
        attn_in = hook(i, "attn_in", self.attn_norm(resid_pre))
        attn_out = hook(i, "attn_out", self.attn(attn_in, step))
        resid_mid = hook(i, "resid_mid", resid_pre + self.post_norm("attn", attn_out, step))
        mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_mid))
        mlp_out = hook(i, "mlp_out", self.mlp(mlp_in, step))
        return hook(i, "resid_post", resid_mid + self.post_norm("mlp", mlp_out, step))

    def post_norm(self, part: str, out: torch.Tensor, step) -> torch.Tensor:
        """Gemma 2: the output of `part` ("attn" or "mlp") through its post-norm (hook point {part}_out_normed);
        Gemma: the output itself."""
        if not self.post_norms:
            return out
        return step.hook(self.layer, f"{part}_out_normed", getattr(self, f"{part}_out_norm")(out))


class Gemma(Decoder):
    def __init__(self, cfg: GemmaConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.embed = parallel_embedding(cfg.vocab_size, cfg.dim, tied=cfg.tie_embeddings)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = OffsetRMSNorm(cfg.dim, cfg.norm_eps)
        self.output = column_parallel_linear(cfg.dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings:  # one tensor; under TP both are split on the vocabulary
            self.output.weight = self.embed.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg.head_dim, cfg.rope_theta), persistent=False)
        self.tokenizer = tokenizer  # zoo.load passes the checkpoint's (zoo/tokenizer.py); None: ids only

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, hooks=None,
                left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) fp32; see Llama.forward."""
        step = begin(self, tokens, cache, hooks, left_pad, last_only, self.inv_freq)  # zoo/forward.py
        x = self.embed(tokens)  # (batch, seq, dim)
        h = step.hook(None, "embed", x * torch.tensor(math.sqrt(self.config.dim)).to(x.dtype))
        for block in self.blocks:
            h = block(h, step)
        return step.finish(h, self.norm, self.unembed)  # (batch, seq, vocab)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer, and Gemma 2's final soft-cap (in fp32)."""
        logits, cap = self.output(h), self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits.float() / cap)


# ---- Hugging Face names -------------------------------------------------------------------------
# Our parameter names, and how Hugging Face's GemmaForCausalLM / Gemma2ForCausalLM name the same tensors:
#   embed.weight, norm.weight, output.weight    model.embed_tokens.weight, model.norm.weight, lm_head.weight
#   blocks.{i}.attn_norm.weight                 model.layers.{i}.input_layernorm.weight
#   blocks.{i}.attn.w{q,k,v,o}.weight           model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
#   blocks.{i}.mlp.w_{gate,in,out}.weight       model.layers.{i}.mlp.{gate,up,down}_proj.weight
#   Gemma:   blocks.{i}.mlp_norm.weight         model.layers.{i}.post_attention_layernorm.weight
#   Gemma 2: blocks.{i}.attn_out_norm.weight    model.layers.{i}.post_attention_layernorm.weight
#            blocks.{i}.mlp_norm.weight         model.layers.{i}.pre_feedforward_layernorm.weight
#            blocks.{i}.mlp_out_norm.weight     model.layers.{i}.post_feedforward_layernorm.weight
# (the same words name different norms in the two: post_attention_layernorm is Gemma's norm before the MLP)
HF_NAMES = {"embed_tokens": "embed", "layers": "blocks", "self_attn": "attn", "input_layernorm": "attn_norm",
            "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate", "up_proj": "w_in",
            "down_proj": "w_out", "lm_head": "output"}
GEMMA_NAMES = {**HF_NAMES, "post_attention_layernorm": "mlp_norm"}
GEMMA2_NAMES = {**HF_NAMES, "post_attention_layernorm": "attn_out_norm", "pre_feedforward_layernorm": "mlp_norm",
                "post_feedforward_layernorm": "mlp_out_norm"}


GEMMA, GEMMA_2 = PartNames(GEMMA_NAMES), PartNames(GEMMA2_NAMES)


# ---- config.json, and the families' registrations (zoo/models/__init__.py) ----------------------------

def _common(cfg: dict, family: str, activation_key: str) -> dict:
    """The GemmaConfig fields both Gemmas read alike from config.json; what zoo does not run is refused."""
    if key(cfg, "use_bidirectional_attention", FLAG, default=False, nullable=True):
        raise ValueError(f"use_bidirectional_attention true is not supported for {family} (causal attention only)")
    theta, rope = rope_settings(cfg)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope['rope_type']!r} is not supported for {family} (default rotary only)")
    activation = key(cfg, activation_key, TEXT, default="gelu_pytorch_tanh")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{activation_key} {activation!r} is not supported by {family}; supported: "
                         f"{', '.join(ACTIVATIONS)}")
    return dict(dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
                n_heads=key(cfg, "num_attention_heads", SIZE), n_kv_heads=key(cfg, "num_key_value_heads", SIZE),
                head_dim=key(cfg, "head_dim", SIZE, default=256), hidden_dim=key(cfg, "intermediate_size", SIZE),
                vocab_size=key(cfg, "vocab_size", SIZE), norm_eps=key(cfg, "rms_norm_eps", POSITIVE, 1e-6),
                rope_theta=theta, max_seq_len=key(cfg, "max_position_embeddings", SIZE, default=8192),
                activation=activation, attention_bias=key(cfg, "attention_bias", FLAG, default=False),
                tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=True))


def gemma_from_hf_config(cfg: dict) -> GemmaConfig:
    """From a Gemma config.json; hidden_act "gelu", the published files' legacy value, means the tanh
    approximation (as transformers reads it)."""
    common = _common(cfg, "Gemma", "hidden_act")
    return GemmaConfig(**{**common, "activation": "gelu_pytorch_tanh"})


def gemma2_from_hf_config(cfg: dict) -> GemmaConfig:
    """From a Gemma 2 config.json: sliding windows on the layers of layer_types (without it, transformers' rule:
    the even layers), soft-caps null for none."""
    common = _common(cfg, "Gemma 2", "hidden_activation")
    types = key(cfg, "layer_types", TYPES, None, nullable=True)
    types = types or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(common["n_layers"])]
    return GemmaConfig(**common, post_norms=True,
                       query_pre_attn_scalar=key(cfg, "query_pre_attn_scalar", POSITIVE, default=256),
                       attn_softcap=key(cfg, "attn_logit_softcapping", POSITIVE, None, nullable=True),
                       final_softcap=key(cfg, "final_logit_softcapping", POSITIVE, None, nullable=True),
                       sliding_window=key(cfg, "sliding_window", SIZE, None, nullable=True), layer_types=types)


def gemma_to_hf_config(cfg: GemmaConfig) -> dict:
    """config.json's contents for `cfg`, the inverse of gemma_from_hf_config."""
    return {"model_type": "gemma", "architectures": ["GemmaForCausalLM"], "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "hidden_act": cfg.activation, "attention_bias": cfg.attention_bias,
            "tie_word_embeddings": cfg.tie_embeddings}


def gemma2_to_hf_config(cfg: GemmaConfig) -> dict:
    """config.json's contents for `cfg`, the inverse of gemma2_from_hf_config."""
    out = {k: v for k, v in gemma_to_hf_config(cfg).items() if k != "hidden_act"}
    return {**out, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_activation": cfg.activation,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "attn_logit_softcapping": cfg.attn_softcap,
            "final_logit_softcapping": cfg.final_softcap, "sliding_window": cfg.sliding_window,
            "layer_types": list(cfg.layer_types)}


class Gemma2(Gemma):
    """Gemma 2 (model_type gemma2): Gemma with post-norms, soft-caps, query_pre_attn_scalar and sliding layers."""


FAMILY = Family("gemma", GemmaConfig, gemma_from_hf_config, Gemma, GEMMA.to_zoo, GEMMA.to_hf, hf_tensor_to_zoo,
                gemma_to_hf_config, zoo_tensors_to_hf)
GEMMA2 = Family("gemma2", GemmaConfig, gemma2_from_hf_config, Gemma2, GEMMA_2.to_zoo, GEMMA_2.to_hf,
                hf_tensor_to_zoo, gemma2_to_hf_config, zoo_tensors_to_hf)

"""LLaMA 1, 2 and 3 in one file, read top to bottom: config, feed-forward, block, model, checkpoint names.

    tokens ─ embed ─┬─ block 0 ─ ... ─ block n-1 ─ norm ─ output ─ logits
                    │
    block:  h = x + attn(attn_norm(x))         RMSNorm, rotary, grouped-query attention
            out = h + mlp(mlp_norm(h))         SwiGLU: w_out(silu(w_gate h) * w_in h)

The three generations differ only in numbers: LLaMA 2 70B and LLaMA 3 use grouped-query
attention (n_kv_heads < n_heads), LLaMA 3 uses rope_theta 500000 and a 128256-token vocabulary,
LLaMA 3.1 rescales the rotary frequencies ("llama3" rope scaling), LLaMA 3.2 ties the output
to the embedding.

Mistral, Qwen2 / Qwen2.5 and Qwen3 are registered here too, as LLaMA with a few config fields, because
that is all they differ by: `sliding_window` (Mistral: each query sees at most the last sliding_window
keys, itself included; Qwen's use_sliding_window, on the layers `layer_types` says), `qkv_bias` (Qwen2:
biases on q, k and v, none on wo) and `qk_norm` (Qwen3: an RMSNorm over each head's q and k before
rotary, hook points q_normed and k_normed; its head_dim is explicit and may differ from dim / n_heads,
which LLaMA's head_dim already allows). A file of their own would repeat this one but for those lines.
Each has its own model class (a family is known by its class) and its own config.json reader and
writer, at the end of the file.

Weights are in Meta's layout (interleaved rotary pairs); Hugging Face checkpoints
are converted to it on load (`hf_tensor_to_zoo`). Config files are read in zoo/formats/.
"""
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.attention import Attention
from zoo.cache import KVCache
from zoo.checks import COUNT, FLAG, LAYERS, MAPPING, POSITIVE, SIZE, TEXT, is_int, key
from zoo.forward import Decoder, begin
from zoo.mlp import GatedMLP
from zoo.models import Family, SharedNames
from zoo.models.names import PartNames
from zoo.norm import RMSNorm
from zoo.parallel import column_parallel_linear, parallel_embedding
from zoo.rotary import ROPE_TYPES, inv_frequencies


@dataclass
class LlamaConfig(SharedNames):
    normalization, positional, act_fn, parallel_residual = "rms", "rotary", "silu", False  # SharedNames
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouping)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None: Meta's rule from multiple_of and ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = False  # Qwen2: biases on wq, wk, wv only (attention_bias: on wo too)
    qk_norm: bool = False  # Qwen3: RMSNorm (eps norm_eps) over each head's q and k, before rotary
    sliding_window: int | None = None  # Mistral, Qwen: a query sees at most this many keys, itself included
    layer_types: tuple[str, ...] | None = None  # per layer, of LAYER_TYPES; None: every layer sliding (Mistral)
    extra: dict = field(default_factory=dict, repr=False)  # config keys we read but do not use

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) is not a multiple of n_heads ({self.n_heads}), and no head_dim is given")
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) is odd: rotary embeddings rotate pairs of dims")
        if self.hidden_dim is None:  # Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        self.layer_types = checked_layer_types(self.layer_types, self.n_layers)
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_scaling:  # the numbers rotary.inv_frequencies reads
            key(self.rope_scaling, "factor", POSITIVE)
            if kind == "llama3":
                for name in ("low_freq_factor", "high_freq_factor"):
                    key(self.rope_scaling, name, POSITIVE)
                key(self.rope_scaling, "original_max_position_embeddings", COUNT)


    def window(self, layer: int) -> int | None:
        """The sliding window of block `layer`, or None for full attention."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names


def checked_layer_types(types, n_layers: int) -> tuple[str, ...] | None:
    """A config's layer_types as a tuple, one of LAYER_TYPES per layer (None stays None), else a ValueError."""
    if types is not None and (len(types) != n_layers or not set(types) <= set(LAYER_TYPES)):
        raise ValueError(f"layer_types {list(types)!r} is not accepted: {n_layers} of {', '.join(LAYER_TYPES)}, "
                         f"one per layer")
    return None if types is None else tuple(types)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, layer,
                              bias=cfg.attention_bias or cfg.qkv_bias, out_bias=cfg.attention_bias,
                              rotary="interleaved", qk_norm=cfg.norm_eps if cfg.qk_norm else None,
                              window=cfg.window(layer))
        self.extra_points = ("q_normed", "k_normed") if cfg.qk_norm else ()  # zoo/hooks/points.py
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.dim, cfg.hidden_dim, F.silu, layer, bias=cfg.mlp_bias)  # SwiGLU

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim). Each `hook` is a hook point (zoo/hooks/), named as the
        variable it sets."""
        hook, i = step.hook, self.layer
        resid_pre = hook(i, "resid_pre", x)
        attn_in = hook(i, "attn_in", self.attn_norm(resid_pre))
        attn_out = hook(i, "attn_out", self.attn(attn_in, step))
        resid_mid = hook(i, "resid_mid", resid_pre + attn_out)
        mlp_in = hook(i, "mlp_in", self.mlp_norm(resid_mid))
        mlp_out = hook(i, "mlp_out", self.mlp(mlp_in, step))
        return hook(i, "resid_post", resid_mid + mlp_out)


class Llama(Decoder):
    def __init__(self, cfg: LlamaConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.embed = parallel_embedding(cfg.vocab_size, cfg.dim, tied=cfg.tie_embeddings)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = column_parallel_linear(cfg.dim, cfg.vocab_size, bias=False, gather_output=True)
        if cfg.tie_embeddings:  # one tensor; under TP both are split on the vocabulary
            self.output.weight = self.embed.weight
        # Made on the CPU even when the model is built on the meta device; moves with .to().
        self.register_buffer("inv_freq", inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.tokenizer = tokenizer  # zoo.load passes the checkpoint's (zoo/tokenizer.py); None: ids only

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, hooks=None,
                left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab) fp32 (seq 1 with last_only).

        With a cache, the tokens are written after the `cache.pos` positions already there.
        `left_pad` (batch,) marks leading padding when there is no cache (a cache carries its own).
        `hooks`: functions to call at hook points, by name (see zoo/hooks/).
        """
        step = begin(self, tokens, cache, hooks, left_pad, last_only, self.inv_freq)  # zoo/forward.py
        h = step.hook(None, "embed", self.embed(tokens))  # (batch, seq, dim)
        for block in self.blocks:
            h = block(h, step)
        return step.finish(h, self.norm, self.output)  # (batch, seq, vocab)


# ---- Hugging Face names -------------------------------------------------------------------------
# Our parameter names, and how Hugging Face's LlamaForCausalLM names the same tensors (Meta's own
# names are in zoo/formats/meta.py):
#   embed.weight                      model.embed_tokens.weight
#   blocks.{i}.attn_norm.weight       model.layers.{i}.input_layernorm.weight
#   blocks.{i}.attn.w{q,k,v,o}.weight model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
#   blocks.{i}.attn.{q,k}_norm.weight model.layers.{i}.self_attn.{q,k}_norm.weight    (Qwen3)
#   blocks.{i}.mlp_norm.weight        model.layers.{i}.post_attention_layernorm.weight
#   blocks.{i}.mlp.w_gate.weight      model.layers.{i}.mlp.gate_proj.weight
#   blocks.{i}.mlp.w_in.weight        model.layers.{i}.mlp.up_proj.weight
#   blocks.{i}.mlp.w_out.weight       model.layers.{i}.mlp.down_proj.weight
#   norm.weight                       model.norm.weight
#   output.weight                     lm_head.weight
HF_NAMES = {"embed_tokens": "embed", "layers": "blocks", "self_attn": "attn", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "mlp_norm", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
            "gate_proj": "w_gate", "up_proj": "w_in", "down_proj": "w_out", "lm_head": "output"}
NAMES = PartNames(HF_NAMES, ignored=r"rotary_emb\.inv_freq$")  # (a buffer older conversions saved: skipped)
hf_to_zoo, zoo_to_hf = NAMES.to_zoo, NAMES.to_hf


def _rotated(name: str) -> bool:
    return re.search(r"attn\.(w[qk]|[qk]_norm)\.(weight|bias)$", name) is not None


def hf_tensor_to_zoo(name: str, t: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Undo the row permutation Hugging Face's converter applies to wq and wk.

    Within each head HF stores the rows of rotary pair i at (i, i + head_dim/2) (for `rotate_half`);
    Meta stores them at (2i, 2i + 1). Viewing the rows as (heads, 2, head_dim/2) and swapping the
    last two axes turns the first layout into the second. Works for weights and biases alike, and for
    Qwen3's q_norm and k_norm weights (head_dim wide: one head), which scale q and k before rotary.
    """
    if not _rotated(name):
        return t
    heads = t.shape[0] // cfg.head_dim  # all heads, or this rank's slice of them
    return t.reshape(heads, 2, cfg.head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def zoo_tensor_to_hf(name: str, t: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """The inverse of `hf_tensor_to_zoo` (Meta layout -> Hugging Face layout), for writing HF files."""
    if not _rotated(name):
        return t
    heads = t.shape[0] // cfg.head_dim
    return t.reshape(heads, cfg.head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def zoo_tensors_to_hf(key: str, tensors: list[torch.Tensor], cfg: LlamaConfig) -> torch.Tensor:
    """The Hugging Face tensor `key` from zoo's tensor of the one name hf_to_zoo(key) gives (zoo.save)."""
    (name,), (t,) = hf_to_zoo(key), tensors
    return zoo_tensor_to_hf(name, t, cfg)


# ---- config.json, and the family's registration (zoo/models/__init__.py) ---------------------------

def rope_settings(cfg: dict) -> tuple[float, dict]:
    """A config.json's rotary base and its scaling (the v4 `rope_scaling` or the v5 `rope_parameters` layout): (theta,
    the scaling's settings without rope_theta, `type` read as its legacy name of rope_type)."""
    rope = dict(key(cfg, "rope_parameters", MAPPING, None, nullable=True) or
                key(cfg, "rope_scaling", MAPPING, None, nullable=True) or {})
    theta = key(rope, "rope_theta", POSITIVE, default=None) or key(cfg, "rope_theta", POSITIVE, default=10000.0)
    rope.pop("rope_theta", None)
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    return float(theta), rope


def _common(cfg: dict, family: str, head_dim: int | None = None, max_seq_len: int = 2048) -> dict:
    """The LlamaConfig fields LLaMA, Qwen2 and Qwen3 read alike from config.json (rope settings in the v4 or the
    v5 `rope_parameters` layout); `head_dim` and `max_seq_len`: the family's defaults for absent keys."""
    if key(cfg, "hidden_act", TEXT, default="silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported by {family} (silu only)")
    theta, rope = rope_settings(cfg)
    return dict(
        dim=key(cfg, "hidden_size", SIZE), n_layers=key(cfg, "num_hidden_layers", LAYERS),
        n_heads=key(cfg, "num_attention_heads", SIZE),
        n_kv_heads=key(cfg, "num_key_value_heads", SIZE, None, nullable=True),
        vocab_size=key(cfg, "vocab_size", SIZE), hidden_dim=key(cfg, "intermediate_size", SIZE),
        head_dim=key(cfg, "head_dim", SIZE, head_dim, nullable=True), norm_eps=key(cfg, "rms_norm_eps", POSITIVE, 1e-6),
        rope_theta=theta, rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
        max_seq_len=key(cfg, "max_position_embeddings", SIZE, default=max_seq_len),
        tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=False))


def from_hf_config(cfg: dict) -> LlamaConfig:
    """From a LLaMA config.json."""
    return LlamaConfig(**_common(cfg, "LLaMA"), attention_bias=key(cfg, "attention_bias", FLAG, default=False),
                       mlp_bias=key(cfg, "mlp_bias", FLAG, default=False))


def to_hf_config(cfg: LlamaConfig) -> dict:
    """config.json's contents for `cfg`, the inverse of from_hf_config. The rope settings in the v4 layout
    (rope_theta, rope_scaling), which transformers 5 reads too; its own rope_parameters, v4 would ignore."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
            "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias}


FAMILY = Family("llama", LlamaConfig, from_hf_config, Llama, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo, to_hf_config,
                zoo_tensors_to_hf, chat=("llama3", "llama2"))


# ---- Mistral, Qwen2 / Qwen2.5 and Qwen3: LLaMA with a window, qkv_bias or qk_norm (the top of this file) --------

class Mistral(Llama):
    """Mistral (model_type mistral): LLaMA with a sliding window on every layer (none where sliding_window is null)."""


class Qwen2(Llama):
    """Qwen2 and Qwen2.5 (model_type qwen2): LLaMA with biases on q, k and v (not on the output projection)."""


class Qwen3(Llama):
    """Qwen3 (model_type qwen3): LLaMA with RMSNorm on each head's q and k; biases only with attention_bias."""


TYPES = (f"a list of {' or '.join(LAYER_TYPES)}", lambda v: isinstance(v, list) and all(t in LAYER_TYPES for t in v))
LAYER_INDEX = ("an int >= 0", lambda v: is_int(v) and v >= 0)


def mistral_from_hf_config(cfg: dict) -> LlamaConfig:
    """From a Mistral config.json: sliding_window null means full attention (Mistral 7B v0.2 on)."""
    return LlamaConfig(**_common(cfg, "Mistral", max_seq_len=131072),
                       sliding_window=key(cfg, "sliding_window", SIZE, None, nullable=True))


def _qwen_windows(cfg: dict, n_layers: int) -> dict:
    """Qwen's sliding windows: with use_sliding_window, sliding_window on the layers of `layer_types` (or, as
    transformers' rule without them, on the layers from max_window_layers on)."""
    window = key(cfg, "sliding_window", SIZE, None, nullable=True)
    if not key(cfg, "use_sliding_window", FLAG, default=False) or window is None:
        return {}
    types = key(cfg, "layer_types", TYPES, None, nullable=True)
    if types is None:
        first = key(cfg, "max_window_layers", LAYER_INDEX, default=28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return dict(sliding_window=window, layer_types=types)


def qwen2_from_hf_config(cfg: dict) -> LlamaConfig:
    """From a Qwen2 config.json (Qwen2's attention has q, k and v biases whatever attention_bias says)."""
    common = _common(cfg, "Qwen2", max_seq_len=32768)
    return LlamaConfig(**common, **_qwen_windows(cfg, common["n_layers"]), qkv_bias=True)


def qwen3_from_hf_config(cfg: dict) -> LlamaConfig:
    """From a Qwen3 config.json (head_dim 128 when absent, as Qwen3Config's default)."""
    common = _common(cfg, "Qwen3", head_dim=128, max_seq_len=32768)
    return LlamaConfig(**common, **_qwen_windows(cfg, common["n_layers"]), qk_norm=True,
                       attention_bias=key(cfg, "attention_bias", FLAG, default=False))


def _hf_config(cfg: LlamaConfig, model_type: str, architecture: str) -> dict:
    out = {k: v for k, v in to_hf_config(cfg).items() if k not in ("attention_bias", "mlp_bias")}
    return {**out, "model_type": model_type, "architectures": [architecture]}


def mistral_to_hf_config(cfg: LlamaConfig) -> dict:
    return {**_hf_config(cfg, "mistral", "MistralForCausalLM"), "sliding_window": cfg.sliding_window}


def _qwen_hf_config(cfg: LlamaConfig, model_type: str, architecture: str) -> dict:
    """Qwen's keys, the windows as layer_types (transformers 5) and max_window_layers (4, which has no layer_types:
    right where the sliding layers are the last ones, as its rule makes them)."""
    out = _hf_config(cfg, model_type, architecture)
    if cfg.sliding_window is None:
        return {**out, "use_sliding_window": False}
    types = list(cfg.layer_types or ["sliding_attention"] * cfg.n_layers)
    full = next((i for i in range(cfg.n_layers) if all(t == "sliding_attention" for t in types[i:])), cfg.n_layers)
    return {**out, "use_sliding_window": True, "sliding_window": cfg.sliding_window, "layer_types": types,
            "max_window_layers": full}


def qwen2_to_hf_config(cfg: LlamaConfig) -> dict:
    return _qwen_hf_config(cfg, "qwen2", "Qwen2ForCausalLM")


def qwen3_to_hf_config(cfg: LlamaConfig) -> dict:
    return {**_qwen_hf_config(cfg, "qwen3", "Qwen3ForCausalLM"), "attention_bias": cfg.attention_bias}


MISTRAL = Family("mistral", LlamaConfig, mistral_from_hf_config, Mistral, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo,
                 mistral_to_hf_config, zoo_tensors_to_hf)
QWEN2 = Family("qwen2", LlamaConfig, qwen2_from_hf_config, Qwen2, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo,
               qwen2_to_hf_config, zoo_tensors_to_hf)
QWEN3 = Family("qwen3", LlamaConfig, qwen3_from_hf_config, Qwen3, hf_to_zoo, zoo_to_hf, hf_tensor_to_zoo,
               qwen3_to_hf_config, zoo_tensors_to_hf)

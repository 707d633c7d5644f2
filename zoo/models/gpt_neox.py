"""GPT-NeoX and the Pythia suite (EleutherAI), read top to bottom.

    tokens ─ embed ─ block 0 ... block n-1 ─ norm ─ output (untied)

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

from zoo.attention import Attention, KVCache, check_heads_split, checked_inputs, positions_and_mask
from zoo.checks import COUNT, FLAG, FRACTION, MAPPING, POSITIVE, TEXT, key
from zoo.hooks import hook_points, resolve
from zoo.mlp import MLP
from zoo.parallel import check_split, column_parallel_linear, parallel_embedding
from zoo.rotary import inv_frequencies, rope_angles

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_fast": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class GPTNeoXConfig:
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

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPTNeoXConfig":
        """From config.json: rotary settings as `rotary_pct`/`rotary_emb_base` or transformers 5's `rope_parameters`."""
        rope = key(cfg, "rope_parameters", MAPPING, None, nullable=True) or \
            key(cfg, "rope_scaling", MAPPING, None, nullable=True) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported for GPT-NeoX")
        return cls(dim=key(cfg, "hidden_size", COUNT), n_layers=key(cfg, "num_hidden_layers", COUNT),
                   n_heads=key(cfg, "num_attention_heads", COUNT), hidden_dim=key(cfg, "intermediate_size", COUNT),
                   vocab_size=key(cfg, "vocab_size", COUNT),
                   max_seq_len=key(cfg, "max_position_embeddings", COUNT, default=2048),
                   rotary_pct=key(rope, "partial_rotary_factor", FRACTION, None) or key(cfg, "rotary_pct", FRACTION, 0.25),
                   rope_theta=key(rope, "rope_theta", POSITIVE, None) or key(cfg, "rotary_emb_base", POSITIVE, 10000.0),
                   norm_eps=key(cfg, "layer_norm_eps", POSITIVE, default=1e-5),
                   parallel_residual=key(cfg, "use_parallel_residual", FLAG, default=True),
                   bias=key(cfg, "attention_bias", FLAG, default=True),
                   activation=key(cfg, "hidden_act", TEXT, default="gelu"),
                   tie_embeddings=key(cfg, "tie_word_embeddings", FLAG, default=False))

    @classmethod
    def from_neox(cls, args: dict, vocab_size: int, hidden_dim: int) -> "GPTNeoXConfig":
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
        return cls(dim=key(args, "hidden_size", COUNT, **yaml), n_layers=key(args, "num_layers", COUNT, **yaml),
                   n_heads=key(args, "num_attention_heads", COUNT, **yaml), hidden_dim=hidden_dim, vocab_size=vocab_size,
                   max_seq_len=key(args, "max_position_embeddings", COUNT, None, nullable=True, **yaml)
                   or key(args, "seq_length", COUNT, 2048, nullable=True, **yaml),
                   rotary_pct=key(args, "rotary_pct", FRACTION, 1.0, **yaml),
                   rope_theta=key(args, "rotary_emb_base", POSITIVE, 10000, **yaml),
                   norm_eps=key(args, "layernorm_epsilon", POSITIVE, 1e-5, **yaml),
                   parallel_residual=key(args, "gpt_j_residual", FLAG, False),
                   bias=key(args, "use_bias_in_attn_linear", FLAG, True), activation=activation,
                   tie_embeddings=not key(args, "no_weight_tying", FLAG, False))


class Block(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_heads, cfg.head_dim, bias=cfg.bias, rotary="half")
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, ACTIVATIONS[cfg.activation], bias=True)

    def forward(self, x, rope, mask, cache, layer, hooks=None):
        if hooks:  # every `if hooks:` line is a hook point (zoo/hooks.py); without hooks they cost nothing
            x = hooks(layer, "resid_pre", x)
        a = self.attn_norm(x)
        if hooks:
            a = hooks(layer, "attn_in", a)
        a = self.attn(a, rope, mask, cache, layer, hooks)
        if hooks:
            a = hooks(layer, "attn_out", a)
        if self.parallel_residual:  # both branches read x: there is no resid_mid
            m = self.mlp_norm(x)
        else:
            h = x + a
            if hooks:
                h = hooks(layer, "resid_mid", h)
            m = self.mlp_norm(h)
        if hooks:
            m = hooks(layer, "mlp_in", m)
        m = self.mlp(m, hooks, layer)
        if hooks:
            m = hooks(layer, "mlp_out", m)
        out = x + a + m if self.parallel_residual else h + m
        if hooks:
            out = hooks(layer, "resid_post", out)
        return out


class GPTNeoX(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig):
        super().__init__()
        self.config = cfg
        check_heads_split(cfg.n_heads, cfg.n_heads)  # the splits, before any layer is built
        check_split({"the embedding's dim": cfg.dim, "the MLP's hidden_dim": cfg.hidden_dim,
                     "the output layer's vocab_size": cfg.vocab_size})
        self.embed = parallel_embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = column_parallel_linear(cfg.dim, cfg.vocab_size, bias=False, gather_output=True)
        self.register_buffer("inv_freq", inv_frequencies(cfg.rotary_dim, cfg.rope_theta), persistent=False)
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
        rope = rope_angles(self.inv_freq, positions)  # for the first rotary_dim dims of each head
        h = self.embed(tokens)  # (batch, seq, dim)
        if hooks:
            h = hooks(None, "embed", h)
        for i, block in enumerate(self.blocks):
            h = block(h, rope, mask, cache, i, hooks)
        if last_only and not (hooks and hooks.wants_every_position()):  # hooked, they see every position
            h = h[:, -1:]
        h = self.norm(h)
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
# Hugging Face GPTNeoXForCausalLM keys:
#   gpt_neox.embed_in.weight                                    -> embed.weight
#   gpt_neox.layers.{i}.input_layernorm / post_attention_layernorm -> blocks.{i}.attn_norm / mlp_norm
#   gpt_neox.layers.{i}.attention.query_key_value (fused)       -> blocks.{i}.attn.wq, wk, wv
#   gpt_neox.layers.{i}.attention.dense                         -> blocks.{i}.attn.wo
#   gpt_neox.layers.{i}.mlp.dense_h_to_4h / dense_4h_to_h       -> blocks.{i}.mlp.w_in / w_out
#   gpt_neox.final_layer_norm, embed_out                        -> norm, output
# Older files also hold the buffers attention.bias, attention.masked_bias, rotary_emb.inv_freq: skipped.
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm", "attention.dense": "attn.wo",
               "mlp.dense_h_to_4h": "mlp.w_in", "mlp.dense_4h_to_h": "mlp.w_out"}
TOP_NAMES = {"gpt_neox.embed_in": "embed", "gpt_neox.final_layer_norm": "norm", "embed_out": "output"}
IGNORED = re.compile(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


def hf_to_zoo(key: str) -> list[str]:
    """Our name(s) for a key of a Hugging Face GPTNeoXForCausalLM checkpoint (the fused qkv gives three)."""
    if IGNORED.search(key):
        return []
    layer = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if layer:
        i, module, param = layer.groups()
        if module == "attention.query_key_value":
            return [f"blocks.{i}.attn.{w}.{param}" for w in ("wq", "wk", "wv")]
        return [f"blocks.{i}.{LAYER_NAMES.get(module, module)}.{param}"]
    module, _, param = key.rpartition(".")
    return [f"{TOP_NAMES.get(module, module)}.{param}"]


def zoo_to_hf(name: str) -> str:
    layer = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if layer:
        i, module, param = layer.groups()
        module = "attention.query_key_value" if module in ("attn.wq", "attn.wk", "attn.wv") else \
            _LAYER_KEYS.get(module, module)
        return f"gpt_neox.layers.{i}.{module}.{param}"
    module, _, param = name.rpartition(".")
    return f"{_TOP_KEYS.get(module, module)}.{param}"


_LAYER_KEYS = {v: k for k, v in LAYER_NAMES.items()}
_TOP_KEYS = {v: k for k, v in TOP_NAMES.items()}


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



# ---- EleutherAI gpt-neox's own checkpoints (DeepSpeed), as its training saved them ---------------
# One model-parallel rank per file: `layer_{idx:02d}-model_{rank:02d}-model_states.pt` (pipeline
# layout, one file per layer) or `mp_rank_{rank:02d}_model_states.pt` (sequential layout, tensors
# under ["module"] as "sequential.{idx}.{key}"). idx 0 holds word_embeddings, idx i + 2 block i, idx
# n_layers + 3 the final norm, idx n_layers + 4 final_linear (absent when the output is tied).
# Within a block the keys are Hugging Face's (which were taken from these), newer versions name
# the MLP linear1 / linear2.
NEOX_COLUMN_PARALLEL = re.compile(r"word_embeddings\.weight|final_linear\.weight|"
                                  r"attention\.query_key_value\..*|mlp\.(dense_h_to_4h|linear1)\..*")
NEOX_ROW_PARALLEL = re.compile(r"(attention\.dense|mlp\.(dense_4h_to_h|linear2))\.(weight|bias)")
NEOX_MLP = {"linear1": "dense_h_to_4h", "linear2": "dense_4h_to_h"}


def neox_to_hf(idx: int, key: str, n_layers: int) -> str:
    """The Hugging Face key of tensor `key` of gpt-neox layer `idx` ('' for one without a parameter here)."""
    if idx == 0 and key == "word_embeddings.weight":
        return "gpt_neox.embed_in.weight"
    if 2 <= idx < n_layers + 2:
        module = re.sub(r"^mlp\.(linear1|linear2)\.", lambda m: f"mlp.{NEOX_MLP[m.group(1)]}.", key)
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
    if NEOX_COLUMN_PARALLEL.fullmatch(key):
        return "dim0"
    if NEOX_ROW_PARALLEL.fullmatch(key):
        return "dim1" if key.endswith(".weight") else "sum" if parallel_residual else "one"
    return "mean"

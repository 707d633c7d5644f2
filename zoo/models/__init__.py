"""The model families, one file each, read top to bottom: llama.py (LLaMA 1, 2, 3; Mistral, Qwen2, Qwen3), opt.py
(OPT), gpt_neox.py (GPT-NeoX, Pythia), gpt2.py (GPT-2), gemma.py (Gemma, Gemma 2). This file is the protocol between
a family and the rest of zoo.

A family is one `Family`, defined at the end of its file and registered once, in FAMILIES below:
  name             config.json's model_type ("llama"), and the name zoo's own checkpoints record
  config           its config dataclass, a SharedNames (below), which has at least the fields every part
                   of zoo reads: vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim,
                   max_seq_len, and says normalization, positional, act_fn and parallel_residual
  from_hf_config   config.json's contents (a dict) -> config, each key checked (zoo.checks.key)
  model            the model class, model(config, tokenizer=None), a zoo.forward.Decoder
  hf_to_zoo        a Hugging Face tensor name -> zoo's name(s) ([]: skip it; several: a fused tensor)
  zoo_to_hf        the other way, to name a missing tensor in the checkpoint's own words
  hf_tensor_to_zoo (name, tensor or a slice of whole heads of it, config) -> the tensor in zoo's layout
  to_hf_config     config -> config.json's contents (a dict), the inverse of from_hf_config (zoo.save)
  zoo_tensors_to_hf (Hugging Face key, [zoo's tensors of the names hf_to_zoo(key) gives, in that order], config)
                   -> the tensor in Hugging Face's layout, the inverse of hf_tensor_to_zoo (a fused tensor
                   from its parts); without these two a family loads but zoo.save cannot write it as HF
  chat             the chat formats (zoo/chat.py) its instruct checkpoints use, the first its tokenizer
                   can write is taken (default: none)
  whole_tensors    True where hf_tensor_to_zoo takes only whole tensors (it moves the dim tensor parallelism
                   splits: GPT-2's weights, stored transposed): each rank reads a tensor whole and keeps its
                   slice (default False: it takes a slice of whole heads, and a rank reads only that)
Other formats (Meta's, gpt-neox's, metaseq's: zoo/formats/) map their names onto a family's Hugging Face
names, so a family needs nothing more to load from them.

What the rest of zoo may rely on a model to have:
  config                  the fields above
  tokenizer, source       the checkpoint's tokenizer (or None) and directory (set by zoo.load, else absent)
  embed                   the token embedding (its weight's dtype and device are the model's)
  blocks                  an nn.ModuleList; each block has `layer` (its index), `attn` (a zoo.attention
                          Attention, whose n_kv_heads and head_dim are this rank's) and `mlp` (zoo/mlp.py);
                          `parallel_residual` True where attention and MLP both read resid_pre (no resid_mid)
  output                  the unembedding, a linear layer (tied: its weight is embed's)
  forward(tokens, cache=None, *, hooks=None, left_pad=None, last_only=False), written on zoo/forward.py,
  new_cache, hook_points  from zoo.forward.Decoder
Adding a family: its own file, and one line in FAMILIES. Nothing else in zoo names a family.
"""
from typing import Callable, NamedTuple

from torch import nn


class SharedNames:
    """The config names every family answers to (TransformerLens's), beside its own fields. Each config
    also says `normalization` ("rms" or "layer"), `positional` ("rotary" or "learned"), `act_fn` and
    `parallel_residual`."""

    @property
    def d_model(self) -> int:
        return self.dim

    @property
    def d_mlp(self) -> int:
        return self.hidden_dim

    @property
    def d_head(self) -> int:
        return self.head_dim

    @property
    def d_vocab(self) -> int:
        return self.vocab_size

    @property
    def n_ctx(self) -> int:
        return self.max_seq_len

    @property
    def act_fn(self) -> str:  # a family with an `activation` field; LLaMA says "silu" itself
        return self.activation


class Family(NamedTuple):
    name: str
    config: type
    from_hf_config: Callable
    model: type
    hf_to_zoo: Callable
    zoo_to_hf: Callable
    hf_tensor_to_zoo: Callable
    to_hf_config: Callable | None = None
    zoo_tensors_to_hf: Callable | None = None
    chat: tuple[str, ...] = ()
    whole_tensors: bool = False


from zoo.models import gemma, gpt2, gpt_neox, llama, opt  # noqa: E402  (each file ends with its Family, defined above)

FAMILIES = {family.name: family for family in (llama.FAMILY, opt.FAMILY, gpt_neox.FAMILY, gpt2.FAMILY, llama.QWEN2,
                                               llama.QWEN3, llama.MISTRAL, gemma.FAMILY, gemma.GEMMA2)}


def family_of(model: nn.Module) -> str:
    """The registered name of a model's family, by its exact class (a subclass is a family of its own)."""
    name = next((name for name, family in FAMILIES.items() if type(model) is family.model), None)
    if name is None:
        raise ValueError(f"a {type(model).__name__} is not a model of a registered family ({', '.join(FAMILIES)})")
    return name

"""Causal self-attention, shared by every family.

One `Attention` module covers LLaMA (grouped-query heads, interleaved rotary, no biases),
GPT-NeoX (half-split partial rotary, biases), OPT and GPT-2 (learned positions, so no rotary, biases;
GPT-2 may scale the scores otherwise: `scale`), Qwen2 (biases on q, k and v only: `out_bias`) and Qwen3
(RMSNorm over each head's q and k before rotary: `qk_norm`); Mistral's sliding window (`window`: each query
sees at most the last `window` keys, itself included; the mask is zoo/forward.py's) and Gemma 2's soft-capped
scores (`softcap`).
The weights are always four separate projections wq/wk/wv/wo, whatever the checkpoint fuses. The
arithmetic (which kernel for which case) is zoo/kernels/attention.py's `attend`; the KV cache is
zoo/cache.py; positions and masks are made once per forward (zoo/forward.py).
"""
import math

import torch
from torch import nn

from zoo.kernels.attention import attend
from zoo.norm import RMSNorm
from zoo.parallel import column_parallel_linear, row_parallel_linear, world_size
from zoo.rotary import apply_rotary


def check_heads_split(n_heads: int, n_kv_heads: int) -> None:
    """Tensor parallelism splits the query heads and the key/value heads: the world size must divide both."""
    world = world_size()
    if n_heads % world or n_kv_heads % world:
        fits = [w for w in range(1, n_kv_heads + 1) if n_kv_heads % w == 0 and n_heads % w == 0]
        raise ValueError(f"world size {world} does not divide n_heads ({n_heads}) and n_kv_heads "
                         f"({n_kv_heads}): run with a world size in {fits}")


# Attention in one paragraph: each position asks a question (its query q = x wq) and offers an answer
# key k = x wk and a value v = x wv; in each head, a position's output is the average of the values of
# the positions it may see (itself and those before it: the causal mask; never a padding slot), each
# weighted by softmax(q . k / sqrt(head_dim)), and wo mixes the heads' outputs back into the residual
# stream. Rotary embeddings turn q and k by angles that grow with position, so q . k depends on how far
# apart two tokens are; grouped-query attention lets n_heads / n_kv_heads query heads share one k and v
# head; the KV cache keeps every layer's k and v so that a new token attends without recomputing them.
class Attention(nn.Module):
    """Under tensor parallelism each rank holds n_heads/w query heads and n_kv_heads/w kv heads:
    wq/wk/wv are column-parallel (split by heads), wo row-parallel (its partial sums all-reduced).
    scale: the factor of the scores q . k, default 1/sqrt(head_dim) (attend's); another one is carried by q,
    multiplied after the q hook point. out_bias: wo's bias (default: `bias`, as wq/wk/wv's). qk_norm: the eps
    of an RMSNorm over each head's q and k (head_dim wide, one weight shared by the heads), applied after the q
    and k hook points and before rotary (hook points q_normed and k_normed); None: none. window: a sliding
    window (None: full causal attention). softcap: scores capped as softcap * tanh(scores / softcap)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer: int = 0, bias: bool = False,
                 rotary: str | None = "interleaved", scale: float | None = None, out_bias: bool | None = None,
                 qk_norm: float | None = None, window: int | None = None, softcap: float | None = None):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        check_heads_split(n_heads, n_kv_heads)
        world = world_size()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads // world, n_kv_heads // world, head_dim  # this rank's
        self.layer, self.rotary, self.interleaved = layer, rotary is not None, rotary == "interleaved"
        self.q_factor = None if scale is None else scale * math.sqrt(head_dim)  # attend divides by sqrt(head_dim)
        self.wq = column_parallel_linear(dim, n_heads * head_dim, bias=bias, gather_output=False)
        self.wk = column_parallel_linear(dim, n_kv_heads * head_dim, bias=bias, gather_output=False)
        self.wv = column_parallel_linear(dim, n_kv_heads * head_dim, bias=bias, gather_output=False)
        self.wo = row_parallel_linear(n_heads * head_dim, dim, bias=bias if out_bias is None else out_bias,
                                      input_is_parallel=True)
        self.window, self.softcap = window, softcap
        self.qk_norm = qk_norm is not None
        if self.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(head_dim, qk_norm), RMSNorm(head_dim, qk_norm)

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim), summed over ranks; step: this forward's zoo.forward.Step."""
        batch, seq, _ = x.shape
        hook, i = step.hook, self.layer
        q = hook(i, "q", self.wq(x).view(batch, seq, self.n_heads, self.head_dim))
        k = hook(i, "k", self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim))
        v = hook(i, "v", self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim))
        q, k = self.normed(q, k, step)
        if self.rotary:
            q, k = [apply_rotary(t, *step.rope, interleaved=self.interleaved) for t in (q, k)]
        q = q if self.q_factor is None else q * self.q_factor
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, seq, head_dim)
        if step.cache is not None:
            k, v = step.cache.update(i, k, v)  # (batch, n_kv_heads, every slot so far, head_dim)
        on_pattern = (lambda p: hook(i, "pattern", p)) if step.hooks and step.hooks.wants(i, "pattern") else None
        z = hook(i, "z", attend(q, k, v, step.mask_for(self.window), on_pattern, self.softcap).transpose(1, 2))
        return self.wo(z.reshape(batch, seq, -1))  # z: (batch, seq, heads, head_dim)

    def normed(self, q: torch.Tensor, k: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's RMSNorm of each head's q and k (hook points q_normed, k_normed); q and k themselves otherwise."""
        if not self.qk_norm:
            return q, k
        return step.hook(self.layer, "q_normed", self.q_norm(q)), step.hook(self.layer, "k_normed", self.k_norm(k))

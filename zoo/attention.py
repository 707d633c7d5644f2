"""Causal self-attention and its KV cache, shared by every family.

One `Attention` module covers LLaMA (grouped-query heads, interleaved rotary, no biases),
GPT-NeoX (half-split partial rotary, biases) and OPT (learned positions, so no rotary, biases).
The weights are always four separate projections wq/wk/wv/wo, whatever the checkpoint fuses.
"""
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.checks import integer, is_int, require
from zoo.parallel import column_parallel_linear, row_parallel_linear, world_size
from zoo.rotary import apply_rotary


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions and written in place.

    `pos` is how many positions are filled; the model advances it after each forward.
    `left_pad[b]` is how many slots at the start of row b are padding (prompts of different
    lengths are left-padded to a common length, so every row decodes at the same slot).
    `id` names the cache's run for hooks: every forward on one cache is one run (a generation).

    static=True keeps every shape fixed from step to step, for torch.compile and CUDA graphs: the
    next slot is also a tensor (`slot`), new keys and values are written at it, and attention
    reads the whole cache with a mask instead of the filled slice (the same result: masked keys
    weigh exactly 0). The eager default reads only the filled slice, which is cheaper there.
    """
    _ids = itertools.count(1)

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, left_pad: torch.Tensor | None = None, static: bool = False):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.batch = batch
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0  # positions filled
        self.steps = 0  # forwards done (0 until the prefill is done)
        self.left_pad = None if left_pad is None else left_pad.to(device)
        self.id = next(KVCache._ids)
        self.static = static
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # = pos, as a tensor (kept by static caches)
        if static and device.type == "cuda":  # the same buffers every step: CUDA graphs may write them in place
            for t in (*self.keys, *self.values, self.slot):
                torch._dynamo.mark_static_address(t)

    def advance(self, seq: int) -> None:
        """Called by the model once all layers have written their `seq` new positions."""
        if torch.compiler.is_compiling():  # Python bookkeeping stays out of the graph (else a guard on `pos`
            return                          # would recompile every step): zoo/compile.py advances after the call
        self.pos += seq
        self.steps += 1
        if self.static:
            self.slot += seq

    def seek(self, pos: int) -> None:
        """The next forward writes from position `pos`, the positions before it holding this sequence's keys
        and values (zoo/chat.py: a dialogue rewound to where it changed, or copied into a larger cache).
        What lies beyond is never read: overwritten, or masked."""
        if not 0 <= pos <= self.max_len:
            raise ValueError(f"seek({pos}): a cache of {self.max_len} positions takes 0..{self.max_len}")
        self.pos = pos
        self.slot.fill_(pos)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (batch, n_kv_heads, seq, head_dim) keys/values; return all of them so far
        (static: the whole cache, (batch, n_kv_heads, max_len, head_dim))."""
        if self.static:
            slots = self.slot + torch.arange(k.shape[2], device=k.device)
            self.keys[layer].index_copy_(2, slots, k)
            self.values[layer].index_copy_(2, slots, v)
            return self.keys[layer], self.values[layer]
        end = self.pos + k.shape[2]
        self.keys[layer][:, :, self.pos : end] = k
        self.values[layer][:, :, self.pos : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int, left_pad: torch.Tensor | None = None,
                  static: bool = False) -> "KVCache":
        """A cache shaped for `model` (any family: they all have `blocks[i].attn` and `embed`), on its device."""
        attn, w = model.blocks[0].attn, model.embed.weight
        integer("batch", batch, low=1)
        integer("max_len", max_len, low=1, high=model.config.max_seq_len)
        left_pad = checked_left_pad(left_pad, batch, max_len, w.device)
        return cls(len(model.blocks), batch, attn.n_kv_heads, attn.head_dim, max_len, w.dtype, w.device, left_pad,
                   static)


def checked_left_pad(left_pad, batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
    """left_pad (batch,) ints: how many padding tokens each row starts with, each in 0..seq-1 (a real token is left)."""
    if left_pad is None:
        return None
    accepted = f"a tensor or list of {batch} ints (one per row), each in 0..{seq - 1}: the number of padding tokens " \
               f"a row starts with (not its length)"
    if isinstance(left_pad, (list, tuple)):
        require(all(is_int(p) for p in left_pad), "left_pad", left_pad, accepted)
        left_pad = torch.tensor(left_pad, dtype=torch.long)
    require(isinstance(left_pad, torch.Tensor) and left_pad.shape == (batch,) and not left_pad.is_floating_point()
            and left_pad.dtype != torch.bool, "left_pad", left_pad, accepted)
    if left_pad.device.type == "cpu":  # a value check on the GPU would wait for it
        require(bool(((left_pad >= 0) & (left_pad < seq)).all()), "left_pad", left_pad.tolist(), accepted)
    return left_pad.to(device=device, dtype=torch.long)


def checked_inputs(tokens: torch.Tensor, cache: "KVCache | None", left_pad, config, device: torch.device):
    """A forward's arguments, checked before any work; returns left_pad as a tensor (or None).

    tokens: (batch, seq) int64 or int32 ids below the vocabulary size (values checked on the CPU,
    where it costs microseconds; on a GPU an out-of-range id is the embedding's device assert).
    A compiled forward skips them while tracing: zoo.compile's callables make them before each call.
    """
    if torch.compiler.is_compiling():
        return left_pad
    accepted = "a (batch, seq) tensor of int64 token ids"
    require(isinstance(tokens, torch.Tensor), "tokens", tokens, accepted, TypeError)
    require(tokens.dim() == 2 and tokens.shape[0] > 0 and tokens.shape[1] > 0, "tokens", tokens,
            accepted + (" (tokens[None] adds the batch dim)" if tokens.dim() == 1 else ""))
    require(tokens.dtype in (torch.int64, torch.int32), "tokens", tokens, accepted, TypeError)
    require(tokens.device == device, "tokens", tokens, f"{accepted} on the model's device, {device} (got {tokens.device})")
    if tokens.device.type == "cpu":
        low, high = torch.aminmax(tokens)
        require(low >= 0 and high < config.vocab_size, "tokens", tokens,
                f"ids in 0..{config.vocab_size - 1} (got {low.item()}..{high.item()})")
    batch, seq = tokens.shape
    if cache is None:
        require(seq <= config.max_seq_len, "tokens", tokens, f"at most the model's context of {config.max_seq_len} "
                                                             f"positions")
        return checked_left_pad(left_pad, batch, seq, device)
    require(left_pad is None, "left_pad", left_pad, "None with a cache: the cache carries its own "
                                                    "(model.new_cache(batch, max_len, left_pad=...))")
    require(cache.batch == batch, "tokens", tokens, f"{cache.batch} rows, the batch size of the cache")
    if cache.pos + seq > cache.max_len:
        raise ValueError(f"{cache.pos + seq} positions do not fit the KV cache of {cache.max_len} ({cache.pos} held, "
                         f"{seq} new)")
    return None


def positions_and_mask(tokens: torch.Tensor, cache: KVCache | None,
                       left_pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the new tokens (written after the cache's `pos` slots) and the attention mask.

    Returns positions (batch or 1, seq) and a boolean mask (batch or 1, 1, seq, start+seq) that
    is True where a query may attend, or None when plain causal attention is exact (a prefill
    from slot 0, or a single new token that sees everything before it). `left_pad` (batch,) marks
    leading padding when there is no cache; a cache carries its own.
    """
    seq, device = tokens.shape[1], tokens.device
    if cache is not None and cache.static:  # the same rules over all max_len slots, from the `slot` tensor
        slots = cache.slot + torch.arange(seq, device=device)  # slots not yet written are never attended
        return _masked(slots, torch.arange(cache.max_len, device=device), cache.left_pad)
    start = 0
    if cache is not None:
        start, left_pad = cache.pos, cache.left_pad  # (checked_inputs: they fit)
    slots = torch.arange(start, start + seq, device=device)  # (seq,)
    if left_pad is None and (start == 0 or seq == 1):
        return slots[None], None
    return _masked(slots, torch.arange(start + seq, device=device), left_pad)


def _masked(slots: torch.Tensor, keys: torch.Tensor, left_pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (batch or 1, seq) of the queries at `slots` and their mask over the `keys` slots: causal, and
    never a padding slot, except by itself, so that no softmax row is empty."""
    causal = keys <= slots[:, None]  # (seq, keys)
    if left_pad is None:
        return slots[None], causal[None, None]
    not_pad = (keys >= left_pad[:, None, None]) | (keys == slots[:, None])  # (batch, seq, keys)
    positions = (slots[None] - left_pad[:, None]).clamp(min=0)  # (batch, seq): real tokens start at 0
    return positions, (causal & not_pad)[:, None]


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
    wq/wk/wv are column-parallel (split by heads), wo row-parallel (its partial sums all-reduced)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False,
                 rotary: str | None = "interleaved"):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        check_heads_split(n_heads, n_kv_heads)
        world = world_size()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads // world, n_kv_heads // world, head_dim  # this rank's
        self.interleaved = rotary == "interleaved"
        self.rotary = rotary is not None
        self.wq = column_parallel_linear(dim, n_heads * head_dim, bias=bias, gather_output=False)
        self.wk = column_parallel_linear(dim, n_kv_heads * head_dim, bias=bias, gather_output=False)
        self.wv = column_parallel_linear(dim, n_kv_heads * head_dim, bias=bias, gather_output=False)
        self.wo = row_parallel_linear(n_heads * head_dim, dim, bias=bias, input_is_parallel=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0, hooks=None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if hooks:
            q, k, v = hooks(layer, "q", q), hooks(layer, "k", k), hooks(layer, "v", v)
        if self.rotary:
            q = apply_rotary(q, *rope, interleaved=self.interleaved)
            k = apply_rotary(k, *rope, interleaved=self.interleaved)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, seq, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (batch, n_kv_heads, start+seq, head_dim)
        if hooks and hooks.wants(layer, "pattern"):
            out = attention_with_pattern(q, k, v, mask, lambda p: hooks(layer, "pattern", p))
        elif seq == 1 and torch.compiler.is_compiling():  # a compiled decode step: inductor fuses the written-out
            out = attention_with_pattern(q, k, v, mask)    # form into a few loops, faster than SDPA's kernel for 1 query
        elif seq == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            out = one_query_attention(q, k, v, mask)  # an eager bf16 decode step: 5-10x faster than SDPA's kernel
        else:
            # softmax(q k^T / sqrt(head_dim) + mask) v; each group of n_heads/n_kv_heads query heads shares a kv head
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        z = out.transpose(1, 2)  # (batch, seq, heads, head_dim)
        if hooks:
            z = hooks(layer, "z", z)
        return self.wo(z.reshape(batch, seq, -1))  # (batch, seq, dim), summed over ranks


def one_query_attention(q, k, v, mask) -> torch.Tensor:
    """SDPA for one new position (q (batch, heads, 1, head_dim)) written out in fp32, as SDPA computes it.

    On the CPU, torch's SDPA kernel takes 5-10x longer for one bf16 query than this (207 against 37 us
    over 133 keys, 1.5 ms against 0.11 over 1,024, TinyLlama's 32 heads of 64; 2 threads). The query
    heads that share a kv head are viewed as one (batch, kv_heads, group, head_dim) block, so the cache
    is read once, never repeated. (Compiled, attention_with_pattern's form fuses better: 1,236 against
    960 tok/s on the tiny model.)
    """
    batch, heads, _, head_dim = q.shape
    group = heads // k.shape[1]
    q = q.float().view(batch, k.shape[1], group, head_dim)  # head h is kv head h // group's member h % group
    scores = (q @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)  # (batch, kv_heads, group, keys)
    if mask is not None:  # (batch or 1, 1, 1, keys)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()  # (batch, kv_heads, group, head_dim)
    return out.view(batch, heads, 1, head_dim).to(v.dtype)


def attention_with_pattern(q, k, v, mask, on_pattern=None) -> torch.Tensor:
    """The same attention written out, so that the probabilities (batch, heads, seq, keys) can be hooked."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (batch, heads, keys, head_dim)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (batch, heads, seq, keys)
    if mask is None and q.shape[2] > 1:  # a prefill from slot 0: plain causal
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    pattern = torch.softmax(scores, dim=-1).to(q.dtype)
    pattern = pattern if on_pattern is None else on_pattern(pattern)
    return pattern @ v  # (batch, heads, seq, head_dim)

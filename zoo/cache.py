"""The KV cache: every layer's keys and values, preallocated and written in place.

Two numbers say where a sequence is, and they mean different things:
- a **slot** is an index into the cache; every row of a batch writes its n-th token at the same slot.
- a **position** is a token's index in its own row, 0 = its first real token. Prompts of different
  lengths are left-padded to a common length, so row b's slot s holds its position s - left_pad[b]
  (negative: padding). Rotary angles, learned positions and hooks use positions.
"""
import itertools

import torch
from torch import nn

from zoo.checks import integer, is_int, require


class KVCache:
    """Keys and values of `n_layers` layers for `max_len` slots; `pos` slots are filled.

    The model advances `pos` after each forward (zoo/forward.py). `left_pad[b]`: how many slots at the
    start of row b are padding. `id` names the cache's run for hooks: every forward on one cache is one
    run (a generation). `steps` counts those forwards (0 until the prefill is done).

    static=True keeps every shape fixed from step to step, for torch.compile and CUDA graphs: the next
    slot is also a tensor (`slot`), new keys and values are written at it, and attention reads the whole
    cache with a mask instead of the filled slice (the same result: masked keys weigh exactly 0).
    """
    _ids = itertools.count(1)

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, left_pad: torch.Tensor | None = None, static: bool = False):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_len, self.static, self.id = batch, max_len, static, next(KVCache._ids)
        self.pos, self.steps = 0, 0
        self.left_pad = None if left_pad is None else left_pad.to(device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # = pos, as a tensor (kept by static caches)
        if static and device.type == "cuda":  # the same buffers every step: CUDA graphs may write them in place
            for t in (*self.keys, *self.values, self.slot):
                torch._dynamo.mark_static_address(t)

    def advance(self, seq: int) -> None:
        """`seq` new slots are written in every layer (called once per forward: zoo/forward.py)."""
        self.pos += seq
        self.steps += 1
        if self.static:
            self.slot += seq

    def seek(self, pos: int) -> None:
        """The next forward writes from slot `pos`, the slots before it holding this sequence's keys and
        values (zoo/chat.py: a dialogue rewound to where it changed, or copied into a larger cache)."""
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
        """A cache shaped for `model` (any family: see the protocol in zoo/models/__init__.py), on its device."""
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

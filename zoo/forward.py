"""What every family's forward shares, written once, so that each family's forward reads as its architecture:

    step = begin(self, tokens, cache, hooks, left_pad, last_only, self.inv_freq)   # checks, hooks, mask, rope
    h = step.hook(None, "embed", self.embed(tokens))
    for block in self.blocks:
        h = block(h, step)                          # each block: step.hook(layer, point, x) at each point
    return step.finish(h, self.norm, self.output)   # ln_final, logits, last_only, the cache advance

`begin` checks the public arguments (before any work), resolves the hooks (zoo/hooks/), and computes
the positions, the attention mask and the rotary angles of the new tokens; a sliding-window layer's mask
is made when the first such layer asks for it (Step.mask_for), so a model without one never makes it.
`Step.finish` advances the KV cache: the one place a forward does, and `call_compiled` (below it) is the
one exception, for a forward run by torch.compile, whose graph leaves the Python bookkeeping out.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn

from zoo.cache import KVCache, checked_left_pad
from zoo.checks import require
from zoo.hooks import Hooks, hook_points, resolve
from zoo.rotary import rope_angles


class Decoder(nn.Module):
    """What every family's model class has besides its modules and forward (see zoo/models/__init__.py)."""

    def new_cache(self, batch: int, max_len: int, left_pad: torch.Tensor | None = None, static: bool = False) -> KVCache:
        return KVCache.for_model(self, batch, max_len, left_pad, static)

    def hook_points(self, tokens: torch.Tensor | None = None) -> dict[str, tuple]:
        return hook_points(self, tokens)

    def forward_from(self, layer: int, h: torch.Tensor, tokens: torch.Tensor, cache: KVCache | None = None, *,
                     hooks=None) -> torch.Tensor:
        """The forward from block `layer` on, given h (batch, seq, dim), the residual stream entering it, for
        `tokens` (whose positions, mask and checks it takes; with a cache, written after its `pos` slots): the
        blocks before `layer` are not run (patching sweeps share them between runs, zoo/analysis/sweep.py).
        The hooks of blocks `layer`.. and of ln_final and logits fire as in a forward; the logits are the
        forward's when h is what blocks 0..layer-1 would give (tests/test_sweep.py, every family)."""
        step = begin(self, tokens, cache, hooks, None, False, getattr(self, "inv_freq", None))
        for block in self.blocks[layer:]:
            h = block(h, step)
        return step.finish(h, self.final_norm, self.unembed)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output to logits: the output layer (Gemma 2 also soft-caps them)."""
        return self.output(h)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The residual stream through the final norm: what the ln_final point sees (OPT adds its project_out)."""
        return self.norm(h)


def _unhooked(layer: int | None, point: str, x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class Step:
    """One forward, as its blocks see it.

    hook(layer, point, x): the hooks of that point applied to x (x itself when none: a forward without
    hooks pays one call per point). positions (batch or 1, seq): the new tokens' positions (padding
    clamped to 0). mask: (batch or 1, 1, seq, keys) bool, True where a query may attend, or None for
    plain causal attention. rope: the rotary (cos, sin) at those positions, or None. windowed(window): the
    mask of a sliding-window layer, made (once per window) only when such a layer asks: `mask_for`.
    """
    cache: KVCache | None
    hooks: Hooks | None
    hook: Callable[[int | None, str, torch.Tensor], torch.Tensor]
    positions: torch.Tensor
    mask: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor] | None
    seq: int
    last_only: bool
    windowed: Callable[[int], torch.Tensor | None] | None = None
    _windows: dict = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The mask of a layer whose queries see at most the last `window` keys, themselves included (None: every
        key before them, `mask`, and no other work: a model without windows pays one call per layer)."""
        if window is None:
            return self.mask
        if window not in self._windows:
            self._windows[window] = self.windowed(window)
        return self._windows[window]

    def finish(self, h: torch.Tensor, final: Callable, output: Callable) -> torch.Tensor:
        """The end of a forward: the residual stream h (batch, seq, dim) through the `final` norm (the ln_final
        hook point) and the `output` layer to fp32 logits (batch, seq, vocab; the logits hook point), and
        the KV cache advanced. With last_only only the last position is computed and returned, unless
        ln_final or logits is hooked: their hooks see every position, as in one forward of the sequence."""
        if self.last_only and not (self.hooks and self.hooks.wants_every_position()):
            h = h[:, -1:]
        logits = self.hook(None, "logits", output(self.hook(None, "ln_final", final(h))).float())
        if self.cache is not None and not torch.compiler.is_compiling():  # compiled: call_compiled advances it
            self.cache.advance(self.seq)
        return logits[:, -1:] if self.last_only else logits


def begin(model: nn.Module, tokens: torch.Tensor, cache: KVCache | None, hooks, left_pad, last_only: bool,
          inv_freq: torch.Tensor | None = None) -> Step:
    """A forward's arguments checked, its hooks resolved, its positions, mask and rotary angles (with inv_freq)."""
    left_pad = checked_inputs(tokens, cache, left_pad, model.config, model.embed.weight.device)
    hooks = resolve(hooks, model, cache, left_pad)  # None when there are none
    positions, mask = positions_and_mask(tokens, cache, left_pad)
    rope = rope_angles(inv_freq, positions) if inv_freq is not None else None
    windowed = partial(window_mask, tokens, cache, left_pad)
    return Step(cache, hooks, hooks or _unhooked, positions, mask, rope, tokens.shape[1], last_only, windowed)


def call_compiled(model: nn.Module, compiled: Callable, tokens: torch.Tensor, cache: KVCache, **kwargs):
    """Run a forward compiled by zoo.compile: the argument checks and the cache advance that its graph leaves
    out are made here, around the call. If dynamo ran the frame eagerly (past its recompile limit), that
    forward advanced the cache itself, and it is not advanced twice."""
    checked_inputs(tokens, cache, kwargs.get("left_pad"), model.config, model.embed.weight.device)
    steps = cache.steps
    out = compiled(tokens, cache=cache, **kwargs)
    if cache.steps == steps:
        cache.advance(tokens.shape[1])
    return out


def checked_inputs(tokens: torch.Tensor, cache: KVCache | None, left_pad, config, device: torch.device):
    """A forward's arguments, checked before any work; returns left_pad as a tensor (or None).

    tokens: (batch, seq) int64 or int32 ids below the vocabulary size (values checked on the CPU,
    where it costs microseconds; on a GPU an out-of-range id is the embedding's device assert).
    A compiled forward skips them while tracing: call_compiled makes them before each call.
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


def positions_and_mask(tokens: torch.Tensor, cache: KVCache | None, left_pad: torch.Tensor | None = None,
                       window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the new tokens (written after the cache's `pos` slots) and the attention mask.

    Returns positions (batch or 1, seq) and a boolean mask (batch or 1, 1, seq, start+seq) that
    is True where a query may attend, or None when plain causal attention is exact (a prefill
    from slot 0, or a single new token that sees everything before it). `left_pad` (batch,) marks
    leading padding when there is no cache; a cache carries its own. `window`: a sliding window, each
    query seeing at most the last `window` slots, its own included (as transformers' sliding_window:
    key slot > query slot - window); a row's slots and positions differ by its padding only, so the
    window spans the same tokens in a padded batch as alone.
    """
    seq, device = tokens.shape[1], tokens.device
    if cache is not None and cache.static:  # the same rules over all max_len slots, from the `slot` tensor
        slots = cache.slot + torch.arange(seq, device=device)  # slots not yet written are never attended
        return _masked(slots, torch.arange(cache.max_len, device=device), cache.left_pad, window)
    start = 0
    if cache is not None:
        start, left_pad = cache.pos, cache.left_pad  # (checked_inputs: they fit)
    slots = torch.arange(start, start + seq, device=device)  # (seq,)
    if left_pad is None and (start == 0 or seq == 1) and (window is None or start + seq <= window):
        return slots[None], None
    return _masked(slots, torch.arange(start + seq, device=device), left_pad, window)


def window_mask(tokens: torch.Tensor, cache: KVCache | None, left_pad: torch.Tensor | None,
                window: int) -> torch.Tensor | None:
    """The mask of a sliding-window layer (positions_and_mask's, with `window`): Step.mask_for."""
    return positions_and_mask(tokens, cache, left_pad, window)[1]


def _masked(slots: torch.Tensor, keys: torch.Tensor, left_pad: torch.Tensor | None,
            window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (batch or 1, seq) of the queries at `slots` and their mask over the `keys` slots: causal (within
    the last `window` slots), and never a padding slot, except by itself, so that no softmax row is empty."""
    causal = keys <= slots[:, None]  # (seq, keys)
    if window is not None:
        causal = causal & (keys > slots[:, None] - window)
    if left_pad is None:
        return slots[None], causal[None, None]
    not_pad = (keys >= left_pad[:, None, None]) | (keys == slots[:, None])  # (batch, seq, keys)
    positions = (slots[None] - left_pad[:, None]).clamp(min=0)  # (batch, seq): real tokens start at 0
    return positions, (causal & not_pad)[:, None]

"""Gradients at hook points: `collect(..., grads=True)` also records d(metric)/d(activation).

    cache = zoo.hooks.collect("blocks.*.resid_pre", "blocks.*.z", grads=True)
    logits = model(tokens, hooks=cache)                # with autograd on: not under no_grad/inference_mode
    metric = logits[0, -1, good] - logits[0, -1, bad]
    metric.backward()
    cache.grads["blocks.3.z"]                          # the layout of cache["blocks.3.z"]: (b, s, h, d)

The models load frozen (requires_grad False), so nothing upstream of a point asks for a gradient: the
first recorded point that does not require one is made a leaf that does (the same values, the graph
cut only where nothing could flow anyway), and every later point depends on it. Each recorded tensor
gets a tensor hook that keeps its gradient, gathered to full width under tensor parallelism when the
collect gathers (every rank runs the same backward, so the all-gather inside it pairs up). The
parameters get no gradient. Gradients add up over several backward passes of one run, as .grad does;
a new run clears them. Quantized layers pass the gradient through their dequantized weight
(zoo/quant/linear.py).
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from zoo.hooks.points import _seq_dim


def joined(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """A run's recorded parts of one point joined along the sequence (pattern: the queries, the keys padded
    with zeros to the longest)."""
    if len(parts) == 1:
        return parts[0]
    if name.endswith(".pattern"):  # (b, h, q, S)
        longest = max(p.shape[-1] for p in parts)
        parts = [F.pad(p, (0, longest - p.shape[-1])) for p in parts]
    return torch.cat(parts, dim=_seq_dim(name))


class Gradients(Mapping):
    """`cache.grads` of a collect(grads=True): name -> d(metric)/d(activation), a read-only mapping of the points
    a gradient has reached."""

    def __init__(self, cache):
        self.cache = cache
        self.clear()

    def clear(self) -> None:
        self.shapes: dict[str, list[torch.Size]] = {}  # name -> each recorded part's shape
        self.parts: dict[str, dict[int, torch.Tensor]] = {}  # name -> part index -> its gradient so far

    def watch(self, x: torch.Tensor, ctx, shape: torch.Size) -> torch.Tensor:
        """x, made to require a gradient if it does not, with a hook that keeps its gradient: the hook's result."""
        if not torch.is_grad_enabled():
            raise RuntimeError(f"collect(grads=True) at {ctx.name}: autograd is off (torch.no_grad() or "
                               f"torch.inference_mode()); run the forward outside them to get gradients")
        if not x.requires_grad:
            x = x.detach().requires_grad_()
        name = ctx.name
        self.shapes.setdefault(name, []).append(shape)
        index = len(self.shapes[name]) - 1
        x.register_hook(lambda g: self._arrived(name, index, g, ctx))
        return x

    def _arrived(self, name: str, index: int, g: torch.Tensor, ctx) -> None:
        g = (ctx.gather(g) if self.cache.gather else g).detach()
        parts = self.parts.setdefault(name, {})
        parts[index] = parts[index] + g if index in parts else g.clone()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(f"{name!r} was not recorded; this collect holds {', '.join(self.shapes) or 'nothing yet'}")
        if name not in self.parts:
            raise KeyError(f"no gradient has reached {name!r} yet: call backward() on a metric of this run's output")
        got = self.parts[name]
        some = next(iter(got.values()))  # a part the backward did not reach (a later step of a run) is zeros
        parts = [got[i] if i in got else some.new_zeros(shape) for i, shape in enumerate(self.shapes[name])]
        return joined(parts, name)

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __repr__(self):
        return f"<gradients of {self.cache!r}: {', '.join(self.parts) or 'none yet'}>"

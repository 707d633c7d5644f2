"""Hook points: their names and shapes (POINTS), where one fires (Context), and the hooks of one forward
resolved against a model's names (Hooks, resolve). The contract is zoo/hooks/__init__.py's docstring; the
built-in hooks are builtins.py."""
import difflib
import fnmatch
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from zoo import parallel

# name -> (shape, meaning). In shapes: b batch, s new tokens, S all positions so far, h heads,
# kvh key/value heads, d head_dim, D model dim, F hidden units of the MLP, V vocabulary, E the
# unembedding's input width (D, or OPT's word_embed_proj_dim).
POINTS = {
    "embed": ("b s D", "token embedding (+ learned positions and project_in, OPT)"),
    "resid_pre": ("b s D", "the residual stream entering the block"),
    "attn_in": ("b s D", "input of attention: after the norm, affine included (post-LN OPT: = resid_pre)"),
    "q": ("b s h d", "queries per head, before rotary"),
    "k": ("b s kvh d", "keys per key/value head, before rotary"),
    "v": ("b s kvh d", "values per key/value head"),
    "q_normed": ("b s h d", "queries per head after their RMSNorm, before rotary (Qwen3 only)"),
    "k_normed": ("b s kvh d", "keys per key/value head after their RMSNorm, before rotary (Qwen3 only)"),
    "pattern": ("b h s S", "attention probabilities (softmax); materialised only when hooked"),
    "z": ("b s h d", "attention output per head, before the output projection wo"),
    "attn_out": ("b s D", "attention output, after wo (summed over ranks)"),
    "attn_out_normed": ("b s D", "attn_out through its post-norm, what is added to the residual stream (Gemma 2 only)"),
    "resid_mid": ("b s D", "the residual stream between attention and MLP (sequential-residual models only)"),
    "mlp_in": ("b s D", "input of the MLP: after its norm (post-LN OPT: = resid_mid)"),
    "mlp_pre": ("b s F", "pre-activation: the gate w_gate x for SwiGLU, fc1/w_in x otherwise"),
    "mlp_post": ("b s F", "input of the down projection w_out: the neurons"),
    "mlp_out": ("b s D", "MLP output, after w_out (summed over ranks)"),
    "mlp_out_normed": ("b s D", "mlp_out through its post-norm, what is added to the residual stream (Gemma 2 only)"),
    "resid_post": ("b s D", "the residual stream leaving the block"),
    "ln_final": ("b s E", "after the final norm (and project_out, OPT): the input of the unembedding"),
    "logits": ("b s V", "the output logits"),
}
# Points only some families have: a block lists its own in `extra_points` (they fire in POINTS' order).
FAMILY_POINTS = ("q_normed", "k_normed", "attn_out_normed", "mlp_out_normed")
LAYER_POINTS = [p for p in POINTS if p not in ("embed", "ln_final", "logits", *FAMILY_POINTS)]  # every block's
HEAD_POINTS = {"q": 2, "k": 2, "v": 2, "z": 2, "pattern": 1, "q_normed": 2, "k_normed": 2}  # which dim holds heads
NEURON_POINTS = {"mlp_pre": 2, "mlp_post": 2}
_forward_runs = itertools.count(1)  # a run id for each forward without a KV cache


@dataclass
class Context:
    """Where a hook fires.

    slot: how many positions the KV cache held before this forward (0 without a cache); every row
    writes x[:, 0] at that slot. left_pad: (batch,) leading padding slots per row, or None.
    step: forward number within a run (0: the prefill, or a forward without a cache).
    run: an id shared by the forwards of one run. shard: (dim, start, stop, full) when x is this
    rank's slice [start, stop) of a tensor split across ranks, `full` wide along `dim`; x may end in
    zero padding past stop (hidden units the world size does not divide: zoo/parallel/layers.py).
    """
    name: str
    layer: int | None
    slot: int
    left_pad: torch.Tensor | None
    seq: int  # length of x's sequence dim (the queries for pattern)
    step: int
    run: tuple
    rank: int = 0
    world_size: int = 1
    shard: tuple | None = None
    # storage -> what keeps a reference to it (collect), told to copy it before a hook may change it in place
    held: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def positions(self) -> torch.Tensor:
        """(batch or 1, seq) int64: each row's own token position along x's sequence dim; padding < 0."""
        if self.left_pad is None:
            return torch.arange(self.slot, self.slot + self.seq)[None]
        return torch.arange(self.slot, self.slot + self.seq, device=self.left_pad.device)[None] - self.left_pad[:, None]

    @property
    def start_pos(self) -> int:
        """The position of x[:, 0], when every row has the same (no left padding); else see `positions`."""
        if self.left_pad is not None:
            raise ValueError(f"{self.name}: the rows of this left-padded batch start at different positions "
                             f"(left_pad {self.left_pad.tolist()}); use ctx.positions (batch, seq)")
        return self.slot

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The full tensor of which x is this rank's slice (x itself when it is not split)."""
        if self.shard is None or self.world_size == 1:
            return x
        dim, _, _, full = self.shard
        return parallel.all_gather(x, dim=dim).narrow(dim, 0, full)

    def local(self, value: torch.Tensor, dim: int, width: int) -> torch.Tensor:
        """This rank's slice (`width` wide, zero-padded past the end) of a full-width value along its `dim`."""
        _, start, stop, _ = self.shard
        part = value.narrow(dim, start, stop - start)
        return part if stop - start == width else F.pad(part, [0, 0] * (value.dim() - dim - 1) + [0, width - part.shape[dim]])

    @property
    def point(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def names(model) -> list[str]:
    """Every hook point of a model, in the order they fire."""
    out = ["embed"]
    for i, block in enumerate(model.blocks):
        own = getattr(block, "extra_points", ())
        out += [f"blocks.{i}.{p}" for p in POINTS if (p in LAYER_POINTS or p in own)
                and (p != "resid_mid" or not getattr(block, "parallel_residual", False))]
    return out + ["ln_final", "logits"]


class Hooks:
    """The hooks of one forward, resolved against a model's names: (layer, point) -> functions."""

    def __init__(self, spec, model, cache, left_pad: torch.Tensor | None):
        valid = names(model)
        self.table: dict[tuple, list[Callable]] = {}
        for pattern, fn in _items(spec):
            matched = fnmatch.filter(valid, pattern)
            if not matched:
                raise KeyError(_unknown(pattern, valid, model))
            if not callable(fn):
                raise TypeError(f"the hook given for {pattern!r} is a {type(fn).__name__}, not a function: pass "
                                f"fn(x, ctx) or a built-in such as zoo.hooks.replace(value)")
            for name in matched:
                self.table.setdefault(_key(name), []).append(fn)
        if cache is not None:
            self.slot, self.step, self.left_pad, self.run = cache.pos, cache.steps, cache.left_pad, ("cache", cache.id)
        else:
            self.slot, self.step, self.left_pad, self.run = 0, 0, left_pad, ("forward", next(_forward_runs))
        self.rank, self.world = parallel.rank(), parallel.world_size()
        self.neurons = model.config.hidden_dim  # the MLP's hidden units, which TP may pad (the heads it never does)
        self.held: dict[int, list[Callable]] = {}  # storage -> callbacks of collects recording it (Context.held)

    def wants(self, layer: int | None, point: str) -> bool:
        return (layer, point) in self.table

    def wants_every_position(self) -> bool:
        """Whether ln_final or logits is hooked: then a prefill computes them at every position, not just the last."""
        return self.wants(None, "ln_final") or self.wants(None, "logits")

    def __call__(self, layer: int | None, point: str, x: torch.Tensor) -> torch.Tensor:
        fns = self.table.get((layer, point))
        if not fns:
            return x
        name = point if layer is None else f"blocks.{layer}.{point}"
        ctx = Context(name, layer, self.slot, self.left_pad, x.shape[_seq_dim(name)], self.step, self.run,
                      self.rank, self.world, self._shard(point, x), self.held)
        for fn in fns:
            if self.held and not getattr(fn, "keeps_input", False):
                for own_copy in self.held.pop(x.untyped_storage().data_ptr(), ()):
                    own_copy()  # a collect that holds x (or a view of its storage) copies it: fn may change x in place
            try:
                out = fn(x, ctx)
            except Exception as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"in the hook {_describe(fn)} on {name}")
                raise
            if out is not None:
                x = _checked(out, x, name, fn)
        return x

    def _shard(self, point, x):
        if self.world == 1 or (point not in HEAD_POINTS and point not in NEURON_POINTS):
            return None
        dim = HEAD_POINTS.get(point, NEURON_POINTS.get(point))
        local = x.shape[dim]
        full = self.neurons if point in NEURON_POINTS else local * self.world
        start = min(self.rank * local, full)
        return dim, start, min(start + local, full), full


def _checked(out, x: torch.Tensor, name: str, fn) -> torch.Tensor:
    """A hook's result, checked against the activation it replaces and cast to its dtype."""
    where = f"the hook {_describe(fn)} on {name}"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where} returned a {type(out).__name__}; return None or a tensor of shape {tuple(x.shape)}")
    if out.shape != x.shape:
        raise ValueError(f"{where} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"{where} returned a tensor on {out.device}; the activation is on {x.device}")
    if not out.is_floating_point():
        raise TypeError(f"{where} returned {out.dtype}; return a floating-point tensor ({x.dtype} here)")
    return out.to(x.dtype)


def resolve(spec, model, cache, left_pad: torch.Tensor | None = None) -> Hooks | None:
    """The Hooks of one forward (None when there are none: the models then skip every hook point)."""
    if spec is None or (isinstance(spec, (dict, list, tuple)) and not spec):  # (an empty collect is still hooks)
        return None
    return Hooks(spec, model, cache, left_pad)


def hook_points(model, tokens: torch.Tensor | None = None) -> dict[str, tuple]:
    """Every hook point of `model` and the shape it has for `tokens` (default: one sequence of 8 tokens)."""
    tokens = tokens if tokens is not None else torch.zeros(1, 8, dtype=torch.long,
                                                           device=next(model.parameters()).device)
    shapes = {}
    with torch.no_grad():
        model(tokens, hooks={"*": lambda x, ctx: shapes.__setitem__(ctx.name, tuple(x.shape))})
    return shapes


def _seq_dim(name: str) -> int:
    """Which dim of a hook point's tensor runs along the new tokens: queries (2) for pattern, else 1."""
    return 2 if name.endswith(".pattern") else 1


def _key(name: str) -> tuple:
    if name.startswith("blocks."):
        _, layer, point = name.split(".")
        return int(layer), point
    return None, name


def _items(spec):
    """(pattern, fn) pairs from a dict, a collect()/patch() set, or a list of those."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        return [item for part in spec for item in _items(part)]
    if hasattr(spec, "as_hooks"):
        spec = spec.as_hooks()
    if not isinstance(spec, dict):
        raise TypeError(f"hooks= takes a dict {{name: fn}}, a zoo.hooks.collect or patch, or a list of those; "
                        f"got a {type(spec).__name__}")
    out = []
    for pattern, fn in spec.items():
        if not isinstance(pattern, str):
            raise TypeError(f"hook point names are strings such as 'blocks.0.resid_post', not {pattern!r}")
        for f in fn if isinstance(fn, (list, tuple)) else [fn]:
            out.append((pattern, f))
    return out


def _unknown(pattern: str, valid: list[str], model) -> str:
    point = pattern.rsplit(".", 1)[-1]
    if point == "resid_mid" and any(getattr(b, "parallel_residual", False) for b in model.blocks):
        return (f"no hook point {pattern!r}: this model uses a parallel residual (attention and MLP both read "
                f"resid_pre and are added together), so there is no residual stream between them")
    near = difflib.get_close_matches(pattern, valid, n=5, cutoff=0.6)
    near = near or [n for n in valid if n.endswith("." + point)][:5] or valid[:5]
    return f"no hook point matches {pattern!r}; nearest: {', '.join(near)} (see model.hook_points())"


def _describe(fn) -> str:
    """A function by its name, a built-in hook (an instance, which has no __qualname__) by its repr."""
    return getattr(fn, "__qualname__", None) or repr(fn)

"""Hook points: read, record, replace, add to or ablate any activation, passed to the forward.

    logits = model(tokens, hooks={"blocks.3.resid_post": fn, "blocks.*.z": zoo.hooks.ablate(heads=[5])})
    def fn(x, ctx): ...      # return a tensor to replace x, or None to only read it
    cache = zoo.hooks.collect("blocks.*.resid_post", "blocks.2.pattern")
    model(tokens, hooks=cache); cache["blocks.2.pattern"]     # (batch, heads, q, k)

The same names on every family (see POINTS and the README's table). Names may be globs and are
expanded once per forward; an unknown name is an error that lists the nearest valid ones. Several
hooks on one point run in the order given (a list of hook sets is read left to right). With no
hooks the models pay one `if hooks` test per point: no modules, no dictionaries.

The contract:
- Positions are positions in each row's own tokens, 0 = its first real token, in every forward
  (prefill or decode, left-padded or not, in one process or under tensor parallelism).
  `ctx.positions` (batch or 1, seq) gives them along x's sequence dim; left padding is negative
  there and no built-in acts on it. Negative positions are refused: during generation the end of
  a sequence moves, so "from the end" would mean a different token at every step.
- A generation is a forward, step by step: over a generation every point (ln_final and logits
  included) sees exactly the positions and values one forward of the final sequence shows.
- Heads and neurons are indexed over the whole model, in one process and under tensor
  parallelism alike; negative ones count from the end as in Python; out of range is an error.
- A hook returns None or a floating-point tensor of x's shape on x's device; it is cast to x's dtype.
- A run is one forward without a KV cache, or every forward on one KV cache (a generation).
  `collect` holds one run: the first forward of a new run replaces what it held.

Under tensor parallelism q, k, v, pattern and z hold this rank's heads and mlp_pre/mlp_post its
hidden units: `ctx.shard` says which slice of the full tensor `x` is, `ctx.gather(x)` returns the
full tensor. The built-in hooks take global head and neuron indices, and full-width values,
and handle the slices.
"""
import difflib
import fnmatch
import itertools
from dataclasses import dataclass
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
    "pattern": ("b h s S", "attention probabilities (softmax); materialised only when hooked"),
    "z": ("b s h d", "attention output per head, before the output projection wo"),
    "attn_out": ("b s D", "attention output, after wo (summed over ranks)"),
    "resid_mid": ("b s D", "the residual stream between attention and MLP (sequential-residual models only)"),
    "mlp_in": ("b s D", "input of the MLP: after its norm (post-LN OPT: = resid_mid)"),
    "mlp_pre": ("b s F", "pre-activation: the gate w_gate x for SwiGLU, fc1/w_in x otherwise"),
    "mlp_post": ("b s F", "input of the down projection w_out: the neurons"),
    "mlp_out": ("b s D", "MLP output, after w_out (summed over ranks)"),
    "resid_post": ("b s D", "the residual stream leaving the block"),
    "ln_final": ("b s E", "after the final norm (and project_out, OPT): the input of the unembedding"),
    "logits": ("b s V", "the output logits"),
}
LAYER_POINTS = [p for p in POINTS if p not in ("embed", "ln_final", "logits")]
HEAD_POINTS = {"q": 2, "k": 2, "v": 2, "z": 2, "pattern": 1}  # which dim holds heads
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
        out += [f"blocks.{i}.{p}" for p in LAYER_POINTS if p != "resid_mid" or not getattr(block, "parallel_residual", False)]
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
                      self.rank, self.world, self._shard(point, x))
        for fn in fns:
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
    return repr(fn) if isinstance(fn, (replace, add, ablate, patch)) else getattr(fn, "__qualname__", repr(fn))


# ---- built-in hooks ---------------------------------------------------------------------------

def _position_rule(positions) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """positions (None = all; an int, a slice or range, or ints; never negative) -> a test of a positions tensor."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        start, stop, step = positions.start or 0, positions.stop, positions.step or 1
        for part in (positions.start, positions.stop, positions.step):
            _check_position(part, positions, allow_none=True)
        if step <= 0:
            raise ValueError(f"positions {positions}: the step must be positive")
        return lambda p: (p >= start) & (p < stop if stop is not None else True) & ((p - start) % step == 0)
    items = positions.tolist() if isinstance(positions, torch.Tensor) else positions
    items = [items] if isinstance(items, int) else list(items)
    for i in items:
        _check_position(i, positions)
    wanted = torch.tensor(items, dtype=torch.long)
    return lambda p: torch.isin(p, wanted.to(p.device))


def _check_position(i, positions, allow_none=False):
    if i is None and allow_none:
        return
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"positions {positions!r}: {i!r} is not an int")
    if i < 0:
        raise ValueError(f"positions {positions!r}: {i} is negative; positions count each row's tokens from 0 (its "
                         f"first real token), and during generation the end moves, so there is no 'from the end'")


def _selected(x: torch.Tensor, ctx: Context, rule) -> torch.Tensor:
    """Bool mask broadcastable to x: the real (not padding) positions that `rule` picks (all, for None)."""
    pos = ctx.positions  # (batch or 1, seq)
    chosen = pos >= 0 if rule is None else rule(pos) & (pos >= 0)
    seq_dim = _seq_dim(ctx.name)
    shape = [1] * x.dim()
    shape[0], shape[seq_dim] = chosen.shape
    return chosen.view(shape).to(x.device)


def _fit(value, x: torch.Tensor, ctx: Context, what: str) -> torch.Tensor:
    """A value broadcastable to x, in x's dtype and device; a full-width value on a split point cut to this rank's slice."""
    value = torch.as_tensor(value).to(device=x.device, dtype=x.dtype)
    if ctx.shard is not None:
        dim, _, _, full = ctx.shard
        vdim = value.dim() - (x.dim() - dim)  # the same dim counted from the right
        if vdim >= 0 and value.shape[vdim] == full != x.shape[dim]:
            value = ctx.local(value, vdim, x.shape[dim])
    try:
        torch.broadcast_shapes(value.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"{what} at {ctx.name}: a value of shape {tuple(value.shape)} does not broadcast to the "
                         f"activation's {tuple(x.shape)} ({POINTS[ctx.point][0]})") from None
    return value


class replace:
    """Replace the activation at `positions` (each row's own; all by default) by a tensor or by fn(x, ctx)."""

    def __init__(self, value, positions=None):
        self.value, self.positions, self.rule = value, positions, _position_rule(positions)

    def __call__(self, x, ctx):
        new = self.value(x, ctx) if callable(self.value) else self.value
        new = _fit(new, x, ctx, "replace")
        return torch.where(_selected(x, ctx, self.rule), new, x)

    def __repr__(self):
        return f"zoo.hooks.replace(positions={self.positions!r})"


class add:
    """Add scale * vector to the activation at `positions` (steering / activation addition)."""

    def __init__(self, vector, positions=None, scale: float = 1.0):
        self.vector, self.positions, self.scale, self.rule = vector, positions, scale, _position_rule(positions)

    def __call__(self, x, ctx):
        v = _fit(self.vector, x, ctx, "add")
        return torch.where(_selected(x, ctx, self.rule), x + self.scale * v, x)

    def __repr__(self):
        return f"zoo.hooks.add(positions={self.positions!r}, scale={self.scale})"


class ablate:
    """Zero or mean-ablate heads (on q/k/v/z/pattern) or neurons (on mlp_pre/mlp_post), by global index, at
    `positions` (each row's own; all by default).

    mode "mean" replaces each one at position t of a row by its mean over that row's positions
    0..t (a causal running mean, kept across the steps of a generation): rows never mix, so a
    padded batch equals each row alone, and a generation equals one forward of its final sequence.
    The mean needs every position from 0: a forward of the run that went without this hook is an
    error naming the positions it missed (to ablate only later positions, hook every forward and
    pass positions=). For a mean over a dataset, collect it and use replace().
    """

    def __init__(self, heads=None, neurons=None, mode: str = "zero", positions=None):
        if (heads is None) == (neurons is None):
            raise ValueError("ablate needs exactly one of heads=... or neurons=...")
        if mode not in ("zero", "mean"):
            raise ValueError(f"ablate mode must be 'zero' or 'mean', not {mode!r}")
        self.what = "head" if heads is not None else "neuron"
        given = heads if heads is not None else neurons
        self.indices = [given] if isinstance(given, int) else list(given)
        for i in self.indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"ablate({self.what}s={given!r}): {i!r} is not an int")
        self.mode, self.positions, self.rule = mode, positions, _position_rule(positions)
        self.sums: dict[str, tuple] = {}  # point -> (run, next slot, running sum, count) for mode "mean"

    def __repr__(self):
        return f"zoo.hooks.ablate({self.what}s={self.indices}, mode={self.mode!r}, positions={self.positions!r})"

    def __call__(self, x, ctx):
        dims = HEAD_POINTS if self.what == "head" else NEURON_POINTS
        if ctx.point not in dims:
            raise ValueError(f"ablate({self.what}s=...) cannot apply to {ctx.name}; it applies to {', '.join(dims)}")
        dim = dims[ctx.point]
        local = _local(ctx, self.indices, dim, x.shape[dim], self.what)
        if not local:
            return None
        index = [slice(None)] * x.dim()
        index[dim] = local
        index = tuple(index)
        new = torch.zeros_like(x[index]) if self.mode == "zero" else self._running_mean(x[index], ctx)
        x = x.clone()
        x[index] = new if self.rule is None else torch.where(_selected(new, ctx, self.rule), new, x[index])
        return x

    def _running_mean(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """x (the ablated slice) -> each row's mean over its real positions up to each one, in x's dtype."""
        seq_dim = _seq_dim(ctx.name)
        real = _selected(x, ctx, None)  # (batch or 1, ..., seq, ...) bool
        values = torch.where(real, x, 0).float()
        run, slot, total, count = self.sums.get(ctx.name, (None, 0, 0, 0))
        if run != ctx.run:  # a new run: start from nothing
            slot, total, count = 0, 0, 0
        if ctx.slot != slot:
            self._missed(ctx, slot)
        if ctx.point == "pattern" and torch.is_tensor(total) and total.shape[-1] < x.shape[-1]:  # more keys now
            total = torch.nn.functional.pad(total, (0, x.shape[-1] - total.shape[-1]))
        sums = values.cumsum(seq_dim) + (total.unsqueeze(seq_dim) if torch.is_tensor(total) else 0)
        counts = real.long().cumsum(seq_dim) + (count.unsqueeze(seq_dim) if torch.is_tensor(count) else 0)
        last = torch.tensor([x.shape[seq_dim] - 1], device=x.device)
        self.sums[ctx.name] = (ctx.run, ctx.slot + x.shape[seq_dim], sums.index_select(seq_dim, last).squeeze(seq_dim),
                               counts.index_select(seq_dim, last).squeeze(seq_dim))
        return torch.where(real, sums / counts.clamp(min=1), x).to(x.dtype)

    def _missed(self, ctx: Context, seen: int) -> None:
        """This forward starts at another slot than where the running mean stopped: an error, unless what it
        skipped is padding only (a row's positions before 0)."""
        pad = ctx.left_pad.tolist() if ctx.left_pad is not None else [0]
        if ctx.slot < seen:
            raise ValueError(f"ablate(mode='mean') at {ctx.name}: this forward goes back to slot {ctx.slot} of a run "
                             f"this hook has seen up to slot {seen - 1} (a rewound KV cache); start a new run")
        skipped = [(row, seen - p, ctx.slot - 1 - p) for row, p in enumerate(pad) if ctx.slot - 1 - p >= 0]
        if skipped:
            row, first, last = skipped[0]
            raise ValueError(f"ablate(mode='mean') at {ctx.name}: positions {_spans(range(max(first, 0), last + 1))} "
                             f"(row {row}) ran without this hook, so the mean over 0..t is unknown; pass it to every "
                             f"forward of the run, the prefill included (positions= ablates only some positions)")


def _local(ctx: Context, indices: list[int], dim: int, local_size: int, what: str) -> list[int]:
    """Global indices (negative from the end; out of range is an error) -> this rank's local indices."""
    _, start, stop, full = ctx.shard if ctx.shard is not None else (dim, 0, local_size, local_size)
    out = []
    for i in indices:
        if not -full <= i < full:
            raise IndexError(f"{what} {i} is out of range for {ctx.name}, which has {full} {what}s "
                             f"(valid: {-full}..{full - 1})")
        i %= full
        if start <= i < stop:
            out.append(i - start)
    return out


class collect:
    """Record activations: `cache = collect("blocks.*.resid_post")`, `model(tokens, hooks=cache)`, `cache[name]`.

    A collect holds one run: a forward without a KV cache, or a whole generation (every forward on
    one KV cache), whose steps are joined along the sequence (pattern: along the queries, with the
    keys padded with zeros to the longest). The first forward of another run replaces what it held.
    `positions(name)` gives the token position of each recorded index, per row (negative on left
    padding): from 0 for a recording of a whole run, whose tensors are in the run's slot layout (row
    b's first real token at `left_pad[b]`); from the first position it saw for one that began
    partway through a run. gather=True keeps full tensors under tensor parallelism. Recorded tensors
    are detached copies. Reads like a dict: `cache[name]`, `in`, keys(), values(), items(), len().
    """

    def __init__(self, *patterns: str, gather: bool = False):
        for p in patterns:
            if not isinstance(p, str):
                raise TypeError(f"collect takes hook point names (globs allowed), not {p!r}")
        self.patterns, self.gather = patterns, gather
        self.store: dict[str, list[torch.Tensor]] = {}
        self.where: dict[str, list[torch.Tensor]] = {}  # name -> the positions of each recorded part
        self.run, self.left_pad = None, None

    def as_hooks(self) -> dict:
        return {p: self._record for p in self.patterns}

    def _record(self, x, ctx):
        if ctx.run != self.run:
            self.store, self.where, self.run = {}, {}, ctx.run
            self.left_pad = None if ctx.left_pad is None else ctx.left_pad.clone()
        x = (ctx.gather(x) if self.gather else x).detach().clone()
        self.store.setdefault(ctx.name, []).append(x)
        self.where.setdefault(ctx.name, []).append(ctx.positions)

    def positions(self, name: str) -> torch.Tensor:
        """(batch or 1, recorded length) int64: the token position of each recorded index along the sequence
        (pattern: the queries), per row, as the hooks count them; negative on left padding. A recording
        that began partway through a run starts at the first position it saw, not at 0."""
        self[name]  # the same KeyError for a name not recorded
        parts = self.where[name]
        if len(parts) > 1:
            self.where[name] = [torch.cat(parts, dim=1)]
        return self.where[name][0]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.store:
            raise KeyError(f"{name!r} was not recorded; this collect holds {', '.join(self.store) or 'nothing yet'} "
                           f"(it records {', '.join(map(repr, self.patterns))})")
        parts = self.store[name]
        if len(parts) == 1:
            return parts[0]
        if name.endswith(".pattern"):  # (b, h, q, S): pad the key dim to the longest before joining
            longest = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, longest - p.shape[-1])) for p in parts]
        joined = torch.cat(parts, dim=_seq_dim(name))
        self.store[name] = [joined]
        return joined

    def __contains__(self, name) -> bool:
        return name in self.store

    def __iter__(self):
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return self.store.keys()

    def values(self):
        return [self[n] for n in self.store]

    def items(self):
        return [(n, self[n]) for n in self.store]

    def get(self, name: str, default=None):
        return self[name] if name in self.store else default

    def clear(self) -> None:
        self.store, self.where, self.run, self.left_pad = {}, {}, None, None

    def __repr__(self):
        return f"zoo.hooks.collect({', '.join(map(repr, self.patterns))})"


class patch:
    """Activation patching: replace activations by those `cache` recorded at the same token positions.

        model(corrupted, hooks=hooks.patch(cache))                         # every recorded point
        model(corrupted, hooks=hooks.patch(cache, "blocks.*.resid_post"))  # those matching a glob
        model(corrupted, hooks={"blocks.1.resid_pre": hooks.patch(cache)}) # as the hook of one point

    Row b, position p takes the recorded row b's position p (a recording of one row serves every
    row), whatever the left padding of either run; padding is left alone.
    """

    def __init__(self, cache: collect, names: str | list[str] | None = None):
        if not isinstance(cache, collect):
            raise TypeError(f"patch takes a zoo.hooks.collect that has recorded a run, not a {type(cache).__name__}")
        self.cache, self.names = cache, names

    def as_hooks(self) -> dict:
        recorded = list(self.cache.keys())
        if not recorded:
            raise ValueError(f"patch: {self.cache!r} has recorded nothing yet; run the model with it first")
        if self.names is None:
            return {name: self for name in recorded}
        chosen = []
        for pattern in [self.names] if isinstance(self.names, str) else self.names:
            matched = fnmatch.filter(recorded, pattern)
            if not matched:
                raise ValueError(f"patch: {pattern!r} matches no recorded point; recorded: {', '.join(recorded)}")
            chosen += matched
        return {name: self for name in chosen}

    def __repr__(self):
        return f"zoo.hooks.patch({self.cache!r}, names={self.names!r})"

    def __call__(self, x, ctx):
        if ctx.name not in self.cache:
            raise ValueError(f"patch: nothing was recorded at {ctx.name}; recorded: {', '.join(self.cache) or 'nothing'}")
        recorded = self.cache[ctx.name]
        if ctx.shard is not None and recorded.shape[ctx.shard[0]] == ctx.shard[3] != x.shape[ctx.shard[0]]:
            recorded = ctx.local(recorded, ctx.shard[0], x.shape[ctx.shard[0]])  # gathered: our slice
        seq_dim, batch = _seq_dim(ctx.name), x.shape[0]
        other = [d for d in range(x.dim()) if d not in (0, seq_dim) and not (ctx.point == "pattern" and d == 3)]
        if recorded.shape[0] not in (1, batch) or any(recorded.shape[d] != x.shape[d] for d in other):
            raise ValueError(f"patch at {ctx.name}: the recording has shape {tuple(recorded.shape)}, this run "
                             f"{tuple(x.shape)} ({POINTS[ctx.point][0]}); they must agree but for the sequence")
        recorded = recorded.to(x.device).expand(batch, *recorded.shape[1:])
        pos = ctx.positions.to(x.device).expand(batch, -1)  # (batch, seq)
        real = pos >= 0
        source = _lookup(self.cache.positions(ctx.name).to(x.device), pos)  # where each position lies in the recording
        missing = real & (source < 0)
        if missing.any():
            row = int(missing.any(1).nonzero()[0])
            have = self.cache.positions(ctx.name)[row if self.cache.positions(ctx.name).shape[0] > 1 else 0]
            raise ValueError(f"patch at {ctx.name}: this run needs positions {_spans(pos[row][missing[row]].tolist())} "
                             f"(row {row}), which the recording does not cover (it covers positions "
                             f"{_spans(have[have >= 0].tolist()) or 'none'})")
        piece = _take(recorded, seq_dim, source.clamp(min=0))
        if ctx.point == "pattern":  # the keys, by position too (the recording's keys are its cache's slots from 0)
            pad = self.cache.left_pad.to(x.device)[:, None] if self.cache.left_pad is not None else 0
            keys = torch.arange(x.shape[-1], device=x.device)[None] - (ctx.left_pad.to(x.device)[:, None]
                                                                       if ctx.left_pad is not None else 0)
            keys = keys.expand(batch, -1)
            key_source = keys + pad
            ok = (keys >= 0) & (key_source < piece.shape[-1])
            piece = _take(piece, 3, key_source.clamp(0, piece.shape[-1] - 1)) * ok[:, None, None, :]
        shape = [1] * x.dim()
        shape[0], shape[seq_dim] = real.shape
        return torch.where(real.view(shape), piece.to(x.dtype), x)


def _lookup(recorded: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """recorded (1 or batch, L) positions, wanted (batch, seq) positions -> (batch, seq) the index of each
    wanted position in its row of the recording (the latest, if recorded twice), -1 where it was not."""
    recorded = recorded.expand(wanted.shape[0], -1)
    width = int(max(recorded.max(), wanted.max())) + 2  # positions 0..width-2, and a bin for padding
    table = torch.full((wanted.shape[0], width), -1, dtype=torch.long, device=wanted.device)
    index = torch.arange(recorded.shape[1], device=wanted.device).expand_as(recorded)
    table.scatter_reduce_(1, torch.where(recorded >= 0, recorded, width - 1), index, reduce="amax")
    table[:, -1] = -1
    return table.gather(1, torch.where(wanted >= 0, wanted, width - 1))


def _spans(positions: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0..2, 5, 7..8'."""
    out, ordered = [], sorted(set(positions))
    for _, run in itertools.groupby(enumerate(ordered), lambda p: p[1] - p[0]):
        run = [p for _, p in run]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}")
    return ", ".join(out)


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """t's entries along `dim` at index (batch, n), per row: the result has n entries along dim."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    size = list(t.shape)
    size[dim] = index.shape[1]
    return t.gather(dim, index.view(shape).expand(size))

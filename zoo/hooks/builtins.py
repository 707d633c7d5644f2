"""The built-in hooks: replace, add, ablate, collect and patch. Each takes global head and neuron indices and
full-width values, and handles tensor-parallel slices (Context.shard); positions are each row's own."""
import fnmatch
import itertools
from typing import Callable

import torch

from zoo.hooks.grads import Gradients, joined
from zoo.hooks.points import HEAD_POINTS, NEURON_POINTS, POINTS, Context, _seq_dim


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
        self.keeps_input = not callable(value)  # (fn(x, ctx) is the user's, which might change x in place)

    def __call__(self, x, ctx):
        new = self.value(x, ctx) if callable(self.value) else self.value
        new = _fit(new, x, ctx, "replace")
        return torch.where(_selected(x, ctx, self.rule), new, x)

    def __repr__(self):
        return f"zoo.hooks.replace(positions={self.positions!r})"


class add:
    """Add scale * vector to the activation at `positions` (steering / activation addition)."""
    keeps_input = True  # (returns a new tensor: collect's records need no copy; see collect)

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

    keeps_input = True

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
    partway through a run. gather=True keeps full tensors under tensor parallelism. Records are the forward's
    own tensors, detached (zoo's forward never changes one in place; copies cost more than the forward), each
    its own: one held under two names (resid_post, the next resid_pre) is copied, and so is one about to go to
    a hook not marked `keeps_input` (it may edit in place; zoo's own are marked). copy=True copies all.
    Reads like a dict: `cache[name]`, `in`, keys(), values(), items(), len().
    grads=True also records d(metric)/d(activation) once `metric.backward()` has run: `cache.grads[name]`,
    in the same layout (zoo/hooks/grads.py).
    """

    def __init__(self, *patterns: str, gather: bool = False, grads: bool = False, copy: bool = False):
        for p in patterns:
            if not isinstance(p, str):
                raise TypeError(f"collect takes hook point names (globs allowed), not {p!r}")
        self.patterns, self.gather, self.copy = patterns, gather, copy
        self.store: dict[str, list[torch.Tensor]] = {}
        self.storages: set[int] = set()  # the storages of the records this run that are references
        self.where: dict[str, list[torch.Tensor]] = {}  # name -> the positions of each recorded part
        self.run, self.left_pad = None, None
        self.grads = Gradients(self) if grads else None  # filled by metric.backward() (zoo/hooks/grads.py)

    def as_hooks(self) -> dict:
        return {p: self._record for p in self.patterns}

    def _record(self, x, ctx):
        if ctx.run != self.run:
            self.store, self.where, self.run, self.storages = {}, {}, ctx.run, set()
            self.left_pad = None if ctx.left_pad is None else ctx.left_pad.clone()
            if self.grads is not None:
                self.grads.clear()
        kept = (ctx.gather(x) if self.gather else x).detach()
        storage = kept.untyped_storage().data_ptr()
        if self.copy or storage in self.storages:
            kept = kept.clone()
        else:
            self.storages.add(storage)
            ctx.held.setdefault(storage, []).append(lambda: self._own_copy(ctx.name, kept, storage))
        self.store.setdefault(ctx.name, []).append(kept)
        self.where.setdefault(ctx.name, []).append(ctx.positions)
        return None if self.grads is None else self.grads.watch(x, ctx, kept.shape)

    _record.keeps_input = True

    def _own_copy(self, name: str, kept: torch.Tensor, storage: int) -> None:
        """Replace the record `kept` of name by a copy (a hook that may change it in place is about to run)."""
        parts = self.store.get(name, [])
        for i, part in enumerate(parts):
            if part is kept:  # (a record already joined by a read is a copy)
                parts[i] = kept.clone()
        self.storages.discard(storage)

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
        if len(parts) > 1:
            self.store[name] = [joined(parts, name)]
        return self.store[name][0]

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
        if self.grads is not None:
            self.grads.clear()

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

    keeps_input = True

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

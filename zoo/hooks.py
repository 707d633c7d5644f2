"""Hook points: read, record, replace, add to or ablate any activation, passed to the forward.

    logits = model(tokens, hooks={"blocks.3.resid_post": fn, "blocks.*.z": zoo.hooks.ablate(heads=[5])})
    def fn(x, ctx): ...      # return a tensor to replace x, or None to only read it
    cache = zoo.hooks.collect("blocks.*.resid_post", "blocks.2.pattern")
    model(tokens, hooks=cache); cache["blocks.2.pattern"]     # (batch, heads, q, k)

The same names on every family (see POINTS and the README's table). Names may be globs and are
expanded once per forward; an unknown name is an error that lists the nearest valid ones. Several
hooks on one point run in the order given (a list of hook sets is read left to right). With no
hooks the models pay one `if hooks` test per point: no modules, no dictionaries.

Under tensor parallelism q, k, v, pattern and z hold this rank's heads and mlp_pre/mlp_post its
hidden units: `ctx.shard` says which slice of the full tensor `x` is, `ctx.gather(x)` returns the
full tensor. The built-in hooks take global head and neuron indices and handle the slices.
"""
import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch

from zoo import parallel

# name -> (shape, meaning). In shapes: b batch, s new tokens, S all positions so far, h heads,
# kvh key/value heads, d head_dim, D model dim, F hidden units of the MLP, V vocabulary.
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
    "ln_final": ("b s D", "after the final norm (and project_out, OPT): the input of the unembedding"),
    "logits": ("b s V", "the output logits"),
}
LAYER_POINTS = [p for p in POINTS if p not in ("embed", "ln_final", "logits")]
HEAD_POINTS = {"q": 2, "k": 2, "v": 2, "z": 2, "pattern": 1}  # which dim holds heads
NEURON_POINTS = {"mlp_pre": 2, "mlp_post": 2}


@dataclass
class Context:
    """Where a hook fires. shard: (dim, start, stop, full) when x is a slice of a tensor split across ranks."""
    name: str
    layer: int | None
    start_pos: int  # absolute position of x[:, 0] (for pattern: of the first query)
    step: int  # forward number within a generation: 0 is the prefill
    rank: int = 0
    world_size: int = 1
    shard: tuple | None = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The full tensor of which x is this rank's slice (x itself when it is not split)."""
        if self.shard is None or self.world_size == 1:
            return x
        return parallel.all_gather(x, dim=self.shard[0])

    def local(self, indices) -> list[int]:
        """Global head/neuron indices -> indices into this rank's slice (those it holds)."""
        if self.shard is None:
            return list(indices)
        _, start, stop, _ = self.shard
        return [i - start for i in indices if start <= i < stop]


def names(model) -> list[str]:
    """Every hook point of a model, in the order they fire."""
    out = ["embed"]
    for i, block in enumerate(model.blocks):
        out += [f"blocks.{i}.{p}" for p in LAYER_POINTS if p != "resid_mid" or not getattr(block, "parallel_residual", False)]
    return out + ["ln_final", "logits"]


class Hooks:
    """The hooks of one forward, resolved against a model's names: (layer, point) -> functions."""

    def __init__(self, spec, model, start_pos: int, step: int):
        valid = names(model)
        self.table: dict[tuple, list[Callable]] = {}
        for pattern, fn in _items(spec):
            matched = fnmatch.filter(valid, pattern)
            if not matched:
                raise KeyError(_unknown(pattern, valid, model))
            for name in matched:
                self.table.setdefault(_key(name), []).append(fn)
        self.start_pos, self.step = start_pos, step
        self.rank, self.world = parallel.rank(), parallel.world_size()

    def wants(self, layer: int | None, point: str) -> bool:
        return (layer, point) in self.table

    def __call__(self, layer: int | None, point: str, x: torch.Tensor) -> torch.Tensor:
        fns = self.table.get((layer, point))
        if not fns:
            return x
        ctx = Context(point if layer is None else f"blocks.{layer}.{point}", layer, self.start_pos, self.step,
                      self.rank, self.world, self._shard(layer, point, x))
        for fn in fns:
            out = fn(x, ctx)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"hook on {ctx.name} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
                x = out
        return x

    def _shard(self, layer, point, x):
        if self.world == 1 or (point not in HEAD_POINTS and point not in NEURON_POINTS):
            return None
        dim = HEAD_POINTS.get(point, NEURON_POINTS.get(point))
        local = x.shape[dim]
        return dim, self.rank * local, (self.rank + 1) * local, local * self.world


def resolve(spec, model, cache) -> Hooks | None:
    """The Hooks of one forward (None when there are none: the models then skip every hook point)."""
    if not spec:
        return None
    return Hooks(spec, model, cache.pos if cache is not None else 0, cache.steps if cache is not None else 0)


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
    out = []
    for pattern, fn in spec.items():
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


# ---- built-in hooks ---------------------------------------------------------------------------

def _rows(x: torch.Tensor, ctx: Context, positions) -> torch.Tensor | bool:
    """Which rows of x (along its sequence dim) have an absolute position in `positions` (None: all)."""
    if positions is None:
        return True
    seq_dim = _seq_dim(ctx.name)
    seq = x.shape[seq_dim]
    if isinstance(positions, slice):
        positions = range(*positions.indices(ctx.start_pos + seq))
    elif isinstance(positions, int):
        positions = [positions]
    pos = torch.arange(ctx.start_pos, ctx.start_pos + seq)
    shape = [1] * x.dim()
    shape[seq_dim] = seq
    return torch.isin(pos, torch.as_tensor(list(positions), dtype=torch.long)).view(shape).to(x.device)


def replace(value, positions=None):
    """Replace the activation (at `positions`, absolute; all by default) by a tensor or by fn(x, ctx)."""
    def hook(x, ctx):
        new = value(x, ctx) if callable(value) else torch.as_tensor(value, dtype=x.dtype, device=x.device)
        return torch.where(_rows(x, ctx, positions), new.expand_as(x), x)
    return hook


def add(vector, positions=None, scale: float = 1.0):
    """Add scale * vector to the activation at `positions` (steering / activation addition)."""
    def hook(x, ctx):
        v = scale * torch.as_tensor(vector, dtype=x.dtype, device=x.device)
        return torch.where(_rows(x, ctx, positions), x + v, x)
    return hook


def ablate(heads=None, neurons=None, mode: str = "zero"):
    """Zero (or mean-) ablate heads (on q/k/v/z/pattern) or neurons (on mlp_pre/mlp_post), by global index.

    mode "mean" replaces them by their mean over the batch and positions of this forward.
    """
    if (heads is None) == (neurons is None):
        raise ValueError("ablate needs exactly one of heads=... or neurons=...")
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablate mode must be 'zero' or 'mean', not {mode!r}")
    indices = list(heads if heads is not None else neurons)

    def hook(x, ctx):
        point = ctx.name.rsplit(".", 1)[-1]
        dims = HEAD_POINTS if heads is not None else NEURON_POINTS
        if point not in dims:
            raise ValueError(f"ablate({'heads' if heads is not None else 'neurons'}=...) cannot apply to {ctx.name}; "
                             f"it applies to {', '.join(dims)}")
        local = ctx.local(indices)
        if not local:
            return None
        x = x.clone()
        index = [slice(None)] * x.dim()
        index[dims[point]] = local
        if mode == "zero":
            x[tuple(index)] = 0
        else:  # the mean over the batch and the sequence (queries for pattern)
            x[tuple(index)] = x.mean(dim=(0, _seq_dim(ctx.name)), keepdim=True).expand_as(x)[tuple(index)]
        return x
    return hook


class collect:
    """Record activations: `cache = collect("blocks.*.resid_post")`, `model(tokens, hooks=cache)`, `cache[name]`.

    During generation each decode step is concatenated along the sequence (pattern: along the
    queries, with the keys padded with zeros to the longest). gather=True keeps full tensors under
    tensor parallelism. Recorded tensors are detached copies.
    """

    def __init__(self, *patterns: str, gather: bool = False):
        self.patterns, self.gather = patterns, gather
        self.store: dict[str, list[torch.Tensor]] = {}

    def as_hooks(self) -> dict:
        return {p: self._record for p in self.patterns}

    def _record(self, x, ctx):
        x = (ctx.gather(x) if self.gather else x).detach().clone()
        self.store.setdefault(ctx.name, []).append(x)

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = self.store[name]
        if len(parts) == 1:
            return parts[0]
        if name.endswith(".pattern"):  # (b, h, q, S): pad the key dim to the longest before joining
            longest = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, longest - p.shape[-1])) for p in parts]
        return torch.cat(parts, dim=_seq_dim(name))

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def keys(self):
        return self.store.keys()

    def clear(self) -> None:
        self.store.clear()


def patch(cache: collect, names: str | list[str] | None = None):
    """Activation patching: replace each activation by the one `cache` recorded at the same positions.

    names: which recorded points to patch (globs allowed); default all of them.
    """
    chosen = list(cache.keys()) if names is None else [n for pat in ([names] if isinstance(names, str) else names)
                                                       for n in fnmatch.filter(list(cache.keys()), pat)]

    def hook(x, ctx):
        recorded = cache[ctx.name]
        if ctx.shard is not None and recorded.shape[ctx.shard[0]] == ctx.shard[3]:  # recorded gathered: take our slice
            recorded = recorded.narrow(ctx.shard[0], ctx.shard[1], ctx.shard[2] - ctx.shard[1])
        seq_dim = _seq_dim(ctx.name)
        piece = recorded.narrow(seq_dim, ctx.start_pos, x.shape[seq_dim])
        if ctx.name.endswith(".pattern"):
            piece = piece[..., : x.shape[-1]]
        return piece.to(x.dtype)

    return {name: hook for name in chosen}

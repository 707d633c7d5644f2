"""Activation patching sweeps: the corrupted run with one clean activation patched in, for every layer and
position, every head or every block, the metric of each patched run.

    sweep = patch_sweep(model, clean, corrupted, metric, point="resid_pre", by="layer,position")  # (layers, seq)
    heads = patch_sweep(model, clean, corrupted, metric, by="head")                                # (layers, heads)

clean and corrupted are (batch, seq) token ids of the same shape (prompts aligned position by position,
no padding); metric(logits) -> a scalar tensor, of logits (batch, seq, vocab) as model(corrupted) gives.
Each entry is metric(the corrupted run with that activation taken from the clean run), as looping
zoo.hooks.patch / replace by hand would give (tests/test_sweep.py), but the patched runs share work:

- the blocks before the patched layer are the corrupted run's in every run patched at that layer: the
  corrupted run is made once, and each run starts at the patched layer from its recorded resid_pre
  (Decoder.forward_from);
- attention is causal, so a run patched at position p is the corrupted run at positions before p, in
  every layer: those are not recomputed, their keys and values come from the corrupted run's KV cache
  and their logits from its output;
- the runs of one layer are stacked along the batch, `batch` runs per forward.

`by`: "layer,position" (layers, seq) patches the point at one position; "layer" (layers,) at every
position; "head" (layers, heads) one head (or, for mlp_pre/mlp_post, use "neuron") at every position;
"head,position" (layers, seq, heads); "neuron" (layers, F); "block" (3, layers, seq): resid_pre, attn_out
and mlp_out by layer and position, as TransformerLens's get_act_patch_block_every. Head points are q, k,
v and z (k and v count key/value heads); neuron points mlp_pre and mlp_post. Heads and neurons are
global indices under tensor parallelism, where every rank returns the same sweep.
"""
import sys
from dataclasses import dataclass

import torch

from zoo import hooks
from zoo.checks import shown
from zoo.console import say
from zoo.hooks.points import HEAD_POINTS, LAYER_POINTS, NEURON_POINTS

BYS = ("layer,position", "layer", "head", "head,position", "neuron", "block")
BLOCK_POINTS = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Run:
    """One patched run: the point of `layer`, at `position` (None: every position), unit (a head or neuron's
    global index; None: the whole point), and where its metric goes in the result."""
    layer: int
    point: str
    position: int | None
    unit: int | None
    where: tuple


def patch_sweep(model, clean: torch.Tensor, corrupted: torch.Tensor, metric, point: str | None = None,
                by: str = "layer,position", batch: int = 16, progress: bool = False) -> torch.Tensor:
    """The metric of each patched run, shaped by `by` (module docstring); float32 on the CPU."""
    check_pair(model, clean, corrupted)
    runs, shape = plan(model, point, by, clean.shape[1])
    return sweep(model, clean, corrupted, metric, runs, shape, batch, progress)


def check_pair(model, clean, corrupted) -> None:
    for name, t in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
            raise TypeError(f"{name} must be a (batch, seq) tensor of token ids, not {shown(t)}")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have the same shape: "
                         f"patching takes each position's activation from the same position of the other run")


def plan(model, point: str | None, by: str, seq: int) -> tuple[list[Run], tuple]:
    """The runs of a sweep and the result's shape."""
    if by not in BYS:
        raise ValueError(f"by={by!r}: choose one of {', '.join(map(repr, BYS))}")
    layers = range(len(model.blocks))
    if by == "block":
        if point is not None:
            raise ValueError(f"by='block' patches {', '.join(BLOCK_POINTS)}; leave point unset")
        return [Run(i, p, t, None, (k, i, t)) for k, p in enumerate(BLOCK_POINTS) for i in layers
                for t in range(seq)], (3, len(layers), seq)
    point = point or ("z" if by.startswith("head") else "mlp_post" if by == "neuron" else "resid_pre")
    if point not in LAYER_POINTS or point == "pattern":
        raise ValueError(f"point={point!r}: patch_sweep takes one of {', '.join(p for p in LAYER_POINTS if p != 'pattern')}")
    if point == "resid_mid" and any(getattr(b, "parallel_residual", False) for b in model.blocks):
        raise ValueError("point='resid_mid': this model uses a parallel residual and has no resid_mid")
    if by == "layer,position":
        return [Run(i, point, t, None, (i, t)) for i in layers for t in range(seq)], (len(layers), seq)
    if by == "layer":
        return [Run(i, point, None, None, (i,)) for i in layers], (len(layers),)
    units = _units(model, point, by)
    if by == "head,position":
        return [Run(i, point, t, u, (i, t, u)) for i in layers for t in range(seq) for u in range(units)], \
            (len(layers), seq, units)
    return [Run(i, point, None, u, (i, u)) for i in layers for u in range(units)], (len(layers), units)


def _units(model, point: str, by: str) -> int:
    c = model.config
    if by == "neuron":
        if point not in NEURON_POINTS:
            raise ValueError(f"by='neuron' patches {', '.join(NEURON_POINTS)}, not {point!r}")
        return c.hidden_dim
    if point not in HEAD_POINTS:
        raise ValueError(f"by={by!r} patches heads of {', '.join(p for p in HEAD_POINTS if p != 'pattern')}, "
                         f"not {point!r}")
    return c.n_kv_heads if point in ("k", "v") else c.n_heads


@torch.no_grad()
def sweep(model, clean, corrupted, metric, runs: list[Run], shape: tuple, batch: int, progress: bool) -> torch.Tensor:
    """Every run's metric, the work the runs share made once (module docstring)."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch={batch!r}: how many patched runs go in one forward, an int >= 1")
    rows, seq = corrupted.shape
    clean_acts = hooks.collect(*sorted({f"blocks.{r.layer}.{r.point}" for r in runs}))
    model(clean, hooks=clean_acts)
    entering = hooks.collect(*sorted({f"blocks.{r.layer}.resid_pre" for r in runs}))
    kv = model.new_cache(rows, seq)
    base = model(corrupted, kv, hooks=entering)  # one forward: every layer's keys and values
    out, done, total = torch.empty(shape), 0, len(runs)
    for group in _groups(runs, batch):
        layer, start = group[0].layer, min(r.position or 0 for r in group)
        if any(r.position is None for r in group):
            start = 0
        n = len(group)
        h = entering[f"blocks.{layer}.resid_pre"][:, start:].repeat(n, 1, 1)
        cache = _prefix(model, kv, start, layer, n) if start else None
        patcher = Patcher(group, clean_acts, rows, start)
        logits = model.forward_from(layer, h, corrupted[:, start:].repeat(n, 1), cache,
                                    hooks={name: patcher for name in patcher.names})
        for j, r in enumerate(group):
            mine = logits[j * rows:(j + 1) * rows]
            out[r.where] = float(metric(torch.cat([base[:, :start], mine], dim=1) if start else mine))
        done += n
        if progress:
            say(f"\rpatch_sweep: {done}/{total} patched runs", end="\n" if done == total else "", file=sys.stderr,
                flush=True)
    return out


def _groups(runs: list[Run], batch: int):
    """Runs of one layer, in order of position, `batch` at a time: a forward's runs start at one layer."""
    by_layer: dict[int, list[Run]] = {}
    for r in runs:
        by_layer.setdefault(r.layer, []).append(r)
    for layer in sorted(by_layer):
        ordered = sorted(by_layer[layer], key=lambda r: -1 if r.position is None else r.position)
        for a in range(0, len(ordered), batch):
            yield ordered[a:a + batch]


def _prefix(model, kv, start: int, layer: int, n: int):
    """A cache of n copies of the corrupted run's keys and values before slot `start`, from block `layer` on."""
    cache = model.new_cache(kv.batch * n, kv.max_len)
    for i in range(layer, len(model.blocks)):
        cache.keys[i][:, :, :start] = kv.keys[i][:, :, :start].repeat(n, 1, 1, 1)
        cache.values[i][:, :, :start] = kv.values[i][:, :, :start].repeat(n, 1, 1, 1)
    cache.seek(start)
    return cache


class Patcher:
    """The hook of a group of runs: rows j*rows..(j+1)*rows take run j's clean activation (its point, position,
    unit), the other rows are left as they are."""
    keeps_input = True  # (a new tensor: see zoo.hooks.collect)

    def __init__(self, group: list[Run], clean: hooks.collect, rows: int, start: int):
        self.group, self.clean, self.rows, self.start = group, clean, rows, start
        self.names = sorted({f"blocks.{r.layer}.{r.point}" for r in group})

    def __call__(self, x, ctx):
        new = self.clean[ctx.name][:, self.start:].repeat(len(self.group), *[1] * (x.dim() - 1))
        mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        for j, r in enumerate(self.group):
            if f"blocks.{r.layer}.{r.point}" != ctx.name:
                continue
            index = [slice(j * self.rows, (j + 1) * self.rows), slice(None) if r.position is None else
                     r.position - self.start]
            if r.unit is not None:
                unit = _local_unit(r.unit, ctx)
                if unit is None:
                    continue  # another rank's head or neuron
                index.append(unit)
            mask[tuple(index)] = True
        return torch.where(mask, new.to(x.device), x)


def _local_unit(unit: int, ctx) -> int | None:
    """A global head or neuron index -> this rank's index of it along x's unit dim, or None on another rank."""
    if ctx.shard is None:
        return unit
    _, start, stop, _ = ctx.shard
    return unit - start if start <= unit < stop else None

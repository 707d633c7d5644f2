"""Streaming activation statistics: per MLP neuron (mlp_post) and per attention head dimension (z), over
windows of text, accumulated in float64 without keeping the activations.

    python -m zoo stats tiny-llama --texts code.txt --tokens 100000 --points mlp_post z --out stats.safetensors
    windows = zoo.stats.text_windows(model, "code.txt", tokens=100_000, ctx=512)
    stats = zoo.stats.collect_stats(model, windows, points=("mlp_post", "z"), batch=8)
    stats["mlp_post.mean_abs"]         # (n_layers, d_mlp) float64; z's: (n_layers, n_heads, d_head)
    zoo.stats.save(stats, "stats.safetensors"); zoo.stats.load("stats.safetensors")

Per unit, over every position counted (each row's real tokens, as the hooks count them: padding never
counts), with x the unit's activation:
    count      how many positions
    mean       sum x / count              std        sqrt(sum x^2 / count - mean^2) (population)
    mean_abs   sum |x| / count            mean_sqrt  sum sqrt|x| / count
    pos_mass   sum max(x, 0) / count      neg_mass   sum min(x, 0) / count (so mean = pos_mass + neg_mass)
    freq_pos   how often x > 0
The sums are float64 (each activation cast to float64 first), kept per unit on the model's device.
Under tensor parallelism each rank sums its own heads and hidden units (zoo/hooks' shards) and the
results are gathered to global indices, the MLP's padding past d_mlp cut: the same numbers as one process.

A text file is one text; a .jsonl file holds one {"text": ...} per line (zoo.activations' prompts).
Each text is encoded with BOS first and cut into consecutive windows of `ctx` tokens; windows are
taken in order until `tokens` tokens are in, and run in left-padded batches.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from zoo import parallel
from zoo.checks import integer, read_text, require
from zoo.console import Progress, say
from zoo.generate import left_padded

FORMAT, VERSION = "zoo-stats", 1
POINTS = ("mlp_post", "z")  # the units: neurons (batch, seq, d_mlp) and head dims (batch, seq, n_heads, d_head)
CHUNK = 256  # rows summed at a time (benchmarks/stats.py measures the cost)
STATS = ("count", "mean", "std", "mean_abs", "mean_sqrt", "pos_mass", "neg_mass", "freq_pos")


def read_texts(path: str | os.PathLike) -> list[str]:
    """A .jsonl file's texts (one {"text": ...} per line), or a text file's whole contents as one text."""
    if str(path).endswith(".jsonl"):
        from zoo.activations import read_prompts
        return [p.text for p in read_prompts(path)]
    return [read_text(path)]


def text_windows(model, path: str | os.PathLike, tokens: int | None = None, ctx: int | None = None) -> list[list[int]]:
    """The token windows of a file (see the module docstring): at most `tokens` tokens in all (None: every
    token), each window at most `ctx` long (default: the model's context) and at least 2."""
    context = model.config.max_seq_len
    ctx = context if ctx is None else integer("ctx", ctx, low=2, high=context)
    tokens = None if tokens is None else integer("tokens", tokens, low=2)
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer to read the texts with")
    out, total = [], 0
    for text in read_texts(path):
        ids = model.tokenizer.encode(text, bos=True)
        for begin in range(0, len(ids), ctx):
            window = ids[begin:begin + ctx][: None if tokens is None else tokens - total]
            if len(window) < 2:
                break
            out.append(window)
            total += len(window)
            if tokens is not None and total >= tokens:
                return out
    if not out:
        raise ValueError(f"{path}: no window of 2 tokens or more")
    return out


def batches(windows: list[list[int]], batch: int, device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(tokens, left_pad or None) per batch of `batch` windows, left-padded (zoo.generate.left_padded)."""
    out = []
    for first in range(0, len(windows), batch):
        tokens, left_pad = left_padded(windows[first:first + batch], device)
        out.append((tokens, left_pad if left_pad.any() else None))
    return out


class Accumulator:
    """Hooks that sum each unit's activation statistics over every forward they see (this rank's units).

        acc = Accumulator(("mlp_post", "z")); model(tokens, hooks=acc); ...; acc.result()  # -> {key: tensor}
    """

    def __init__(self, points=POINTS):
        for p in points:
            require(p in POINTS, "points", points, f"point names from {', '.join(POINTS)}")
        self.points = tuple(points)
        self.sums: dict[tuple[str, int], list[torch.Tensor]] = {}  # (point, layer) -> sums of [1, x, x^2, |x|, x > 0, sqrt|x|]
        self.shards: dict[str, tuple[int, int]] = {}  # point -> (unit dim of the sums, full size) under TP
        self.buffers: dict[tuple, torch.Tensor] = {}  # (units' shape, device) -> (2, CHUNK, *units) float64

    def as_hooks(self) -> dict:
        return {f"blocks.*.{p}": self._add for p in self.points}

    def _add(self, x: torch.Tensor, ctx) -> None:
        if ctx.left_pad is None:
            rows = x.flatten(0, 1)  # (batch * seq, *units)
        else:
            rows = x[(ctx.positions >= 0).expand(x.shape[0], -1)]  # the real positions only
        key = (ctx.point, ctx.layer)
        if key not in self.sums:
            self.sums[key] = [torch.zeros(rows.shape[1:], dtype=torch.float64, device=rows.device) for _ in range(6)]
        n, s1, s2, s_abs, npos, sqrt = self.sums[key]
        n += rows.shape[0]
        for chunk in rows.split(CHUNK):  # plain sums over dim 0: torch's norms along it were 10x slower
            a, b = self._float64(chunk)  # (rows, *units): chunk in float64, and scratch of that shape
            s1 += a.sum(0)
            s2 += torch.mul(a, a, out=b).sum(0)
            s_abs += torch.abs(a, out=b).sum(0)
            npos += (chunk > 0).sum(0)
            sqrt += b.sqrt_().sum(0)
        if ctx.shard is not None:
            self.shards[ctx.point] = (ctx.shard[0] - 2, ctx.shard[3])

    _add.keeps_input = True  # (reads x only: see zoo.hooks.collect)

    def _float64(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk in float64, scratch of its shape), in buffers kept for the next (a fresh allocation of this size
        would fault its pages in)."""
        buffer = self.buffers.get((chunk.shape[1:], chunk.device))
        if buffer is None:
            buffer = self.buffers[chunk.shape[1:], chunk.device] = torch.empty(2, CHUNK, *chunk.shape[1:],
                                                                               dtype=torch.float64, device=chunk.device)
        return buffer[0, :chunk.shape[0]].copy_(chunk), buffer[1, :chunk.shape[0]]

    def result(self) -> dict[str, torch.Tensor]:
        """{"{point}.{stat}": (n_layers, *units) float64 on the CPU}, every rank's units gathered."""
        require(bool(self.sums), "Accumulator", self, "hooks that have seen a forward (none ran with them)")
        out = {}
        for point in self.points:
            layers = sorted(layer for p, layer in self.sums if p == point)
            totals = [torch.stack([self.sums[point, layer][i] for layer in layers]) for i in range(6)]
            if point in self.shards and parallel.world_size() > 1:
                dim, full = self.shards[point]
                totals = [parallel.all_gather(t, dim=dim + 1).narrow(dim + 1, 0, full) for t in totals]
            n, s1, s2, s_abs, npos, sqrt = [t.cpu() for t in totals]
            count, pos = n.clamp(min=1), (s_abs + s1) / 2  # sum max(x, 0) = (sum |x| + sum x) / 2
            mean = s1 / count
            derived = {"count": n, "mean": mean, "std": (s2 / count - mean.square()).clamp(min=0).sqrt(),
                       "mean_abs": s_abs / count, "mean_sqrt": sqrt / count, "pos_mass": pos / count,
                       "neg_mass": (s1 - pos) / count, "freq_pos": npos / count}
            out.update({f"{point}.{stat}": derived[stat] for stat in STATS})
        return out


@torch.inference_mode()
def collect_stats(model, windows: list[list[int]], points=POINTS, batch: int = 8,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The statistics (module docstring) of `points` over the windows, run `batch` at a time; progress(tokens
    done, tokens) after each batch. Returns {"{point}.{stat}": (n_layers, *units) float64}."""
    batch = integer("batch", batch, low=1)
    require(isinstance(windows, list) and len(windows) > 0, "windows", windows, "a non-empty list of token-id lists")
    acc, device = Accumulator(points), next(model.parameters()).device
    total, done = sum(map(len, windows)), 0
    for tokens, left_pad in batches(windows, batch, device):
        model(tokens, left_pad=left_pad, hooks=acc)
        done += tokens.numel() - (0 if left_pad is None else int(left_pad.sum()))
        if progress is not None:
            progress(done, total)
    return acc.result()


def save(stats: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write statistics to a safetensors file (written beside and renamed into place); `metadata`: strings
    recorded with them (the checkpoint, the texts, the token count)."""
    from safetensors.torch import save_file
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    info = {"format": FORMAT, "version": str(VERSION), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file({k: v.contiguous() for k, v in stats.items()}, partial, metadata=info)
    os.replace(partial, path)
    return path


def load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Statistics written by `save`; an error naming the file for anything else."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta, stats = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise ValueError(f"{path}: not zoo activation statistics (format {FORMAT!r} version {VERSION})")
    return stats


# ---- python -m zoo stats -------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("ckpt")
    p.add_argument("--texts", required=True, help="a text file (one text) or .jsonl ({\"text\": ...} per line)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to read (default: %(default)s)")
    p.add_argument("--points", nargs="+", choices=POINTS, default=list(POINTS), help="default: mlp_post z")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--out", required=True, help="the statistics' .safetensors file")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def command(args) -> int:
    """python -m zoo stats: the statistics of --points over --texts, written to --out (rank 0 under torchrun)."""
    import zoo
    out = Path(args.out)
    if out.is_dir() or (out.exists() and not args.force):
        raise ValueError(f"{out}: {'is a directory' if out.is_dir() else 'exists (--force replaces it)'}; "
                         f"--out is the statistics' .safetensors file")
    integer("--batch", args.batch, low=1)
    model = zoo.load(args.ckpt, dtype=args.dtype, device=args.device)
    ctx = min(args.ctx, model.config.max_seq_len)
    windows = text_windows(model, args.texts, args.tokens, ctx)
    stats = collect_stats(model, windows, args.points, args.batch, Progress("stats", "tokens"))
    tokens = sum(map(len, windows))
    if parallel.rank() == 0:
        save(stats, out, {"checkpoint": str(zoo.find_checkpoint(args.ckpt).resolve()), "texts": str(args.texts),
                          "texts_sha256": hashlib.sha256(Path(args.texts).read_bytes()).hexdigest(),
                          "tokens": tokens, "ctx": ctx, "points": json.dumps(list(args.points))})
    shapes = ", ".join(f"{p} {tuple(stats[p + '.mean'].shape)}" for p in args.points)
    say(f"wrote {out}: {len(STATS)} statistics of {shapes} over {tokens:,} tokens in {len(windows):,} windows")
    return 0

"""Activation datasets: prompts in, chosen hook points' activations out, streamed to safetensors shards.

    python -m zoo collect tiny-llama --points "blocks.*.resid_post" --prompts prompts.jsonl --out acts/
    zoo.activations.write(model, "prompts.jsonl", "acts/", ["blocks.*.resid_post"], positions="last")
    index = zoo.activations.read_index("acts/")
    zoo.activations.rows("acts/", index["prompts"][0])        # {point: (kept positions, *shape)}

The prompts file is JSON lines: one object per line with "text" and an optional "id" (default: the
line number). The prompts run in batches, left-padded, with `zoo.hooks.collect` on the chosen
points (gathered to full width under tensor parallelism); of each prompt the `positions` kept are
positions in its own tokens as the hooks contract counts them (0 = its first token, BOS; padding
is never stored): "last", "all", or a slice "START:STOP[:STEP]" (or one position "N"), never
negative. Each kept position is one row of every point.

The directory:
    shard-00000.safetensors   per point, a (rows, *shape) tensor: the kept positions of whole batches
    index.json                the settings; per point its shape and the dtype; per shard its file,
                              rows and prompts; per prompt its id, line, tokens, kept positions, shard
                              and rows there; "complete" once every prompt is in

At most one shard (`shard_size` bytes, reached batch by batch, plus the last batch's rows) is held in
memory, twice while it is written (joined, then serialized by safetensors).
A shard is written beside its name and renamed into place, then the index is rewritten the same way,
so an interrupted run leaves whole shards and an index listing them: the same call again (same
settings, same prompts file) goes on after the last listed shard, and yields the same files as a run
never interrupted. Other settings are refused, naming what differs; a finished dataset is refused
unless force=True (which starts over). Under torchrun every rank runs the model and rank 0 writes.

Each batch is left-padded to a multiple of PAD_MULTIPLE tokens (the padding is masked and never stored),
so that thousands of prompts of varied lengths run at a few shapes: with a new length for every batch, a
bf16 forward on the CPU compiles and caches a GEMM kernel for each, and those long-lived allocations,
made between the forward's short-lived ones, fragment glibc's heap, whose peak then grows for hundreds of
batches (`python benchmarks/memory_shapes.py`; the README's Activation datasets has the figures).
"""
import fnmatch
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from zoo import hooks, parallel
from zoo.checks import floating_dtype, integer, require
from zoo.generate import left_padded

FORMAT, VERSION = "zoo-activations", 1
INDEX = "index.json"
SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
PAD_MULTIPLE = 16  # tokens: each batch's length is rounded up to a multiple of it (above)


class Prompt(NamedTuple):
    id: str | int
    text: str
    line: int  # in the prompts file, from 1


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a JSON-lines file; an error naming the file and line for a line that is not one."""
    prompts, seen = [], {}
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):  # lines as open() reads them
        if not line.strip():
            continue  # blank lines (a trailing newline) are no prompts
        where = f"{path} line {number}"
        try:
            item = json.loads(line.rstrip())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # a number of more digits than Python reads
            raise ValueError(f"{where}: {e}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError(f"{where}: expected an object with a \"text\" string (and an optional \"id\"), "
                             f"got {line.strip()[:60]}")
        id_ = item.get("id", number)
        if isinstance(id_, bool) or not isinstance(id_, (str, int)):
            raise ValueError(f"{where}: \"id\" is {json.dumps(id_)}: an id is a string or an int")
        if id_ in seen:
            raise ValueError(f"{where}: id {json.dumps(id_)} is already the id of line {seen[id_]}")
        seen[id_] = number
        prompts.append(Prompt(id_, item["text"], number))
    if not prompts:
        raise ValueError(f"{path}: no prompts (one JSON object with a \"text\" per line)")
    return prompts


def parse_size(text: str) -> int:
    """'512M', '1G', '64K' or a number of bytes -> bytes (K, M, G: powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", str(text), re.IGNORECASE)
    require(match is not None and int(match[1]) > 0, "shard_size", text,
            "a size in bytes > 0, or with K, M or G (powers of 1024): '512M', '1G'")
    return int(match[1]) * SIZE_UNITS[match[2].upper()]


def position_rule(spec: str) -> Callable[[int], list[int]]:
    """'last', 'all', 'START:STOP[:STEP]' or 'N' -> the positions kept of a prompt of n tokens."""
    accepted = "'last', 'all', a slice 'START:STOP[:STEP]' or one position 'N' (ints >= 0, STEP >= 1)"
    if spec == "last":
        return lambda n: [n - 1]
    if spec == "all":
        return lambda n: list(range(n))
    parts = str(spec).split(":")
    require(len(parts) <= 3 and all(p.strip().isdigit() or (p.strip() == "" and len(parts) > 1) for p in parts),
            "positions", spec, accepted)
    values = [int(p) if p.strip() else None for p in parts]
    if len(values) == 1:
        return lambda n: [values[0]] if values[0] < n else []
    require(len(values) < 3 or values[2] is None or values[2] >= 1, "positions", spec, accepted)
    chosen = slice(*values)
    return lambda n: list(range(n))[chosen]


def point_names(model, patterns: list[str]) -> list[str]:
    """The hook points the patterns (globs) name, in firing order; unknown names and attention patterns refused."""
    require(isinstance(patterns, (list, tuple)) and len(patterns) > 0 and all(isinstance(p, str) for p in patterns),
            "points", patterns, "a list of hook point names or globs, such as ['blocks.*.resid_post']", TypeError)
    try:
        hooks.resolve(hooks.collect(*patterns), model, None)  # an unknown name: its nearest valid ones
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    names = [n for n in hooks.names(model) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    pattern = [n for n in names if n.endswith(".pattern")]
    if pattern:
        raise ValueError(f"points {patterns}: {', '.join(pattern[:3])}{', ...' if len(pattern) > 3 else ''} have a "
                         f"key dimension as long as each prompt, which rows of one shape cannot hold; name points "
                         f"without .pattern (q and k give it back)")
    return names


def write(model, prompts: str | os.PathLike, out: str | os.PathLike, points: list[str], positions: str = "last",
          batch: int = 8, dtype: torch.dtype | str | None = None, shard_size: int | str = "512M",
          force: bool = False, checkpoint: str | None = None, stop_after_shards: int | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Run every prompt of the JSON-lines file `prompts` and write the activations at `points` to `out` (see above).

    dtype: what is stored (default: the model's). shard_size: bytes per shard (an int or '512M').
    checkpoint: recorded in the settings (a resumed run must name the same). stop_after_shards: return
    after writing that many shards in this call, as an interrupted run would (for tests; one process).
    progress(prompts done, prompts, note) after each batch. Returns `out`.
    """
    out = Path(out)
    names = point_names(model, points)
    keep = position_rule(positions)
    batch = integer("batch", batch, low=1)
    shard_size = parse_size(shard_size) if isinstance(shard_size, str) else integer("shard_size", shard_size, low=1)
    dtype = floating_dtype("dtype", dtype) if dtype is not None else next(model.parameters()).dtype
    items = read_prompts(prompts)
    ids = tokenized(model, items, prompts)
    settings = {"checkpoint": checkpoint, "prompts_sha256": hashlib.sha256(Path(prompts).read_bytes()).hexdigest(),
                "prompts": len(items), "points": list(points), "positions": positions, "batch": batch,
                "dtype": str(dtype).removeprefix("torch."), "shard_size": shard_size}
    index, error = None, None
    if parallel.rank() == 0:  # rank 0 decides; every rank raises the same error
        try:
            index = _start(out, settings, force)
        except (OSError, ValueError) as e:
            error = e
    index = parallel.rank0_outcome(index, error)
    writer = _Writer(out, index, dtype, shard_size) if parallel.rank() == 0 else None
    device = next(model.parameters()).device
    start, written = len(index["prompts"]), 0
    for first in range(start, len(items), batch):
        group = range(first, min(first + batch, len(items)))
        tokens, left_pad = left_padded([ids[i] for i in group], device, PAD_MULTIPLE, model.config.max_seq_len)
        record = hooks.collect(*names, gather=True)  # full width under tensor parallelism
        with torch.inference_mode():
            # last_only: the logits of every position are not needed (unless hooked: then they are computed)
            model(tokens, left_pad=left_pad if left_pad.any() else None, hooks=record, last_only=True)
        if writer is not None:
            for row, i in enumerate(group):
                kept = keep(len(ids[i]))
                slots = torch.tensor(kept, dtype=torch.long, device=device) + left_pad[row]  # the slot layout
                writer.add(items[i], len(ids[i]), kept, {n: record[n][row, slots] for n in names})
            last = group[-1] + 1 == len(items)
            if writer.full() or last:
                writer.flush(complete=last)  # the last one also marks the dataset complete
                written += 1
        if progress is not None:
            progress(group[-1] + 1, len(items), f", {len(index['shards'])} shards written")
        if stop_after_shards is not None and written >= stop_after_shards:
            return out
    return out


def tokenized(model, items: list[Prompt], path) -> list[list[int]]:
    """Each prompt's token ids (BOS first); an error naming the line of one longer than the model's context."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer to read the prompts with")
    context, out = model.config.max_seq_len, []
    for item in items:
        ids = model.tokenizer.encode(item.text, bos=True)
        if len(ids) > context:
            raise ValueError(f"{path} line {item.line}: {len(ids)} tokens do not fit the model's context of "
                             f"{context}")
        out.append(ids)
    return out


def _start(out: Path, settings: dict, force: bool) -> dict:
    """The index to go on from: a new one, or an unfinished dataset's with the same settings."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; the output is a directory")
    index_path = out / INDEX
    if index_path.exists():
        index = read_index(out)
        if force:
            for f in [index_path] + sorted(out.glob("shard-*.safetensors*")):
                f.unlink()
        elif index["complete"]:
            raise ValueError(f"{out}: holds a finished activation dataset ({len(index['prompts'])} prompts); "
                             f"--force (force=True) replaces it")
        else:
            differ = [f"{k}: {json.dumps(v)} here, {json.dumps(index['settings'].get(k))} in {index_path}"
                      for k, v in settings.items() if index["settings"].get(k) != v]
            if differ:
                raise ValueError(f"{out}: cannot resume an unfinished dataset with other settings ({'; '.join(differ)})"
                                 f"; run with the same ones, or --force (force=True) to start over")
            listed = {s["file"] for s in index["shards"]}
            for f in out.glob("shard-*.safetensors*"):
                if f.name not in listed:  # written after the last index: done again
                    f.unlink()
            return index
    elif out.exists() and any(out.iterdir()):
        found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ValueError(f"{out}: holds files that are not an activation dataset (no {INDEX}: {found}); "
                         f"choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": VERSION, "settings": settings, "points": {}, "dtype": settings["dtype"],
             "shards": [], "prompts": [], "complete": False}
    _save_index(out, index)
    return index


def read_index(directory: str | os.PathLike) -> dict:
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path}: not a zoo activation dataset index (format {FORMAT!r} version {VERSION})")
    return index


def _save_index(out: Path, index: dict) -> None:
    """index.json, written beside and renamed into place; one line per shard and per prompt."""
    head = {k: v for k, v in index.items() if k not in ("shards", "prompts", "complete")}
    text = json.dumps(head, indent=1)[:-2] + ",\n"
    for key in ("shards", "prompts"):
        text += f' "{key}": [' + ",".join(f"\n  {json.dumps(item)}" for item in index[key]) + "\n ],\n"
    text += f' "complete": {json.dumps(index["complete"])}\n}}\n'
    partial = out / (INDEX + ".partial")
    partial.write_text(text)
    os.replace(partial, out / INDEX)


class _Writer:
    """Rank 0's buffer: the rows of whole batches until they reach shard_size, then a shard and the index."""

    def __init__(self, out: Path, index: dict, dtype: torch.dtype, shard_size: int):
        self.out, self.index, self.dtype, self.shard_size = out, index, dtype, shard_size
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.entries, self.rows, self.bytes = [], 0, 0

    def add(self, item: Prompt, n_tokens: int, kept: list[int], values: dict[str, torch.Tensor]) -> None:
        """values: point -> (len(kept), *shape), one prompt's kept positions."""
        for name, x in values.items():
            x = x.to("cpu", self.dtype)
            self.index["points"].setdefault(name, {"shape": list(x.shape[1:])})
            self.buffer.setdefault(name, []).append(x)
            self.bytes += x.nbytes
        shard = len(self.index["shards"])
        self.entries.append({"id": item.id, "line": item.line, "tokens": n_tokens, "positions": kept,
                             "shard": shard, "rows": [self.rows, self.rows + len(kept)]})
        self.rows += len(kept)

    def full(self) -> bool:
        return self.bytes >= self.shard_size

    def flush(self, complete: bool = False) -> None:
        """Write the buffered rows as the next shard (if any), then the index that lists it."""
        from safetensors.torch import save_file
        if self.entries:
            name = f"shard-{len(self.index['shards']):05d}.safetensors"
            partial = self.out / (name + ".partial")
            joined = {n: torch.cat(self.buffer.pop(n)) for n in list(self.buffer)}  # each point's rows freed as joined
            save_file(joined, partial, metadata={"format": FORMAT})
            del joined
            os.replace(partial, self.out / name)
            self.index["shards"].append({"file": name, "rows": self.rows,
                                         "prompts": [len(self.index["prompts"]),
                                                     len(self.index["prompts"]) + len(self.entries)]})
            self.index["prompts"] += self.entries
            self.buffer, self.entries, self.rows, self.bytes = {}, [], 0, 0
        self.index["complete"] = complete
        _save_index(self.out, self.index)


def rows(directory: str | os.PathLike, prompt: dict) -> dict[str, torch.Tensor]:
    """One prompt's stored activations (an entry of read_index(directory)["prompts"]): point -> (kept, *shape)."""
    from safetensors import safe_open
    index = read_index(directory)
    start, stop = prompt["rows"]
    with safe_open(Path(directory) / index["shards"][prompt["shard"]]["file"], "pt") as f:
        return {name: f.get_slice(name)[start:stop] for name in index["points"]}

"""A tensor read later: the one protocol every checkpoint format hands the loader.

A lazy tensor has
    shape                the whole tensor's, in zoo's layout
    dtype                as stored
    where                "file: key", for error messages
    read(shard, dtype)   the whole tensor (shard None), or what one tensor-parallel rank holds of it
                         (files.Shard: part `index` of `parts` along `dim`), as a CPU tensor owning its
                         memory, floating point cast to `dtype` (None: as stored)

and reads nothing before `read`. Formats build one from these, and the loader never asks which:

    StoredTensor (files.py)  one tensor in one file
    Concat                   model-parallel parts concatenated along a dim (split weights)
    Reduce                   model-parallel copies of one tensor: their "sum", "mean" (in fp32), or "one"
    Chunk                    one of equal parts of another lazy tensor (a third of metaseq's fused qkv)
    Mapped                   f(another lazy tensor), for an f that acts on whole heads (HF's q/k
                             permutation, a fused query_key_value's q, k or v), so f(shard) = shard of f;
                             or (whole=True) an f that moves the split dim (GPT-2's transposed weights):
                             a shard is then cut from f of the whole tensor

`read_split(t, dim, index, parts)` is what the tensor-parallel rank `index` of `parts` holds: a shard,
zero-padded when `parts` does not divide the size (zoo/parallel/layers.py).

A `Checkpoint` is what a format's `open(directory)` returns: every tensor under zoo's parameter names.
"""
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from zoo.formats.files import CheckpointError, Shard


class Checkpoint(NamedTuple):
    family: str  # config.json's model_type: a key of zoo.models.FAMILIES
    config: object  # that family's config
    config_file: Path  # where the config was read (errors about the config name it)
    tensors: dict  # zoo parameter name -> lazy tensor
    tokenizer: object  # or None
    where: Callable[[str], str]  # zoo parameter name -> the format's own name for it, for error messages
    short: Callable[[str, tuple, tuple], str] | None = None  # (name, shape, expected): why a shape may fall short
    quantized: dict | None = None  # a zoo-quantized checkpoint's metadata (formats/quantized.py)


def read_split(t, dim: int, index: int, parts: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rank `index` of `parts`'s slice of lazy tensor `t` along `dim`, as the parallel layers hold it: size / parts
    rows, rounded up. When `parts` does not divide the size, the whole tensor is read and cut, and the
    last slice(s) end in zeros."""
    size = t.shape[dim]
    if size % parts == 0:
        return t.read(Shard(dim, index, parts), dtype)
    step = -(-size // parts)
    start = min(index * step, size)
    part = t.read(None, dtype).narrow(dim, start, min(step, size - start))
    return F.pad(part, [0, 0] * (part.dim() - dim - 1) + [0, step - part.shape[dim]]).contiguous()


def _empty(shape: tuple, dtype: torch.dtype | None, stored: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype if dtype is not None and stored.is_floating_point else stored)


class Concat:
    """Model-parallel parts of one tensor, concatenated along `dim`. A shard along `dim` reads only the
    parts its rows lie in; a shard along another dim reads that shard of every part."""

    def __init__(self, parts: list, dim: int):
        shapes = [tuple(p.shape) for p in parts]
        if any(len(s) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != dim)
               for s in shapes):
            raise CheckpointError(f"{parts[0].path.parent}: the model-parallel copies of {parts[0].key!r} have shapes "
                                  f"{shapes}, which do not concatenate along dim {dim}")
        self.parts, self.dim = parts, dim
        self.path, self.key, self.dtype, self.where = parts[0].path, parts[0].key, parts[0].dtype, parts[0].where
        self.shape = (*shapes[0][:dim], sum(s[dim] for s in shapes), *shapes[0][dim + 1:])

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        cat = self.dim
        shape = list(self.shape)
        if shard is not None and shard.dim != cat:  # e.g. an embedding saved split on dim 1, wanted on dim 0
            shape[shard.dim] //= shard.parts
            pieces = [lambda p=p: p.read(shard, dtype) for p in self.parts]
        else:  # the rows [start, end) along cat (all of them without a shard), from the parts they lie in
            step = self.shape[cat] // (shard.parts if shard else 1)
            start = shard.index * step if shard else 0
            end, pieces, offset = start + step, [], 0
            shape[cat] = step
            for p in self.parts:
                lo, hi = max(start, offset), min(end, offset + p.shape[cat])
                if lo < hi:
                    pieces.append(lambda p=p, lo=lo - offset, n=hi - lo: p.read(None, dtype).narrow(cat, lo, n))
                offset += p.shape[cat]
        out, at = _empty(tuple(shape), dtype, self.dtype), 0
        for piece in pieces:  # one part's piece in memory at a time, copied into its place
            t = piece()
            out.narrow(cat, at, t.shape[cat]).copy_(t)
            at += t.shape[cat]
        return out


class Reduce:
    """Model-parallel copies of one whole tensor, made one: "sum" or "mean" them (in fp32), or take "one"."""

    def __init__(self, parts: list, how: str):
        shapes = [tuple(p.shape) for p in parts]
        if any(s != shapes[0] for s in shapes):
            raise CheckpointError(f"{parts[0].path.parent}: the model-parallel copies of {parts[0].key!r} should be "
                                  f"whole, but have different shapes {shapes}")
        self.parts, self.how = parts, how
        self.path, self.key, self.dtype, self.where = parts[0].path, parts[0].key, parts[0].dtype, parts[0].where
        self.shape = shapes[0]

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.how == "one" or len(self.parts) == 1:
            return self.parts[0].read(shard, dtype)
        t = sum(p.read(None, torch.float32) for p in self.parts)
        t = (t / len(self.parts) if self.how == "mean" else t).to(dtype or self.dtype)
        return _cut(t, shard)


def _cut(t: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """A whole tensor's shard (a copy), or the tensor itself for none."""
    return t if shard is None else t.chunk(shard.parts, shard.dim)[shard.index].clone()


class Chunk:
    """Part `index` of `parts` equal parts of another lazy tensor along `dim`."""

    def __init__(self, of, dim: int, index: int, parts: int):
        if of.shape[dim] % parts:
            raise CheckpointError(f"{of.path}: {of.key!r} of shape {tuple(of.shape)} does not split into {parts} "
                                  f"equal parts along dim {dim}")
        self.of, self.dim, self.index, self.parts = of, dim, index, parts
        self.path, self.key, self.dtype, self.where = of.path, of.key, of.dtype, of.where
        self.shape = tuple(s // parts if d == dim else s for d, s in enumerate(of.shape))

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if shard is not None and shard.dim == self.dim:  # part j of part i is part i * n + j of the whole
            return self.of.read(Shard(self.dim, self.index * shard.parts + shard.index, self.parts * shard.parts), dtype)
        return _cut(self.of.read(Shard(self.dim, self.index, self.parts), dtype), shard)


class Mapped:
    """f(another lazy tensor), for an f that takes any slice of whole heads (so f of a shard is a shard of f);
    whole: f takes only the whole tensor (it moves the split dim), and a shard is cut from its result.
    The shape is f's on a tensor without data."""

    def __init__(self, of, f: Callable[[torch.Tensor], torch.Tensor], name: str, whole: bool = False):
        self.of, self.f, self.whole = of, f, whole
        self.path, self.key, self.dtype, self.where = of.path, of.key, of.dtype, of.where
        try:
            self.shape = tuple(f(torch.empty(of.shape, device="meta")).shape)
        except RuntimeError:
            raise CheckpointError(f"{of.where}: shape {tuple(of.shape)} does not match the config, which cannot "
                                  f"make zoo's {name} of it") from None

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.whole:
            return _cut(self.f(self.of.read(None, dtype)), shard)
        return self.f(self.of.read(shard, dtype))


# ---- training checkpoints' model-parallel files (gpt-neox, metaseq) ---------------------------------

def merged(parts: list, how: str):
    """The ranks' copies of one tensor as one, by a format's rule: "dim0" / "dim1" concatenated (split
    weights), "sum", "mean" or "one" (copies of a whole tensor)."""
    if how in ("dim0", "dim1"):
        return Concat(parts, int(how[-1]))
    return Reduce(parts, how)


def ranks(files: dict[int, Path], what: str, directory: Path, n: int = 0) -> list[Path]:
    """Files numbered 0..n-1 (n: at least one more than the highest number found), none missing."""
    missing = [i for i in range(max(n, max(files) + 1)) if i not in files]
    if missing:
        raise CheckpointError(f"{directory}: the {what} of model-parallel rank(s) {missing} is missing "
                              f"(found ranks {sorted(files)})")
    return [files[i] for i in sorted(files)]


def gathered(copies: list[dict], files: list[Path], where: str) -> dict[str, list]:
    """key -> every rank's copy, checking that each rank has the same keys."""
    for path, c in zip(files[1:], copies[1:]):
        for k in c.keys() ^ copies[0].keys():
            holder, other = (path, files[0]) if k in c else (files[0], path)
            raise CheckpointError(f"{holder}: tensor {k!r}{where} is not in {other.name}")
    return {k: [c[k] for c in copies] for k in copies[0]}

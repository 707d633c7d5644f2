"""Tensor-parallel layers: each rank holds one slice of the weight and the collectives join the results.

    ColumnParallelLinear   weight (out/w, in)   rows split: each rank computes a slice of the outputs
    RowParallelLinear      weight (out, in/w)   columns split: partial sums, all-reduced
    ParallelEmbedding      weight (vocab, d/w)  embedding dim split
    VocabParallelEmbedding weight (vocab/w, d)  vocabulary split: for an embedding tied to the output layer

`split_dims` on each layer says which dimension of which parameter is split; the loader reads only
that slice from the checkpoint. In one process the models use plain nn.Linear / nn.Embedding:
`column_parallel_linear` and friends return those when the world size is 1.
"""
import torch
import torch.nn.functional as F
from torch import nn

from zoo.parallel.comm import (copy_to_parallel, gather_from_parallel, rank, reduce_from_parallel,
                               scatter_to_parallel, world_size)


def check_split(sizes: dict[str, int]) -> None:
    """Before a model builds its layers: each size split across ranks (named by what it is) must divide evenly."""
    world = world_size()
    bad = [f"{what} ({size})" for what, size in sizes.items() if size % world]
    if bad:
        fits = [w for w in range(1, min(sizes.values()) + 1) if all(size % w == 0 for size in sizes.values())]
        raise ValueError(f"world size {world} does not divide {', '.join(bad)}, which tensor parallelism splits "
                         f"across ranks: run with a world size in {fits}")


def _part(size: int, what: str) -> int:
    if size % world_size():
        raise ValueError(f"{what} ({size}) is not divisible by the world size ({world_size()})")
    return size // world_size()


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b, W split by rows (output features). gather_output=False leaves each rank its slice."""
    split_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, gather_output: bool = True):
        super().__init__()
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(_part(out_features, "out_features"), in_features))
        self.bias = nn.Parameter(torch.zeros(self.weight.shape[0])) if bias else None

    def forward(self, x):
        y = F.linear(copy_to_parallel(x), self.weight, self.bias)  # (..., out/w)
        return gather_from_parallel(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W split by columns (input features): partial products summed across ranks.

    input_is_parallel: x is already this rank's slice (the output of a ColumnParallelLinear).
    The bias is replicated and added once, after the sum.
    """
    split_dims = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_is_parallel: bool = False):
        super().__init__()
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, _part(in_features, "in_features")))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        x = x if self.input_is_parallel else scatter_to_parallel(x)
        y = reduce_from_parallel(F.linear(x, self.weight))  # (..., out)
        return y if self.bias is None else y + self.bias


class ParallelEmbedding(nn.Module):
    """Embedding split along the embedding dimension: look up a slice, all-gather the slices."""
    split_dims = {"weight": 1}

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, _part(embedding_dim, "embedding_dim")))

    def forward(self, tokens):
        return gather_from_parallel(F.embedding(tokens, self.weight))  # (..., dim/w) -> (..., dim)


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary: each rank embeds the tokens it owns, zeros elsewhere, summed."""
    split_dims = {"weight": 0}

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(_part(num_embeddings, "num_embeddings"), embedding_dim))
        self.start = rank() * self.weight.shape[0]

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_parallel(out.masked_fill(outside[..., None], 0.0))


def column_parallel_linear(in_features, out_features, bias=False, gather_output=True) -> nn.Module:
    """ColumnParallelLinear under tensor parallelism, a plain nn.Linear in one process."""
    if world_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return ColumnParallelLinear(in_features, out_features, bias, gather_output)


def row_parallel_linear(in_features, out_features, bias=False, input_is_parallel=True) -> nn.Module:
    """RowParallelLinear under tensor parallelism, a plain nn.Linear in one process."""
    if world_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, input_is_parallel)


def parallel_embedding(num_embeddings, embedding_dim, tied: bool = False) -> nn.Module:
    """Under tensor parallelism ParallelEmbedding (split on the embedding dim), or, when the output layer is
    tied to it, VocabParallelEmbedding: split on the vocabulary like the (column-parallel) output layer, so
    the two share one slice. A plain nn.Embedding in one process."""
    if world_size() == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    return (VocabParallelEmbedding if tied else ParallelEmbedding)(num_embeddings, embedding_dim)

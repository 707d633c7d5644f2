"""Tensor-parallel layers: each rank holds one slice of the weight and the collectives join the results.

    ColumnParallelLinear   weight (out/w, in)   rows split: each rank computes a slice of the outputs
    RowParallelLinear      weight (out, in/w)   columns split: partial sums, all-reduced
    ParallelEmbedding      weight (vocab, d/w)  embedding dim split
    VocabParallelEmbedding weight (vocab/w, d)  vocabulary split: for an embedding tied to the output layer

`split_dims` on each layer says which dimension of which parameter is split, and `full_size` how
long that dimension is in the checkpoint; the loader reads only this rank's slice. In one process
the models use Linear (an nn.Linear through zoo.kernels.linear) / nn.Embedding: `column_parallel_linear`
and friends return those when the world size is 1.

A size the world size w does not divide (a vocabulary of 32001 at w = 2) is padded: each rank holds
ceil(size / w), the last rank(s) zeros past the end (`split_size`). Zero rows of a column-parallel
weight give zero outputs, cut after the gather or met by the zero columns of the row-parallel layer
they feed, so the results are one process's. `gather_split` makes a split weight whole and `write_split`
puts each rank its slice of a whole one back, padding untouched (zoo.weights reads and writes through them).
"""
import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import linear
from zoo.parallel.comm import (all_gather, copy_to_parallel, gather_from_parallel, rank, reduce_from_parallel,
                               scatter_to_parallel, world_size)


def split_size(size: int) -> int:
    """What each rank holds of `size` split across ranks: size / w, rounded up (the rest is padding)."""
    return -(-size // world_size())


def gather_padded(y: torch.Tensor, size: int) -> torch.Tensor:
    """Every rank's (..., split_size(size)) slice, gathered without the padding: (..., size)."""
    y = gather_from_parallel(y)
    return y if y.shape[-1] == size else y[..., :size]


def scatter_padded(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of x's last dim, as a row-parallel layer holds its inputs: zero-padded to w * split_size."""
    pad = world_size() * split_size(x.shape[-1]) - x.shape[-1]
    return scatter_to_parallel(F.pad(x, (0, pad)) if pad else x)


def gather_split(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A split weight whole again: every rank's slice of t along `dim` joined in rank order, the padding past
    `size` cut. A copy, the same on every rank (a collective; no autograd); `write_split` is its inverse."""
    whole = all_gather(t, dim)
    return whole if whole.shape[dim] == size else whole.narrow(dim, 0, size)


def write_split(local: torch.Tensor, whole: torch.Tensor, dim: int) -> None:
    """Copy this rank's slice of `whole` (the unpadded tensor, the same on every rank) along `dim` into `local`,
    which holds split_size of it as the loader reads it; local's padding past the end is left as it is (zeros)."""
    step, size = local.shape[dim], whole.shape[dim]
    start = min(rank() * step, size)
    n = min(step, size - start)
    local.narrow(dim, 0, n).copy_(whole.narrow(dim, start, n))


def column_parallel(x: torch.Tensor, matmul, gather_output: bool, full_size: int) -> torch.Tensor:
    """What a column-parallel layer does around its matmul (bias included): x whole on every rank, y this
    rank's outputs (..., out/w), gathered into (..., out) when gather_output. QuantLinear's too."""
    y = matmul(copy_to_parallel(x))  # (..., out/w)
    return gather_padded(y, full_size) if gather_output else y


def row_parallel(x: torch.Tensor, matmul, input_is_parallel: bool, bias: torch.Tensor | None) -> torch.Tensor:
    """What a row-parallel layer does around its matmul (bias excluded): x cut to this rank's inputs unless
    it already is, the partial sums all-reduced, then the replicated bias added once. QuantLinear's too."""
    x = x if input_is_parallel else scatter_padded(x)
    y = reduce_from_parallel(matmul(x))  # (..., out)
    return y if bias is None else y + bias


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b, W split by rows (output features). gather_output=False leaves each rank its slice."""
    split_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, gather_output: bool = True):
        super().__init__()
        self.gather_output, self.full_size = gather_output, out_features
        self.weight = nn.Parameter(torch.empty(split_size(out_features), in_features))
        self.bias = nn.Parameter(torch.zeros(self.weight.shape[0])) if bias else None

    def forward(self, x):
        return column_parallel(x, lambda x: linear(x, self.weight, self.bias), self.gather_output, self.full_size)


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and checkpoints) through zoo.kernels.linear: on the CPU, a bf16
    decode step's few rows take zoo's native kernel. The layer of one process."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W split by columns (input features): partial products summed across ranks.

    input_is_parallel: x is already this rank's slice (the output of a ColumnParallelLinear).
    The bias is replicated and added once, after the sum.
    """
    split_dims = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_is_parallel: bool = False):
        super().__init__()
        self.input_is_parallel, self.full_size = input_is_parallel, in_features
        self.weight = nn.Parameter(torch.empty(out_features, split_size(in_features)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return row_parallel(x, lambda x: linear(x, self.weight), self.input_is_parallel, self.bias)


class ParallelEmbedding(nn.Module):
    """Embedding split along the embedding dimension: look up a slice, all-gather the slices."""
    split_dims = {"weight": 1}

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.full_size = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, split_size(embedding_dim)))

    def forward(self, tokens):
        return gather_padded(F.embedding(tokens, self.weight), self.full_size)  # (..., dim/w) -> (..., dim)


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary: each rank embeds the tokens it owns, zeros elsewhere, summed."""
    split_dims = {"weight": 0}

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.full_size = num_embeddings
        self.weight = nn.Parameter(torch.empty(split_size(num_embeddings), embedding_dim))
        self.start = rank() * self.weight.shape[0]

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_parallel(out.masked_fill(outside[..., None], 0.0))


def column_parallel_linear(in_features, out_features, bias=False, gather_output=True) -> nn.Module:
    """ColumnParallelLinear under tensor parallelism, a Linear (an nn.Linear) in one process."""
    if world_size() == 1:
        return Linear(in_features, out_features, bias=bias)
    return ColumnParallelLinear(in_features, out_features, bias, gather_output)


def row_parallel_linear(in_features, out_features, bias=False, input_is_parallel=True) -> nn.Module:
    """RowParallelLinear under tensor parallelism, a Linear (an nn.Linear) in one process."""
    if world_size() == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, input_is_parallel)


def parallel_embedding(num_embeddings, embedding_dim, tied: bool = False) -> nn.Module:
    """Under tensor parallelism ParallelEmbedding (split on the embedding dim), or, when the output layer is
    tied to it, VocabParallelEmbedding: split on the vocabulary like the (column-parallel) output layer, so
    the two share one slice. A plain nn.Embedding in one process."""
    if world_size() == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    return (VocabParallelEmbedding if tied else ParallelEmbedding)(num_embeddings, embedding_dim)

"""Tensor parallelism on torch.distributed: our own parallel layers and the collectives behind them.

    torchrun --nproc_per_node 2 run.py --ckpt llama-2-7b

`setup()` joins the process group torchrun describes; the models then build their linear and
embedding layers with `column_parallel_linear`, `row_parallel_linear` and `parallel_embedding`,
which are nn.Linear (zoo's Linear) / nn.Embedding in one process, and `zoo.load` reads only this rank's
slice of every split weight, whatever model-parallel size the checkpoint was saved with.
"""
from zoo.parallel.comm import (all_gather, copy_to_parallel, gather_from_parallel, rank, reduce_from_parallel,
                               rank0_outcome, same_on_every_rank, scatter_to_parallel, setup, world_size)
from zoo.parallel.layers import (ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding,
                                 column_parallel_linear, gather_padded, gather_split, parallel_embedding,
                                 row_parallel_linear, scatter_padded, split_size, write_split)

__all__ = ["setup", "world_size", "rank", "all_gather", "copy_to_parallel", "reduce_from_parallel", "gather_from_parallel",
           "scatter_to_parallel", "ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding",
           "VocabParallelEmbedding", "column_parallel_linear", "row_parallel_linear", "parallel_embedding", "gather_padded",
           "scatter_padded", "split_size", "gather_split", "write_split", "same_on_every_rank",
           "rank0_outcome"]

"""Tensor parallelism (ParallelEmbedding, ColumnParallelLinear, RowParallelLinear): not built yet, see the
tensor-parallelism issue. Today every model runs in one process."""

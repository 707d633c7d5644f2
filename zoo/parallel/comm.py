"""The process group and the four collectives tensor parallelism is made of.

Every rank of the group holds a slice of each split weight (Megatron-style tensor parallelism).
Moving activations in and out of the "parallel region" takes four collectives; each is an
autograd function whose backward is the collective's dual, so training is correct too:

    copy_to_parallel      forward: identity               backward: all-reduce (sum) the gradient
    reduce_from_parallel  forward: all-reduce (sum)        backward: identity
    gather_from_parallel  forward: all-gather on last dim  backward: keep this rank's slice
    scatter_to_parallel   forward: keep this rank's slice  backward: all-gather on last dim
"""
import os

import torch
import torch.distributed as dist


def setup() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL with one GPU per local rank when CUDA is present, gloo on the CPU. Nothing to do in a
    single process. Multi-node runs are torchrun's business (--nnodes, --node_rank, --rdzv_*).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)) > gpus:
            raise RuntimeError(f"{os.environ.get('LOCAL_WORLD_SIZE')} processes per node (--nproc_per_node) "
                               f"but this node has {gpus} GPU(s): use --nproc_per_node {gpus} or fewer")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's x, joined along `dim` in rank order (no autograd; see gather_from_parallel)."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def same_on_every_rank(x: torch.Tensor) -> bool:
    """Whether x is the same, bit for bit, on every rank: rank 0's is broadcast and compared, and every rank
    gets the same answer (a collective)."""
    if world_size() == 1:
        return True
    theirs = x.detach().clone().contiguous()
    dist.broadcast(theirs, src=0)
    same = torch.equal(theirs.reshape(-1).view(torch.uint8), x.detach().contiguous().reshape(-1).view(torch.uint8))
    agreed = torch.tensor([float(same)], device=x.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def rank0_outcome(value, error: Exception | None):
    """Rank 0's value, or its error raised, on every rank (a collective): what rank 0 alone decided or wrote
    (an output directory, a dataset's index). Rank 0 raises its own error; the others a copy of its type
    (OSError, TypeError, ValueError; else a RuntimeError) and message. The other ranks' value and error are
    not read."""
    if world_size() > 1:
        box = [(value, None if error is None else (type(error), str(error)))]
        dist.broadcast_object_list(box, src=0)
        value, theirs = box[0]
        if rank() != 0 and theirs is not None:
            kind, message = theirs
            error = kind(message) if issubclass(kind, (OSError, TypeError, ValueError)) else RuntimeError(message)
    if error is not None:
        raise error
    return value


def _slice_last(x: torch.Tensor) -> torch.Tensor:
    return x.chunk(world_size(), dim=-1)[rank()].contiguous()


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return _slice_last(grad)


class _ScatterToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _slice_last(x)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad)


def copy_to_parallel(x: torch.Tensor) -> torch.Tensor:
    return _CopyToParallel.apply(x)


def reduce_from_parallel(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromParallel.apply(x)


def gather_from_parallel(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromParallel.apply(x)


def scatter_to_parallel(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToParallel.apply(x)

"""QuantLinear: a linear layer whose weight is int8 or int4, standing in for nn.Linear or a tensor-parallel
Column/RowParallelLinear with the same split and the same collectives (zoo/parallel/comm.py)."""
import torch
from torch import nn

from zoo.formats.files import release_freed_memory
from zoo.kernels import Int4Weight, Int8Weight, int4_linear, int8_linear
from zoo.parallel import ColumnParallelLinear, RowParallelLinear, gather_padded, reduce_from_parallel, scatter_padded


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as int8 or int4; the matmul is zoo.kernels' (Triton on CUDA, torch's ops on CPU).

    Under tensor parallelism it stands in for a Column- or RowParallelLinear, holding this rank's
    shard (quantized on its own) and doing the same collectives (zoo/parallel/layers.py).
    """

    def __init__(self, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None = None, parallel: str | None = None,
                 gather_output: bool = False, input_is_parallel: bool = True, full_size: int | None = None):
        super().__init__()
        self.qweight = weight
        self.prepared = False  # laid out for its device on the first forward (see forward)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.matmul = int8_linear if isinstance(weight, Int8Weight) else int4_linear
        self.parallel, self.gather_output, self.input_is_parallel = parallel, gather_output, input_is_parallel
        self.split_dims = {"bias": 0} if parallel == "column" else {}  # for the loader, as the parallel layers'
        self.full_size = full_size  # the split dim's size without padding, as the parallel layers'
        stored = weight.qweight if isinstance(weight, Int8Weight) else weight.packed
        self.out_features, self.in_features = stored.shape[0], (stored.shape[1] if isinstance(weight, Int8Weight)
                                                                  else 2 * stored.shape[1])

    @classmethod
    def replacing(cls, linear: nn.Module, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None) -> "QuantLinear":
        """The QuantLinear to put in `linear`'s place: the same tensor-parallel split and collectives."""
        if isinstance(linear, ColumnParallelLinear):
            return cls(weight, bias, "column", gather_output=linear.gather_output, full_size=linear.full_size)
        if isinstance(linear, RowParallelLinear):
            return cls(weight, bias, "row", input_is_parallel=linear.input_is_parallel, full_size=linear.full_size)
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepared:  # on CPU, int4 moves to torch's operator layout, and zoo's packed copy is freed
            self.qweight.prepare(drop_packed=True)
            self.prepared = True
            if getattr(self.qweight, "cpu", None) is not None:
                release_freed_memory()  # and so are the repacking's temporaries (glibc would keep them)
        if self.parallel == "row" and not self.input_is_parallel:
            x = scatter_padded(x)
        y = self.matmul(x, self.qweight)
        if self.parallel == "row":
            y = reduce_from_parallel(y)  # partial sums over this rank's inputs
        if self.bias is not None:
            y = y + self.bias
        if self.parallel == "column" and self.gather_output:
            y = gather_padded(y, self.full_size)
        return y

    def extra_repr(self) -> str:
        kind = "int8" if isinstance(self.qweight, Int8Weight) else f"int4, group {self.qweight.group_size}"
        split = f", {self.parallel}-parallel" if self.parallel else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}{split}"

"""QuantLinear: a linear layer whose weight is quantized by one of zoo.quant's schemes, standing in for
nn.Linear or a tensor-parallel Column/RowParallelLinear with the same split and the same collectives
(zoo/parallel/layers.py's column_parallel / row_parallel)."""
import dataclasses

import torch
from torch import nn

from zoo.memory import release_freed_memory
from zoo.parallel.layers import ColumnParallelLinear, RowParallelLinear, column_parallel, row_parallel
from zoo.quant.scheme import Scheme


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored by `scheme`; the matmul is the scheme's (zoo.kernels: Triton on CUDA,
    zoo's native kernels or torch's operators on CPU).

    `quantized` is the stored weight (what `zoo.quant.save` writes); `prepared` the layout its matmul
    reads, made on the first forward (`prepare`). Where that layout holds the weight in another form
    (int4 on the CPU) the stored weight is let go, so the weight is held once: `quantized` is then
    None, and the model can no longer be saved or edited, unless `keep_stored` was set before (zoo.prune
    sets it: it edits the weights between forwards). Under tensor parallelism it holds this rank's shard
    (quantized on its own).
    """
    keep_stored = False

    def __init__(self, scheme: Scheme, weight, bias: torch.Tensor | None = None, parallel: str | None = None,
                 gather_output: bool = False, input_is_parallel: bool = True, full_size: int | None = None):
        super().__init__()
        self.scheme, self.quantized, self.prepared = scheme, weight, None
        self.group_size = scheme.group_size(weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.parallel, self.gather_output, self.input_is_parallel = parallel, gather_output, input_is_parallel
        # as the parallel layers': the loader reads the bias's (the only parameter); zoo.weights the weight's
        self.split_dims = {"column": {"weight": 0, "bias": 0}, "row": {"weight": 1}}.get(parallel, {})
        self.full_size = full_size  # the split dim's size without padding, as the parallel layers'
        self.out_features, self.in_features = weight.shape

    @classmethod
    def replacing(cls, linear: nn.Module, scheme: Scheme, weight, bias: torch.Tensor | None) -> "QuantLinear":
        """The QuantLinear to put in `linear`'s place: the same tensor-parallel split and collectives."""
        if isinstance(linear, ColumnParallelLinear):
            return cls(scheme, weight, bias, "column", gather_output=linear.gather_output, full_size=linear.full_size)
        if isinstance(linear, RowParallelLinear):
            return cls(scheme, weight, bias, "row", input_is_parallel=linear.input_is_parallel,
                       full_size=linear.full_size)
        return cls(scheme, weight, bias)

    @torch.compiler.disable  # once: run as Python even when a compiled forward reaches it first
    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Make the matmul's layout for x of `dtype` (the first forward's)."""
        self.prepared = self.scheme.prepare(self.quantized, dtype)
        if self.prepared is not self.quantized:
            stored = self.prepared.stored()  # the same weight in the layout's memory, or None
            if stored is not None or not self.keep_stored:
                self.quantized = stored
        if self.quantized is None:
            release_freed_memory()  # the stored copy and the repacking's temporaries (glibc would keep them)

    def dequantize(self) -> torch.Tensor:
        """The stored weight in fp32 [N, K] (this rank's shard under TP), as zoo/kernels/reference.py defines it."""
        if self.quantized is None:
            raise RuntimeError(f"this {self.scheme.name} layer's stored weight was let go at its first forward (the "
                               f"layout its matmul reads on {self.prepared.device} holds the weight in another form), "
                               f"so it can be read (dense_weight) but not edited or saved: edit it before the model "
                               f"runs, set keep_stored before it runs (zoo.prune does), or load it again")
        return self.scheme.dequantize(self.quantized)

    def requantize(self, w: torch.Tensor) -> None:
        """Make w [N, K] (this rank's shard) the layer's weight: the rows that differ from the stored weight's
        dequantization are quantized anew by the scheme's `requantize` at the layer's group size (its zeros
        stay exact zeros; a layer made symmetric or refined gets min/max rows where edited: the stored weight
        does not say), the others keep their codes (every stored tensor is indexed by row first, and each row
        is quantized on its own). The matmul's layout is made again at the next forward."""
        rows = (w.float() != self.dequantize()).any(dim=1).nonzero().flatten()
        if len(rows) == 0:
            return
        new = self.scheme.requantize(w.float()[rows], self.group_size)
        fields = {name: getattr(self.quantized, name).clone() for name in self.scheme.tensors}
        for name, t in fields.items():
            t[rows] = getattr(new, name).to(t.dtype)
        self.quantized, self.prepared = dataclasses.replace(self.quantized, **fields), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepared is None:
            self.prepare(x.dtype)
        if self.parallel == "row":
            return row_parallel(x, self._matmul, self.input_is_parallel, self.bias)
        if self.parallel == "column":
            return column_parallel(x, self._matmul_bias, self.gather_output, self.full_size)
        return self._matmul_bias(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a gradient wanted through x (zoo.hooks.collect(grads=True))
            return ThroughDequantized.apply(x, self)
        return self.scheme.linear(x, self.prepared)

    def _matmul_bias(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The weight the matmul multiplies by, fp32 [N, K] (this rank's shard): the stored weight dequantized,
        else the layout's own dequantization; a layout with neither (torch's CPU int4 one) is read back through
        its matmul, x = I, in the dtype it computes in (fp32 for an fp32 model: to fp32 rounding)."""
        if self.quantized is not None:
            return self.dequantize()
        if hasattr(self.prepared, "dequantize"):
            return self.prepared.dequantize()
        eye = torch.eye(self.in_features, dtype=self.prepared.dtype, device=self.prepared.device)
        return self.scheme.linear(eye, self.prepared).float().T

    def extra_repr(self) -> str:
        split = f", {self.parallel}-parallel" if self.parallel else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme.label(self.group_size, '{name}, group {group_size}')}{split}")


class ThroughDequantized(torch.autograd.Function):
    """y = the scheme's matmul of x (the forward unchanged), with the gradient wrt x through the dense weight the
    matmul stands for: grad_x = grad_y W (fp32, cast to x's dtype). The weight is frozen: no gradient for it.
    Taken only where autograd records through x, so a forward without gradients pays nothing."""

    @staticmethod
    def forward(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        return layer.scheme.linear(x, layer.prepared)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad.float() @ ctx.layer.dense_weight().to(grad.device)).to(grad.dtype), None

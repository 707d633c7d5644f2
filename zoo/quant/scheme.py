"""What a weight-only quantization scheme is to zoo: one `Scheme` object per scheme, each in its own file
(int8.py, int4.py), registered once in zoo/quant/__init__.py's SCHEMES. Nothing else in zoo names a
scheme: the loader, the command line, `save`, `plan` and the quantized checkpoint format ask the
registered schemes.

    scheme = zoo.quant.SCHEMES["int4"]
    scheme.check(group_size=64)                      # the options it takes, or a ValueError saying why not
    weight = scheme.quantize(w, group_size=64)       # float [N, K] -> its stored weight (zoo.kernels)
    scheme.misfit(linear, 64)                        # why it cannot take this layer, or None
    scheme.stored(weight)                            # {tensor name: tensor}, as a checkpoint stores them
    weight = scheme.read(read, name, split_dim, 64)  # and back, this rank's slice under tensor parallelism
    layout = scheme.prepare(weight)                  # what its matmul reads on the weight's device
    y = scheme.linear(x, layout)                     # x [..., K] -> [..., N]

A new scheme (an fp8, a 3-bit) is a file holding a subclass and its SCHEME, plus one line in SCHEMES; its
kernels may be zoo.kernels' (prepare and linear below) or its own (override both).
"""
from typing import Callable

import torch
from torch import nn

from zoo.kernels import quantized_linear

WEIGHTS_AT_A_TIME = 1 << 20  # quantized at a time (whole rows): the fp32 temporaries stay a few 4 MB blocks


class Scheme:
    """A scheme's facts as class attributes, its behaviour as methods; a subclass sets the first four.

    tensors maps each stored tensor (a field of `weight`, stored as `L.<name>`) to the dim it is split on
    under tensor parallelism: (when the float weight is split on dim 0, column-parallel; on dim 1, row-
    parallel), None where every rank holds it whole.
    """
    name: str           # what zoo.load(quant=...), --quant and a checkpoint's metadata call it
    weight: type        # its stored weight (zoo.kernels), a dataclass holding `tensors`
    tensors: dict[str, tuple[int, int | None]]
    layout: str         # what a saved layer stores, for the checkpoint's metadata
    group_sizes: tuple[int, ...] = ()  # the group sizes it takes (none: it has no groups, and ignores group_size)
    refines: bool = False  # whether it takes refine=True

    def check(self, group_size: int = 128, symmetric: bool = False, refine: bool = False) -> None:
        """A ValueError (or TypeError) for an option this scheme does not take."""
        if refine and not self.refines:
            raise ValueError(f"refine does not apply to {self.name}")

    def quantize(self, w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                 refine: bool = False):
        """w [N, K] -> the stored weight."""
        raise NotImplementedError

    def requantize(self, w: torch.Tensor, group_size: int = 128):
        """Rows of a weight an edit changed, w [N, K] -> their stored weight, each exact 0.0 of w stored as 0.0
        (a deletion's zeros stay zeros: zoo.weights, zoo.prune). This default is quantize's, for a scheme whose
        0.0 is always a code (a symmetric one)."""
        return self.quantize(w, group_size)

    def misfit(self, linear: nn.Module, group_size: int) -> str | None:
        """Why this scheme cannot take the linear layer (reading only shapes: meta tensors do), or None."""
        return None

    def group_size(self, weight) -> int:
        """The group size a stored weight was made with (0: none), for the checkpoint's metadata."""
        return 0

    def label(self, group_size: int | str, form: str = "{name} group {group_size}") -> str:
        """The scheme's name, with its group size in `form` where it has groups: "int8", "int4 group 64"."""
        return form.format(name=self.name, group_size=group_size) if self.group_sizes else self.name

    def weight_bytes(self, n: int, k: int, group_size: int) -> int:
        """Bytes of a quantized [N, K] weight, as held in memory."""
        raise NotImplementedError

    def stored(self, weight) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores for a layer `L`, as `L.<name>`."""
        return {name: getattr(weight, name) for name in self.tensors}

    def read(self, read: Callable[[str, int | None], torch.Tensor], layer: str, split_dim: int | None,
             group_size: int):
        """The stored weight of `layer` from a checkpoint: read(key, dim) gives a stored tensor, this rank's
        slice of it along dim (None: whole); split_dim is the float weight's (None: not split)."""
        dims = {name: None if split_dim is None else split[split_dim] for name, split in self.tensors.items()}
        return self.weight(**{name: read(f"{layer}.{name}", dim) for name, dim in dims.items()},
                           **self._options(group_size))

    def _options(self, group_size: int) -> dict:
        """The stored weight's fields besides its tensors."""
        return {}

    def dequantize(self, weight) -> torch.Tensor:
        """The stored weight in fp32 [N, K] (zoo/kernels/reference.py)."""
        raise NotImplementedError

    def prepare(self, weight, dtype: torch.dtype = torch.bfloat16):
        """The layout the matmul reads on the weight's device for x of `dtype`, made once (zoo.kernels)."""
        return weight.prepare(dtype)

    def linear(self, x: torch.Tensor, layout) -> torch.Tensor:
        return quantized_linear(x, layout)

    def __repr__(self) -> str:
        return f"<quantization scheme {self.name}>"


def by_rows(w: torch.Tensor, quantize_rows) -> list[torch.Tensor]:
    """quantize_rows over blocks of rows of w (every row is quantized on its own), the pieces joined:
    an output layer of 32000 x 2048 would otherwise make several 262 MB fp32 temporaries."""
    if w.shape[0] == 0:
        return list(quantize_rows(w))
    step, out = max(1, WEIGHTS_AT_A_TIME // max(1, w.shape[1])), None
    for a in range(0, w.shape[0], step):
        piece = quantize_rows(w[a : a + step])
        if out is None:  # the whole results, filled block by block
            out = [torch.empty((w.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device) for t in piece]
        for whole, t in zip(out, piece):
            whole[a : a + len(t)] = t
    return out

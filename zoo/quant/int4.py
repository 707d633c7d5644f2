"""int4: one scale and zero per group of `group_size` inputs (32, 64, 128 or 256), two codes per byte (the
format: zoo/kernels/reference.py).

    w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],  q in 0..15,  g = k // group_size

Asymmetric by default, scale = (max - min) / 15 and zero = -min / scale over the group (min/max);
symmetric: zero = 8, scale = max|w| / 7; refine: then least-squares scales and zeros (`refine_int4`).
Rows an edit re-quantizes (`requantize`): a group holding an exact 0.0 gets a whole-code zero (0.0 stays 0.0).
A layer whose inputs K do not split into whole groups stays in floating point (`misfit`).
"""
import torch
from torch import nn

from zoo import checks
from zoo.kernels import INT4_GROUP_SIZES, Int4Weight, dequantize_int4, pack_int4
from zoo.parallel import RowParallelLinear, world_size
from zoo.quant.scheme import Scheme, by_rows


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, refine: bool = False) -> Int4Weight:
    """w [N, K] -> packed uint8 [N, K/2] and fp32 scales, zeros [N, K/group_size] (min/max per group).

    refine (asymmetric only): then improve each group's scale and zero by alternating least squares
    (`refine_int4`): less squared weight error, at some seconds per billion weights (benchmarks/quant.py).
    """
    k = w.shape[1]
    check_options(group_size, symmetric, refine)
    if k % group_size:
        raise ValueError(f"K = {k} input features are not a multiple of the group size {group_size}")
    packed, scales, zeros = by_rows(w, lambda rows: _int4_rows(rows, group_size, symmetric, refine))
    return Int4Weight(packed, scales, zeros, group_size)


def check_options(group_size: int, symmetric: bool = False, refine: bool = False) -> None:
    checks.integer("group_size", group_size)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of {INT4_GROUP_SIZES}")
    if refine and symmetric:
        raise ValueError("refine fits a scale and a zero per group: it applies to asymmetric int4 only")


def _int4_rows(w: torch.Tensor, group_size: int, symmetric: bool = False, refine: bool = False,
               whole_zero: bool = False):
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)  # (N, groups, group_size)
    if symmetric:
        scales = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        zeros = -lo / scales
        if refine:
            scales, zeros = refine_int4(groups, scales, zeros)
        if whole_zero:  # a group holding an exact 0.0: its zero a whole code, the scale widened to fit [min, max]
            held = (groups == 0).any(dim=-1)
            z = torch.round(zeros).clamp(0, 15)
            s = torch.maximum(hi / (15 - z).clamp(min=1), -lo / z.clamp(min=1)).clamp(min=1e-12)
            scales, zeros = torch.where(held, s, scales), torch.where(held, z, zeros)
    q = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales, zeros


def refine_int4(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, iters: int = 8):
    """Better scales and zeros for groups [N, G, group_size] than min/max, with no calibration data.

    Alternates two exact steps, each of which can only lower the squared error sum((w - (q - z) s)^2):
    the codes q = clamp(round(w / s + z), 0, 15) for fixed s, z; then s, z for fixed q, a least-squares
    line w = s q - s z through the group's points. A group keeps its best (s, z) (constant groups
    have no line to fit). Converges in about 6 rounds.
    """
    def error(s, z):
        q = torch.round(groups / s[..., None] + z[..., None]).clamp(0, 15)
        return q, ((q - z[..., None]) * s[..., None] - groups).pow(2).sum(-1)

    q, best = error(scales, zeros)
    for _ in range(iters):
        q_mean, w_mean = q.mean(-1, keepdim=True), groups.mean(-1, keepdim=True)
        var = (q - q_mean).pow(2).mean(-1)
        slope = ((q - q_mean) * (groups - w_mean)).mean(-1) / var.clamp(min=1e-20)
        s = slope.clamp(min=1e-12)
        z = (q_mean.squeeze(-1) * s - w_mean.squeeze(-1)) / s  # intercept -s z = mean(w) - s mean(q)
        q_new, err = error(s, z)
        better = (err < best) & (var > 0)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
        best = torch.where(better, err, best)
        q = torch.where(better[..., None], q_new, q)
    return scales, zeros


class Int4(Scheme):
    name = "int4"
    weight = Int4Weight
    # every stored tensor is [N, ...]: a column split cuts them all on dim 0, a row split the packed inputs and
    # the per-group scales and zeros on dim 1, which needs a whole number of groups per rank (`misfit`)
    tensors = {"packed": (0, 1), "scales": (0, 1), "zeros": (0, 1)}
    layout = ("L.packed uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high), L.scales and L.zeros "
              "fp32 [N, K/group_size]: w = (q - zeros) * scales, per group")
    group_sizes = INT4_GROUP_SIZES
    refines = True

    def check(self, group_size=128, symmetric=False, refine=False) -> None:
        check_options(group_size, symmetric, refine)

    def quantize(self, w, group_size=128, symmetric=False, refine=False) -> Int4Weight:
        return quantize_int4(w, group_size, symmetric, refine)

    def requantize(self, w, group_size=128) -> Int4Weight:
        """quantize's min/max, but a group holding an exact 0.0 gets a whole-code zero, so 0.0 is one of its values."""
        check_options(group_size)
        return Int4Weight(*by_rows(w, lambda rows: _int4_rows(rows, group_size, whole_zero=True)), group_size)

    def misfit(self, linear: nn.Module, group_size: int) -> str | None:
        """K must split into whole groups; under tensor parallelism it is this rank's K (a row-parallel
        layer's share), as a group may not straddle two ranks."""
        k = linear.weight.shape[1]
        if k % group_size == 0:
            return None
        share = (f" per rank ({k * world_size()} over world size {world_size()})"
                 if isinstance(linear, RowParallelLinear) and world_size() > 1 else "")
        return f"K = {k}{share} inputs do not split into int4 groups of {group_size}"

    def group_size(self, weight: Int4Weight) -> int:
        return weight.group_size

    def weight_bytes(self, n, k, group_size) -> int:
        return n * k // 2 + 4 * (n * k // group_size)  # half a byte per weight, a bf16 scale and zero per group

    def _options(self, group_size: int) -> dict:
        return {"group_size": group_size}

    def dequantize(self, weight: Int4Weight) -> torch.Tensor:
        return dequantize_int4(weight.packed, weight.scales, weight.zeros, weight.group_size)


SCHEME = Int4()

"""The quantizers: a float weight [N, K] in, zoo.kernels' Int8Weight or Int4Weight out (formats in
zoo/kernels/reference.py). int8 symmetric per output row; int4 per group of `group_size` inputs,
min/max or, with refine, least squares.
"""
import torch

from zoo import checks
from zoo.kernels import INT4_GROUP_SIZES, Int4Weight, Int8Weight, pack_int4

SCHEMES = ("int8", "int4")


WEIGHTS_AT_A_TIME = 1 << 20  # quantized at a time (whole rows): the fp32 temporaries stay a few 4 MB blocks


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w [N, K] -> int8 [N, K] and fp32 scales [N]: each row scaled so that its largest |w| maps to 127."""
    return Int8Weight(*_by_rows(w, _int8_rows))


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, refine: bool = False) -> Int4Weight:
    """w [N, K] -> packed uint8 [N, K/2] and fp32 scales, zeros [N, K/group_size] (min/max per group).

    refine (asymmetric only): then improve each group's scale and zero by alternating least squares
    (`refine_int4`): about 13% less squared weight error, at some seconds per billion weights.
    """
    k = w.shape[1]
    check_group_size(group_size)
    if k % group_size:
        raise ValueError(f"K = {k} input features are not a multiple of the group size {group_size}")
    if refine and symmetric:
        raise ValueError("refine fits a scale and a zero per group: it applies to asymmetric int4 only")
    packed, scales, zeros = _by_rows(w, lambda rows: _int4_rows(rows, group_size, symmetric, refine))
    return Int4Weight(packed, scales, zeros, group_size)


def check_group_size(group_size: int) -> None:
    checks.integer("group_size", group_size)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of {INT4_GROUP_SIZES}")


def _int4_rows(w: torch.Tensor, group_size: int, symmetric: bool, refine: bool):
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
    q = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales, zeros


def _by_rows(w: torch.Tensor, quantize_rows) -> list[torch.Tensor]:
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

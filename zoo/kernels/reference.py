"""The stored int8 / int4 weight formats, and the plain-PyTorch matmuls every kernel is tested against.

int8, symmetric, one scale per output channel:

    qweight  int8   [N, K]
    scales   float  [N]                 w[n, k] = qweight[n, k] * scales[n]

int4, asymmetric, one scale and one zero per group of `group_size` columns (32, 64, 128 or 256):

    packed   uint8  [N, K/2]            two 4-bit values q in 0..15 per byte (nibble order below)
    scales   float  [N, K/group_size]
    zeros    float  [N, K/group_size]   w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k // group_size

The zeros are floating point, so an optimised zero (HQQ) is stored as is; symmetric int4 is zeros = 8.

The references dequantize in fp32 and multiply in fp32 whatever the activation dtype, then cast the
result to x's dtype: they are the most accurate answer these weights can give, not a fast one.
"""
import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values two per byte: [N, K] (0..15, any integer dtype) -> uint8 [N, K/2].

    Nibble order: byte packed[n, j] holds column 2j in its LOW nibble (bits 0-3) and column 2j+1 in
    its HIGH nibble (bits 4-7), i.e. packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError("pack_int4 takes values in 0..15")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)  # [N, K/2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [N, K/2] -> uint8 [N, K], values 0..15 (column 2j = low nibble)."""
    low = packed & 0xF  # columns 0, 2, 4, ...
    high = packed >> 4  # columns 1, 3, 5, ...
    return torch.stack([low, high], dim=-1).flatten(-2)  # [N, K/2, 2] -> [N, K]


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [N, K] and scales [N] -> weight [N, K] in `dtype` (computed in fp32)."""
    w = qweight.float() * scales.float()[:, None]
    return w.to(dtype)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, K/2], scales and zeros [N, K/group_size] -> weight [N, K] in `dtype` (computed in fp32)."""
    q = unpack_int4(packed).float()  # [N, K]
    n, k = q.shape
    if k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"int4 weight [{n}, {k}] with group_size {group_size} needs scales and zeros of shape "
                         f"[{n}, {k // group_size}], got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    q = q.view(n, k // group_size, group_size)  # [N, groups, group_size]
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, k).to(dtype)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T for x [..., K] and the int8 weight; fp32 math, output in x's dtype."""
    w = dequantize_int8(qweight, scales)  # [N, K] fp32
    return (x.float() @ w.T).to(x.dtype)  # [..., N]


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """y = x @ w.T for x [..., K] and the int4 weight; fp32 math, output in x's dtype."""
    w = dequantize_int4(packed, scales, zeros, group_size)  # [N, K] fp32
    return (x.float() @ w.T).to(x.dtype)  # [..., N]

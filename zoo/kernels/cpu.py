"""CPU paths: PyTorch's own weight-only matmul operators, fed from zoo's stored formats.

    torch.ops.aten._weight_int8pack_mm(x [M, K], qweight int8 [N, K], scales [N]) -> [M, N]
        y = x @ (qweight * scales[:, None]).T.  x is fp32, fp16 or bf16; scales must have x's dtype.
        Takes our int8 format as it is: nothing to pack, as long as K is a multiple of 16. With bf16 x
        and any other K it reads past the rows (torch 2.13, this AVX512 CPU): garbage or NaN for M
        of 1-3, SIGSEGV from M ~ 17 (K = 8, 24, 40, 72, 88, 100, 136, 200, 232, 264 all fail; fp32
        and fp16 x happened to be right). So K is padded with zero columns to a multiple of 16
        (PaddedInt8Weight, made once by Int8Weight.prepare) and x with zeros to match (each call: a copy of x).

    torch.ops.aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K], inner_k_tiles) -> uint8 [N, K/2]
        Takes the UNPACKED values 0..15 and lays them out for this CPU's instruction set (AVX512 or
        AVX2 or plain): the layout is a detail of the build and the machine, so it is made at load
        time and never saved. N must be a multiple of 16 (we pad; else a RuntimeError); inner_k_tiles
        is unused on CPU. Any K of whole groups is right (tests/test_quant_widths.py tries every group
        size over K = 32-768).

    torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros) -> [M, N]
        scales_and_zeros is [K/group_size, N, 2] in x's dtype, [..., 0] the scale and [..., 1] a zero
        that is ADDED after scaling, around a fixed midpoint of 8:

            torch:  w = (q - 8) * scale + zero_torch
            zoo:    w = (q - zero) * scale
            so      zero_torch = (8 - zero) * scale                  (same w for every q; tested)

        zero_torch is rounded to x's dtype. In bf16 that is a relative error of up to 2^-8 on a number
        up to 8 * scale, shared by a whole group: the size of rounding each weight to bf16, so the bf16
        path is about as accurate as a bf16 dequantize-then-matmul (tests/test_kernels.py holds both to one
        tolerance).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.kernels.reference import unpack_int4

CPU_INT8_K_MULTIPLE = 16  # _weight_int8pack_mm: K must be a multiple of this (see above)
CPU_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
CPU_INT4_ROWS = 1024  # rows converted at a time (a multiple of the operator's N blocking: 16, 32 or 64)


def int8_mm_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32/fp16/bf16) @ int8 weight [N, K] with per-channel scales [N] -> [M, N] in x's dtype.

    K must be a multiple of 16: pad both with zero columns first (PaddedInt8Weight)."""
    if qweight.shape[1] % CPU_INT8_K_MULTIPLE:
        raise ValueError(f"torch's int8 CPU operator needs K a multiple of {CPU_INT8_K_MULTIPLE} (else it reads past "
                         f"the rows: garbage or a crash), got weight {tuple(qweight.shape)}; pad K with zero columns")
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scales.to(x.dtype))


@dataclass(frozen=True)
class PaddedInt8Weight:
    """An int8 weight whose K is padded with zero columns to a multiple of 16 for torch's operator (above):
    made by Int8Weight.prepare where K needs it, never saved. Its first K columns are the stored weight
    (`stored`), a view of the same memory, so the weight is held once."""
    padded: torch.Tensor  # int8 [N, K padded to 16], the columns past K zeros
    scales: torch.Tensor  # [N]
    in_features: int      # K before padding

    @classmethod
    def of(cls, qweight: torch.Tensor, scales: torch.Tensor) -> "PaddedInt8Weight":
        k = qweight.shape[1]
        return cls(F.pad(qweight, (0, -k % CPU_INT8_K_MULTIPLE)), scales, k)

    @property
    def device(self) -> torch.device:
        return self.padded.device

    def stored(self):
        from zoo.kernels import Int8Weight  # here: zoo.kernels imports this module
        return Int8Weight(self.padded[:, :self.in_features], self.scales)  # [N, K], the same memory

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8_mm_cpu(F.pad(x, (0, self.padded.shape[1] - x.shape[1])), self.padded, self.scales)

    def dequantize_mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8_dequantize_mm(x, self.padded[:, :self.in_features], self.scales)


@dataclass(frozen=True)
class CpuInt4Weight:
    """An int4 weight laid out for torch's CPU operator: made by pack_int4_for_cpu, lives in memory only."""
    packed: torch.Tensor            # uint8, torch's layout for this CPU (not ours)
    scales_and_zeros: torch.Tensor  # [K/group_size, N padded to 16, 2]: (scale, zero_torch), x's dtype
    group_size: int
    out_features: int               # N before padding

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this weight was packed for (the operator wants x in it)."""
        return self.scales_and_zeros.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def stored(self) -> None:
        return None  # zoo's format is not kept: the layout depends on this CPU's instruction set

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return int4_mm_cpu(x, self)


def pack_int4_for_cpu(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.bfloat16) -> CpuInt4Weight:
    """Our int4 format (packed uint8 [N, K/2], scales and zeros [N, K/group_size]) -> torch's CPU layout.

    Call once at load time. `dtype` is the activation dtype the operator will see (bf16 is the fast one).
    """
    n = packed.shape[0]
    pad = -n % CPU_INT4_N_MULTIPLE  # rows of zeros so N is a multiple of 16; their outputs are cut off
    zero_torch = (8 - zeros.float()) * scales.float()  # [N, K/group_size]
    scales_and_zeros = torch.stack([scales.float(), zero_torch], dim=-1)  # [N, K/group_size, 2]
    if pad:
        packed = F.pad(packed, (0, 0, 0, pad))  # nibbles 0: zero rows
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, pad))
    # The operator wants the values unpacked to int32 (8x our bytes: 262 MB for a 32000 x 2048 output
    # layer), so it converts blocks of CPU_INT4_ROWS rows; its layout is blocked along N in blocks that
    # divide that, so the blocks join into the whole's layout (tested).
    cpu_packed = torch.empty(packed.shape, dtype=torch.uint8, device=packed.device)
    for a in range(0, packed.shape[0], CPU_INT4_ROWS):
        q = unpack_int4(packed[a : a + CPU_INT4_ROWS]).to(torch.int32)  # [rows, K]
        cpu_packed[a : a + CPU_INT4_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return CpuInt4Weight(
        packed=cpu_packed,
        scales_and_zeros=scales_and_zeros.transpose(0, 1).contiguous().to(dtype),  # [K/group_size, N, 2]
        group_size=group_size,
        out_features=n,
    )


def int4_mm_cpu(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x [M, K] in weight.dtype @ the packed int4 weight -> [M, N] in x's dtype."""
    if x.dtype != weight.dtype:
        raise TypeError(f"this int4 weight was packed for {weight.dtype} activations, got {x.dtype}")
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.packed, weight.group_size, weight.scales_and_zeros)
    if y.shape[1] != weight.out_features:
        y = y[:, :weight.out_features].contiguous()  # [M, N]: drop the padding rows
    return y


# Dequantize-then-matmul: for many rows of x, when one dense GEMM beats the operators' per-row cost.
# The whole weight is dequantized on every call (never cached: that would undo the quantization) in
# x's dtype, in as few passes as possible; each weight is within 2-3 bf16 roundings of the exact one.

def int8_dequantize_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (qweight * scales[:, None]).T via a temporary dense weight in x's dtype -> [M, N]."""
    w = qweight.to(x.dtype) * scales.to(x.dtype)[:, None]  # [N, K]; int8 -> bf16 is exact
    return F.linear(x, w)


def int4_dequantize_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """x [M, K] @ int4 weight.T via a temporary dense weight in x's dtype -> [M, N]."""
    n = packed.shape[0]
    q = unpack_int4(packed).view(n, -1, group_size).to(x.dtype)  # [N, K/group_size, group_size]
    # (q - zero) * scale = q * scale + offset, with offset = -zero * scale in fp32, rounded once
    offset = (-zeros.float() * scales.float()).to(x.dtype)[..., None]
    w = torch.addcmul(offset, q, scales.to(x.dtype)[..., None])  # [N, K/group_size, group_size]
    return F.linear(x, w.view(n, -1))

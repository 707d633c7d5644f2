"""Fused dequantize-matmul in Triton, for CUDA: y = x @ w.T with w stored as int8 (W8A16) or int4 (W4A16).

The weight never exists in full precision. Each program computes one [BLOCK_M, BLOCK_N] tile of y and
walks K one tile at a time, loading only the quantized bytes of w and dequantizing them in registers:

            K ->                                   K ->
      ┌───────────────┐                ┌───────────────────┐
    M │ x tile        │   @   (w tile  │ int8 / 2 int4 per │ N  -> dequantize -> fp16/bf16/fp32)^T
      │ [BM, BK]      │                │ byte  [BN, BK]    │
      └───────────────┘                └───────────────────┘
      acc [BM, BN] fp32 += x_tile @ w_tile.T,  for each K tile;  y tile = acc (* scale) -> x's dtype

Decode (M = 1..16 tokens) reads every weight byte once and does almost no math: speed is memory
bandwidth, so tiles are short in M (16, the smallest tl.dot) and the grid is split along N to give
every SM a slice of the weight. Prefill (M in the hundreds) is compute-bound: BLOCK_M 64/128 reuses
each dequantized weight tile across many rows. Autotuning picks among both families per shape.

Storage formats: see zoo/kernels/reference.py. fp32 activations use exact fp32 products
(input_precision="ieee", no TF32): correct but slow, meant for checking; use bf16/fp16 for speed.

TRITON_INTERPRET=1 runs these kernels on the CPU with numpy (one program at a time, 2-4 ms per
program per K tile): the autotuner is then given one small config so it does not try them all.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Decode: one 16-row tile covers all tokens; narrow N tiles give enough programs to fill the GPU
# (N = 4096 / BLOCK_N 32 = 128 programs for 132 SMs on an H100), long K tiles keep loads in flight.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=4, num_stages=4)
    for block_n in (32, 64, 128) for block_k in (32, 64, 128, 256)
]
# Prefill: the tiles a bf16 GEMM would use, each with a short and a long K tile.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=3)
    for block_m, block_n, warps in ((32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (128, 256, 8))
    for block_k in (32, 64)
]
# The interpreter: one config, small enough to be quick, BLOCK_K = 32 divides every int4 group size.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]

CONFIGS = INTERPRETER_CONFIGS if INTERPRET else DECODE_CONFIGS + PREFILL_CONFIGS

# The interpreter multiplies bf16 tiles as their raw uint16 bits (numpy has no bf16), so under it
# _dot hands tl.dot fp32 copies: exact (bf16 and fp16 widen to fp32 without loss) and the same sums
# the GPU's fp32 accumulator makes. On the GPU this is False and costs nothing.
DOT_IN_FP32 = tl.constexpr(INTERPRET)


def _prune_configs(configs, named_args, **kwargs):
    """Decode configs for M <= 16, prefill configs above; int4 also needs BLOCK_K to divide the group size.

    The autotuner passes the kernel's positional arguments in `named_args` and its keyword arguments
    (GROUP_SIZE, DOT_PRECISION) in `kwargs`."""
    args = {**named_args, **kwargs}
    m, group_size = args["M"], args.get("GROUP_SIZE")
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] == 16) == (m <= 16)
            and c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
            and (group_size is None or group_size % c.kwargs["BLOCK_K"] == 0)]
    assert kept, f"no Triton config for M={m}, group_size={group_size}"
    return kept


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 x: exact fp32 products ("ieee"), not TF32's 10-bit mantissa. fp16/bf16: Triton's default,
    which does not touch fp16/bf16 operands (the tensor cores multiply them exactly)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _m_bucket(m: int) -> int:
    """The autotuner's key for M: the next power of two, so a new prompt length does not re-tune."""
    return triton.next_power_of_2(m)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32: a [BM, BK], b [BK, BN], acc [BM, BN] fp32."""
    if DOT_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scales_ptr, y_ptr,  # x [M, K] fp16/bf16/fp32, w int8 [N, K], scales [N], y [M, N]
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of x and y
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channels: rows of w
    row_ok, col_ok = rows < M, cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        q = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0)  # [BK, BN] int8: w tile, transposed
        # int8 -> x's dtype is exact (|q| <= 127; via fp32, the interpreter has no int -> bf16 cast).
        # The per-channel scale is the same for every k, so it multiplies the sum once, after the loop.
        acc = _dot(x, q.to(tl.float32).to(x.dtype), acc, DOT_PRECISION)

    scales = tl.load(scales_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BN]
    y = acc * scales[None, :]  # [BM, BN]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, y_ptr,  # x [M, K], w uint8 [N, K/2], scales/zeros [N, K/G], y [M, N]
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok, col_ok = rows < M, cols < N
    HALF_K: tl.constexpr = BLOCK_K // 2  # bytes of w per row per K tile
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "a K tile must lie inside one group")

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K is a multiple of GROUP_SIZE (the format) and GROUP_SIZE of BLOCK_K (the pruner, and the
    # static_assert above): no ragged K tile, and every K tile lies inside one group.
    for k0 in range(0, K, BLOCK_K):
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + cols * stride_sn + group * stride_sg, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + cols * stride_sn + group * stride_sg, mask=col_ok, other=0.0).to(tl.float32)

        js = k0 // 2 + tl.arange(0, HALF_K)  # [BK/2] byte columns of w
        packed = tl.load(w_ptr + js[:, None] * stride_wk + cols[None, :] * stride_wn,
                         mask=col_ok[None, :], other=0)  # [BK/2, BN] uint8, transposed
        # Byte j holds column 2j in its low nibble and column 2j+1 in its high nibble. Rather than
        # interleave them back into one [BK, BN] tile, multiply the low nibbles by the even columns
        # of x and the high nibbles by the odd columns: two dots of BK/2, no register shuffle.
        w_even = ((packed & 0xF).to(tl.float32) - zero[None, :]) * scale[None, :]  # [BK/2, BN] columns k0, k0+2, ..
        w_odd = ((packed >> 4).to(tl.float32) - zero[None, :]) * scale[None, :]    # [BK/2, BN] columns k0+1, k0+3, ..
        x_even = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * js)[None, :] * stride_xk,
                         mask=row_ok[:, None], other=0.0)  # [BM, BK/2]
        x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * js + 1)[None, :] * stride_xk,
                        mask=row_ok[:, None], other=0.0)  # [BM, BK/2]
        acc = _dot(x_even, w_even.to(x_even.dtype), acc, DOT_PRECISION)
        acc = _dot(x_odd, w_odd.to(x_odd.dtype), acc, DOT_PRECISION)

    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _launch(kernel, device: torch.device, m: int, n: int, config: dict | None, *args, **constants):
    """Run `kernel` over a grid of (M tiles, N tiles): autotuned, or with the block sizes in `config`."""
    if config is not None:
        kernel = kernel.fn  # the jitted kernel under the autotuner
        constants.update(config)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    # Triton launches on the current CUDA device: make it x's (the interpreter runs on the CPU)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **constants)


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 config: dict | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ (qweight int8 [N, K] * scales [N, 1]).T -> [..., N] in x's dtype.

    config: {"BLOCK_M": .., "BLOCK_N": .., "BLOCK_K": .. (, "num_warps": ..)} to skip autotuning (tests,
    experiments).
    """
    n, k = qweight.shape
    if x.shape[-1] != k or qweight.dtype != torch.int8 or scales.shape != (n,):
        raise ValueError(f"w8a16_matmul: x {tuple(x.shape)}, qweight {tuple(qweight.shape)} {qweight.dtype}, "
                         f"scales {tuple(scales.shape)}")
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m:
        _launch(_w8a16_kernel, x.device, m, n, config,
                x2, qweight, scales, y, m, n, k, _m_bucket(m),
                x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), y.stride(0), y.stride(1),
                DOT_PRECISION=_dot_precision(x.dtype))
    return y.view(*x.shape[:-1], n)


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ int4 weight (packed uint8 [N, K/2], scales/zeros [N, K/group_size]).T -> [..., N], x's dtype.

    config: {"BLOCK_M": .., "BLOCK_N": .., "BLOCK_K": ..} to skip autotuning; BLOCK_K must divide group_size.
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    if (x.shape[-1] != k or packed.dtype != torch.uint8 or group_size not in (32, 64, 128, 256)
            or k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape):
        raise ValueError(f"w4a16_matmul: x {tuple(x.shape)}, packed {tuple(packed.shape)} {packed.dtype}, "
                         f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group_size {group_size}")
    scales, zeros = scales.contiguous(), zeros.contiguous()  # one set of strides serves both
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m:
        _launch(_w4a16_kernel, x.device, m, n, config,
                x2, packed, scales, zeros, y, m, n, k, _m_bucket(m),
                x2.stride(0), x2.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
                y.stride(0), y.stride(1), GROUP_SIZE=group_size, DOT_PRECISION=_dot_precision(x.dtype))
    return y.view(*x.shape[:-1], n)

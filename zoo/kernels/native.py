"""zoo's own CPU kernels (native.cpp): int8 and int4 weights times int8 activations, AVX-512 VNNI; and a
bf16 matrix-vector product for dense layers (AVX512-BF16, zoo.kernels.linear).

    ops = native.load()     # torch.ops.zoo_native, built on first use (cached), or None (then torch's operators)
    y = ops.int8_mm(x, qweight, scales)                                # x [M, K] bf16/fp32 -> y [M, N]
    w = int4_layout(packed, scales, zeros, group_size)                   # once, at load (NativeInt4Weight)
    y = ops.int4_mm(x, w.packed, w.scales, w.scaled_zeros, group_size)
    y = ops.int8_dequantize_mm(x, qweight, scales)   # for many rows: the weight dequantized to bf16 (in blocks
                                                     # of rows, each multiplied by F.linear while in cache)
    y = ops.int4_dequantize_mm(x, w.packed, w.scales, w.scaled_zeros, group_size)
    y = ops.bf16_linear(x, weight, bias)     # bf16 x [M, K] and weight [N, K], nothing quantized: F.linear for
                                             # a decode step's few rows (where bf16_linear_runs(): AVX512-BF16)
    y = ops.rotary(x, cos, sin, interleaved)  # zoo/rotary.py's apply_rotary in one pass, the same bits

The math, as llama.cpp's Q8_0 and Q4_0 dot products do it, with x's rounding error kept. x is
quantized on each call in blocks of 32 along K, as Q8_0 (quantize_activations below is the same in
PyTorch): one fp32 scale per block, q = round(x * 127 / max|x|), and then that rounding's error in a
second int8, r = round(256 * (x * 127 / max|x| - q)) (at most 127), so x ~ scale * (q + r / 256) is
off by at most max|x| / 32512 of its block (bf16 rounds each x by up to |x| / 256). The second part costs one more
VNNI instruction per 64 products, which the memory-bound decode hides.
Blocks of 32 divide every int4 group and every tensor-parallel shard of an int4 layer, so a shard
quantizes its x as the whole layer does.
Within a block the products are exact int32 sums (VNNI, 64 bytes per instruction), then scaled and
summed in fp32; the weights are used as stored (int8) or as their 4-bit codes. The error is that of
x's rounding (measured on the bundled model: benchmarks/quant.py's perplexity, README).

Built with torch.utils.cpp_extension.load (g++ and ninja; the build is cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, a few seconds to load after the first time) on a
CPU with AVX-512 VNNI only. Without them, or with ZOO_NATIVE=0, load() returns None and zoo.kernels
uses torch's operators (its dispatch table). A failed build says why once on
stderr and falls back the same way.
"""
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.kernels.reference import unpack_int4

SOURCE = Path(__file__).with_name("native.cpp")
BLOCK = 32  # x's quantization block along K
CHUNK = 128  # int4's chunk of K (one 64-byte load); K is padded to a multiple of it
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-fopenmp"]


def cpu_supported(flags=CPU_FLAGS) -> bool:
    """Whether this CPU has the instructions native.cpp is compiled for (Linux's /proc/cpuinfo)."""
    try:
        have = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in have for f in flags)


@functools.cache
def bf16_linear_runs() -> bool:
    """Whether ops.bf16_linear can run here: the kernels built, and the CPU has AVX512-BF16 (Cooper Lake,
    Sapphire Rapids, Zen 4 and later), the one instruction set that function adds."""
    return load() is not None and cpu_supported(("avx512_bf16",))


@functools.cache
def load():
    """torch.ops.zoo_native with int8_mm and int4_mm, or None where they cannot run (module docstring)."""
    if os.environ.get("ZOO_NATIVE", "1") == "0" or not cpu_supported():
        return None
    try:
        from torch.utils.cpp_extension import load as build
        build(name="zoo_native", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
              is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: torch's operators do the work instead
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"zoo.kernels: the native CPU kernels did not build ({reason}); using torch's operators", file=sys.stderr)
        return None
    _register_shapes()
    return torch.ops.zoo_native


def _register_shapes():
    """Output shapes for torch.compile (the kernels run as opaque calls inside a compiled graph)."""
    @torch.library.register_fake("zoo_native::int8_mm")
    def _(x, qweight, scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("zoo_native::int4_mm")
    def _(x, packed, scales, scaled_zeros, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("zoo_native::int8_dequantize_mm")
    def _(x, qweight, scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("zoo_native::int4_dequantize_mm")
    def _(x, packed, scales, scaled_zeros, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("zoo_native::bf16_linear")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("zoo_native::rotary")
    def _(x, cos, sin, interleaved):
        return torch.empty_like(x)

    @torch.library.register_fake("zoo_native::int8_dequantize")
    def _(qweight, scales):
        return scales.new_empty(qweight.shape, dtype=torch.bfloat16)

    @torch.library.register_fake("zoo_native::int4_dequantize")
    def _(packed, scales, scaled_zeros, group_size, k):
        return scales.new_empty(packed.shape[0], k, dtype=torch.bfloat16)


@dataclass(frozen=True)
class NativeInt8Weight:
    """An int8 weight as int8_mm reads it: the stored qweight as it is (the same memory), fp32 scales."""
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor   # fp32 [N]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def stored(self):
        from zoo.kernels import Int8Weight  # here: zoo.kernels imports this module
        return Int8Weight(self.qweight, self.scales)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.zoo_native.int8_mm(x, self.qweight, self.scales)

    def dequantize_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.zoo_native.int8_dequantize_mm(x, self.qweight, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The weight in fp32 [N, K]."""
        return self.qweight.float() * self.scales[:, None]


@dataclass(frozen=True)
class NativeInt4Weight:
    """An int4 weight laid out for int4_mm: made by int4_layout at load, lives in memory only.

    packed: each 128 columns of a row in 64 bytes, byte j = column j (low nibble) | column 64 + j
    (high nibble), so one 64-byte load holds two 64-column halves; K padded with zero codes to a
    multiple of 128 (and of the group size). scaled_zeros = zeros * scales, so that
    w = q * scale - scaled_zero; the padding's groups have scale and scaled zero 0.
    """
    packed: torch.Tensor        # uint8 [N, Kp/2]
    scales: torch.Tensor        # fp32 [N, Kp/group_size]
    scaled_zeros: torch.Tensor  # fp32 [N, Kp/group_size]
    group_size: int
    in_features: int            # K before padding

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def stored(self) -> None:
        return None  # zoo's format is not kept: this layout is read instead

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.zoo_native.int4_mm(x, self.packed, self.scales, self.scaled_zeros, self.group_size)

    def dequantize_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.zoo_native.int4_dequantize_mm(x, self.packed, self.scales, self.scaled_zeros,
                                                       self.group_size)

    def dequantize(self) -> torch.Tensor:
        return int4_dequantize(self)


ROWS_AT_A_TIME = 1024  # int4_layout unpacks this many rows at a time (its temporaries stay small)


def int4_layout(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> NativeInt4Weight:
    """zoo's int4 format (reference.py: column 2j low nibble, 2j+1 high) -> int4_mm's (NativeInt4Weight)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    kp = -(-k // max(CHUNK, group_size)) * max(CHUNK, group_size)
    out = torch.empty(n, kp // 2, dtype=torch.uint8)
    for a in range(0, n, ROWS_AT_A_TIME):
        q = F.pad(unpack_int4(packed[a : a + ROWS_AT_A_TIME]), (0, kp - k))  # [rows, Kp], 0..15
        q = q.view(q.shape[0], kp // CHUNK, 2, CHUNK // 2)  # [rows, chunks, half, 64]
        out[a : a + ROWS_AT_A_TIME] = (q[:, :, 0] | (q[:, :, 1] << 4)).view(q.shape[0], kp // 2)
    pad_groups = (0, (kp - k) // group_size)
    return NativeInt4Weight(packed=out, scales=F.pad(scales.float(), pad_groups).contiguous(),
                            scaled_zeros=F.pad((zeros.float() * scales.float()), pad_groups).contiguous(),
                            group_size=group_size, in_features=k)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q, r int8 [M, Kp], scale fp32 [M, Kp/32]), x ~ scale * (q + r / 256) per block: what
    the kernels do to x, in PyTorch (for tests and for measuring the error). Kp = K rounded up to 32."""
    m, k = x.shape
    blocks = F.pad(x.float(), (0, -k % BLOCK)).view(m, -1, BLOCK)  # [M, blocks, 32]
    amax = blocks.abs().amax(dim=-1)  # [M, blocks]
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    t = blocks * inv[..., None]  # x / scale
    q = torch.round(t)
    r = torch.round((t - q) * 256).clamp(-127, 127)
    return q.to(torch.int8).view(m, -1), r.to(torch.int8).view(m, -1), amax / 127


def dequantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it after quantize_activations, in fp32 [M, K]."""
    q, r, scale = quantize_activations(x)
    parts = q.view(x.shape[0], -1, BLOCK).float() + r.view(x.shape[0], -1, BLOCK).float() / 256
    return (parts * scale[..., None]).view(x.shape[0], -1)[:, :x.shape[1]]


def int4_dequantize(weight: NativeInt4Weight) -> torch.Tensor:
    """The weight of a NativeInt4Weight in fp32 [N, K]: int4_layout undone, w = q * scale - scaled_zero."""
    n, kp = weight.packed.shape[0], weight.packed.shape[1] * 2
    chunks = weight.packed.view(n, kp // CHUNK, 1, CHUNK // 2)
    q = torch.cat([chunks & 0xF, chunks >> 4], dim=2).view(n, -1, weight.group_size).float()  # [N, groups, G]
    w = q * weight.scales[..., None] - weight.scaled_zeros[..., None]
    return w.view(n, kp)[:, :weight.in_features]

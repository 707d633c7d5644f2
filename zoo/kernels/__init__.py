"""Weight-only quantized matmul: y = x @ w.T with w stored as int8 or int4, and the dense `linear` every
float layer calls.

    weight = Int4Weight(packed, scales, zeros, group_size)  # zoo's stored format (reference.py), on its device
    layout = weight.prepare()                                # once, at load: what the device's kernel reads
    y = quantized_linear(x, layout)                          # x [..., K] -> y [..., N], in x's dtype

The stored weights (Int8Weight, Int4Weight) hold only what a checkpoint stores and never change.
prepare() makes a new object, the layout the device's kernel reads (the stored weight itself where
that kernel reads the stored format); each layout class holds one fixed set of tensors, and its
methods are its kernels (mm, dequantize_mm, dequantize). "native" is zoo's own AVX-512 VNNI kernels
(native.cpp: x quantized to int8 in blocks of 32 on each call, as llama.cpp's Q8_0), laid out by
prepare() where they build and run (native.load(): a CPU with AVX-512 VNNI, g++ and ninja;
ZOO_NATIVE=0 turns them off); elsewhere on the CPU, torch's operators (cpu.py).

Which code runs: the layout prepare() made, then x's dtype and M = rows of x (x.numel() // K):

    layout (device)                   x dtype    M       path                     kernel
    Int8Weight, Int4Weight (cuda)     any        any     "triton"                 fused dequantize-matmul (triton_matmul.py)
    native.NativeInt8Weight,          bf16       <= 32   "cpu-native"             int8 or 4-bit codes x int8 x (native.cpp)
      native.NativeInt4Weight (cpu)   bf16       > 32    "cpu-native-dequantize"  rows dequantized to bf16 by native.cpp,
                                                                                  ~4 MB at a time, each F.linear'd in cache
                                      fp32/fp16  any     "cpu-fp32"               dequantize to fp32, x @ w.T in fp32 (exact,
                                                                                  slow: for checking; bf16 is for speed)
    Int8Weight (cpu, K % 16 == 0),    any        <= 128  "cpu-op"                 torch's _weight_int8pack_mm (cpu.py)
      cpu.PaddedInt8Weight (cpu)      any        > 128   "cpu-dequantize"         dequantize (bf16; fp32 for fp32 x),
                                                                                  then F.linear
    cpu.CpuInt4Weight (cpu)           any        any     "cpu-op"                 torch's _weight_int4pack_mm_for_cpu
    Int4Weight (cpu)                  any        any     "cpu-dequantize"         only where torch lacks that operator
                                                                                  (else not prepared: an error)

torch's paths compute in fp32 for an fp32 x and in bf16 for any other (x cast to it, y cast back): an fp32
model gives the same numbers, to fp32 rounding, on every CPU. torch's int4 layout is made for the dtype of
the first x (QuantLinear's first forward: weight.prepare(x.dtype)); x of another dtype is cast to that
one. The thresholds (NATIVE_MAX_M, INT8_CPU_OP_MAX_M, BF16_NATIVE_MAX_M) are where one path overtakes the other in
`python benchmarks/matmul.py` (the README's Benchmarks has the figures).

Dense (not quantized) layers call linear() below: F.linear, except for bf16 x of at most
BF16_NATIVE_MAX_M rows on a CPU with AVX512-BF16, where native.cpp's bf16_linear reads the weight
faster (a decode step).

Memory that stays flat under varied shapes (`python benchmarks/memory_shapes.py`, README): F.linear in
bf16 on the CPU is oneDNN's GEMM, which compiles a kernel for every (M, N, K) it meets and keeps it in
two caches (oneDNN's primitive cache and ideep's, 1,024 kernels each by default), so every new (batch,
length) of a forward adds one per layer shape. zoo sets both to ONEDNN_CACHE_CAPACITY at import, enough
for the shapes of one forward, or of one prefill and its decode steps; a shape beyond them is compiled
again when it comes back. linear() also calls malloc_trim every TRIM_EVERY CPU GEMMs. Neither keeps a
`collect` flat by themselves: a forward's large blocks of new sizes (once the logits of every position)
fragment glibc's heap once its mmap threshold has risen to the largest block freed, which collect avoids
with last_only and padded lengths (the README's Activation datasets has the measurements).
"""
import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.kernels import native
from zoo.kernels.cpu import (CPU_INT8_K_MULTIPLE, CpuInt4Weight, PaddedInt8Weight, int4_dequantize_mm, int8_dequantize_mm,
                             int8_mm_cpu, pack_int4_for_cpu)
from zoo.kernels.native import NativeInt4Weight, NativeInt8Weight
from zoo.kernels.reference import (dequantize_int4, dequantize_int8, int4_linear_ref, int8_linear_ref, pack_int4,
                                   unpack_int4)
from zoo.memory import release_freed_memory

INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_DTYPE = torch.bfloat16  # torch's CPU paths compute in bf16 for any x but an fp32 one (compute_dtype)
INT8_CPU_OP_MAX_M = 128  # rows of x up to which torch's int8 operator beats dequantize-then-F.linear on CPU
NATIVE_MAX_M = 32  # rows of x up to which the native kernels beat their dequantize-then-F.linear (both formats)
BF16_NATIVE_MAX_M = 8  # rows of bf16 x up to which native bf16_linear beats F.linear (linear() below)
# Both read by oneDNN and ideep when the first GEMM runs, hence set here, at import; a value set before zoo
# is imported is kept (ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY; LRU_CACHE_CAPACITY=0 crashes torch).
ONEDNN_CACHE_CAPACITY = 64
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, str(ONEDNN_CACHE_CAPACITY))
TRIM_EVERY = int(os.environ.get("ZOO_TRIM_EVERY", 1024))  # a LLaMA layer's forward is 7 GEMMs
_cpu_gemms = itertools.count(1)
CPU_INT4_OP = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")  # torch >= 2.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's CPU paths compute in for an x of `dtype`: fp32 for fp32 (the same numbers as the
    native kernels' "cpu-fp32", to fp32 rounding, whichever CPU runs them), else bf16 (the fast one)."""
    return torch.float32 if dtype == torch.float32 else CPU_DTYPE


@dataclass(frozen=True)
class Int8Weight:
    """int8 [N, K], symmetric, one scale per output channel: w[n, k] = qweight[n, k] * scales[n].

    Its own layout where a kernel reads the stored format: Triton on CUDA, torch's CPU operator when
    K is a multiple of 16 (cpu.py) and the native kernels do not run.
    """
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor   # [N], fp32 or the activation dtype

    def __post_init__(self):
        n = self.qweight.shape[0]
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2 or self.scales.shape != (n,):
            raise ValueError(f"Int8Weight needs qweight int8 [N, K] and scales [N], got qweight "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}, scales {tuple(self.scales.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # (N, K)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @torch.compiler.disable  # layout work, once: run as Python even when a compiled forward reaches it first
    def prepare(self, dtype: torch.dtype = CPU_DTYPE) -> "Int8Weight | NativeInt8Weight | PaddedInt8Weight":
        """The layout quantized_linear reads on this weight's device (module docstring); self is unchanged.
        Every int8 layout takes x of any dtype, so `dtype` (x's, as Int4Weight.prepare's) changes nothing."""
        if self.device.type != "cpu":
            return self
        if native.load() is not None:
            return NativeInt8Weight(self.qweight, self.scales.float().contiguous())
        if self.shape[1] % CPU_INT8_K_MULTIPLE:
            return PaddedInt8Weight.of(self.qweight, self.scales)
        return self

    def stored(self) -> "Int8Weight":
        return self

    def triton_mm(self, x: torch.Tensor) -> torch.Tensor:
        from zoo.kernels.triton_matmul import w8a16_matmul  # imported here: CPU-only use needs no Triton
        return w8a16_matmul(x, self.qweight, self.scales)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8_mm_cpu(x, self.qweight, self.scales)

    def dequantize_mm(self, x: torch.Tensor) -> torch.Tensor:
        return int8_dequantize_mm(x, self.qweight, self.scales)


@dataclass(frozen=True)
class Int4Weight:
    """int4, one scale and zero per group of K: w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g].

    `packed` holds two q per byte, column 2j in the low nibble (reference.pack_int4). Its own layout
    on CUDA (Triton reads it); on the CPU prepare() lays it out for native.cpp or torch's operator.
    """
    packed: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # [N, K/group_size]
    zeros: torch.Tensor   # [N, K/group_size], floating point
    group_size: int

    def __post_init__(self):
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        groups = k // self.group_size if self.group_size in INT4_GROUP_SIZES and k % self.group_size == 0 else None
        if (self.packed.dtype != torch.uint8 or self.packed.dim() != 2 or groups is None
                or self.scales.shape != (n, groups) or self.zeros.shape != (n, groups)):
            raise ValueError(f"Int4Weight needs packed uint8 [N, K/2], group_size in {INT4_GROUP_SIZES} dividing K, "
                             f"scales and zeros [N, K/group_size]; got packed {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}, group_size {self.group_size}, scales "
                             f"{tuple(self.scales.shape)}, zeros {tuple(self.zeros.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]  # (N, K)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @torch.compiler.disable  # as Int8Weight.prepare
    def prepare(self, dtype: torch.dtype = CPU_DTYPE) -> "Int4Weight | NativeInt4Weight | CpuInt4Weight":
        """The layout quantized_linear reads on this weight's device (module docstring); self is unchanged.
        The CPU layouts are copies in another form: QuantLinear then lets the stored weight go. torch's is
        made for x of `dtype` (its scales are in compute_dtype(dtype)); x of another dtype is cast to it."""
        if self.device.type != "cpu":
            return self
        if native.load() is not None:
            return native.int4_layout(self.packed, self.scales, self.zeros, self.group_size)
        if CPU_INT4_OP:
            return pack_int4_for_cpu(self.packed, self.scales, self.zeros, self.group_size, compute_dtype(dtype))
        return self

    def stored(self) -> "Int4Weight":
        return self

    def triton_mm(self, x: torch.Tensor) -> torch.Tensor:
        from zoo.kernels.triton_matmul import w4a16_matmul
        return w4a16_matmul(x, self.packed, self.scales, self.zeros, self.group_size)

    def dequantize_mm(self, x: torch.Tensor) -> torch.Tensor:
        return int4_dequantize_mm(x, self.packed, self.scales, self.zeros, self.group_size)


Layout = Int8Weight | Int4Weight | NativeInt8Weight | NativeInt4Weight | PaddedInt8Weight | CpuInt4Weight


def quantized_path(x: torch.Tensor, weight: Layout) -> str:
    """The path quantized_linear(x, weight) takes (module docstring's table)."""
    _check_device(x, weight.device)
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cuda":
        return "triton"
    if isinstance(weight, (NativeInt8Weight, NativeInt4Weight)):
        if x.dtype != CPU_DTYPE:
            return "cpu-fp32"
        return "cpu-native" if rows <= NATIVE_MAX_M else "cpu-native-dequantize"
    if isinstance(weight, CpuInt4Weight):
        return "cpu-op"
    if isinstance(weight, Int4Weight):
        if CPU_INT4_OP:
            raise RuntimeError("this Int4Weight was not prepared for the CPU: call weight.prepare() once, at load")
        return "cpu-dequantize"
    if rows > INT8_CPU_OP_MAX_M:
        return "cpu-dequantize"
    if isinstance(weight, Int8Weight) and weight.shape[1] % CPU_INT8_K_MULTIPLE:
        raise RuntimeError(f"this Int8Weight's K = {weight.shape[1]} is not a multiple of {CPU_INT8_K_MULTIPLE}, "
                           f"which torch's CPU operator needs: call weight.prepare() once, at load (it pads K)")
    return "cpu-op"


def quantized_linear(x: torch.Tensor, weight: Layout) -> torch.Tensor:
    """y = x @ w.T for x [..., K] (fp32/fp16/bf16) -> [..., N] in x's dtype. Bias is the caller's."""
    path = quantized_path(x, weight)
    if path == "triton":
        return weight.triton_mm(x)  # [..., N]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if path == "cpu-fp32":
        y = x2.float() @ weight.dequantize().T
    elif path == "cpu-native":
        y = weight.mm(x2.to(CPU_DTYPE).contiguous())
    elif path == "cpu-native-dequantize":
        y = weight.dequantize_mm(x2.to(CPU_DTYPE).contiguous())
    else:  # torch's "cpu-op", "cpu-dequantize": in fp32 for fp32 x, else bf16; torch's int4 layout in its own
        dtype = weight.dtype if isinstance(weight, CpuInt4Weight) else compute_dtype(x.dtype)
        y = (weight.mm if path == "cpu-op" else weight.dequantize_mm)(x2.to(dtype).contiguous())
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])  # [..., N]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), the one every dense (not quantized) linear layer of zoo's models calls.

    On the CPU, a bf16 x of at most BF16_NATIVE_MAX_M rows (a decode step) goes through native.cpp's
    bf16_linear where it runs (AVX512-BF16): the same sums in fp32, in another order, rounded to bf16 once;
    it reads the weight faster than F.linear at those rows (benchmarks/matmul.py). Not when compiling
    (inductor's own prepacked GEMMs do better inside a graph) nor when autograd records (the kernel has
    no backward).
    """
    if dense_path(x, weight) == "cpu-native-bf16":
        y = torch.ops.zoo_native.bf16_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
        return y.view(*x.shape[:-1], y.shape[-1])  # [..., N]
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and next(_cpu_gemms) % TRIM_EVERY == 0:
        release_freed_memory()
    return F.linear(x, weight, bias)


def dense_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The path linear(x, weight) takes: "cpu-native-bf16" (its docstring says when) or "torch" (F.linear)."""
    if (not torch.compiler.is_compiling() and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() <= BF16_NATIVE_MAX_M * x.shape[-1] and x.numel() and weight.dtype == torch.bfloat16
            and weight.stride(-1) == 1 and native.bf16_linear_runs()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return "cpu-native-bf16"
    return "torch"


def _check_device(x: torch.Tensor, device: torch.device):
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")
    if x.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"quantized matmul runs on cpu and cuda, not {x.device.type}")


__all__ = [
    "Int8Weight", "Int4Weight", "Layout", "quantized_linear", "compute_dtype", "quantized_path", "linear", "INT4_GROUP_SIZES",
    "pack_int4", "unpack_int4", "dequantize_int8", "dequantize_int4", "int8_linear_ref", "int4_linear_ref",
]

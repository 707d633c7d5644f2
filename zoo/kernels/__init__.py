"""Weight-only quantized matmul: y = x @ w.T with w stored as int8 or int4, one entry point per format.

    weight = Int4Weight(packed, scales, zeros, group_size)  # zoo's stored format (reference.py), on its device
    weight.prepare()                                         # once, at load: lays out what the device needs
    y = int4_linear(x, weight)                               # x [..., K] -> y [..., N], in x's dtype

    weight = Int8Weight(qweight, scales).prepare()
    y = int8_linear(x, weight)

Which code runs, by device, activation dtype and M = rows of x (x.numel() // K). "native" is zoo's
own AVX-512 VNNI kernels (native.cpp: x quantized to int8 in blocks of 32 on each call, as
llama.cpp's Q8_0), chosen by prepare() where they build and run (native.load(): a CPU with AVX-512
VNNI, g++ and ninja; ZOO_NATIVE=0 turns them off); elsewhere the rows under "torch" run:

    device  format  x dtype         M       path
    cuda    int8    fp16/bf16/fp32  any     Triton fused dequantize-matmul (triton_matmul.py)
    cuda    int4    fp16/bf16/fp32  any     Triton fused dequantize-matmul
    native:
    cpu     int8    bf16            <= 32   native int8_mm: int8 weight x int8 x (native.py)
    cpu     int4    bf16            <= 32   native int4_mm: 4-bit codes x int8 x, zoo's layout made at load
    cpu     any     bf16            > 32    "cpu-native-dequantize": the weight dequantized to bf16 by
                                            native.cpp on each call, about 4 MB of rows at a time, each
                                            block multiplied by F.linear while it is in cache
    cpu     any     fp32 / fp16     any     "cpu-fp32": dequantize to fp32, then x @ w.T in fp32 (exact, slow:
                                            the reference's math; fp32 on the CPU is for checking, bf16 for speed)
    torch:
    cpu     int8    bf16            <= 128  torch's _weight_int8pack_mm (cpu.py); K not a multiple of 16:
                                            the weight padded once by prepare(), x on each call
    cpu     int8    bf16            > 128   dequantize to bf16 on each call, then F.linear (cpu.py)
    cpu     int4    bf16            any     torch's _weight_int4pack_mm_for_cpu (cpu.py)
    cpu     int4    bf16            any     dequantize, then F.linear: only if torch lacks that operator
    cpu     any     fp32 / fp16     any     x cast to bf16, the bf16 row above, y cast back

Dense (not quantized) layers call linear() below: F.linear, except for bf16 x of at most
BF16_NATIVE_MAX_M rows on a CPU with AVX512-BF16, where native.cpp's bf16_linear reads the weight
faster (a decode step: TinyLlama-1.1B's eager bf16 decode step 80 -> 61 ms, 2 threads).

The CPU rows' thresholds (INT8_CPU_OP_MAX_M, one int4 operator for every M, x cast to bf16) were
measured with `python benchmarks/kernels.py` on LLaMA-7B layer shapes, the native rows'
(NATIVE_MAX_M) on a 5632 x 2048 layer (TinyLlama-1.1B's MLP), 2 threads, bf16 x: at M = 1 int8
27 GB/s of weights (torch's operator 23), int4 31 (torch's 31); at M = 16 native int8 1.09 ms
against 1.42 dequantize-then-F.linear, M = 32 1.82 against 1.91, M = 128 7.1 against 4.2 (int4
alike; F.linear on a bf16 weight 3.7).

Memory that stays flat under varied shapes (`python benchmarks/memory_shapes.py`, README): F.linear in
bf16 on the CPU is oneDNN's GEMM, which compiles a kernel for every (M, N, K) it meets and keeps it in
two caches (oneDNN's primitive cache and ideep's, 1,024 kernels each by default), so every new (batch,
length) of a forward adds one per layer shape. zoo sets both to ONEDNN_CACHE_CAPACITY at import, enough
for the shapes of one forward, or of one prefill and its decode steps; a shape beyond them is compiled
again when it comes back. The kernels compiled and dropped meanwhile land among the forward's large,
short-lived tensors in glibc's heap, which then keeps what they free (glibc's mmap threshold rises to
the largest block freed): every TRIM_EVERY CPU GEMMs of linear() give that memory back (malloc_trim).
"""
import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.kernels import native
from zoo.kernels.cpu import (CPU_INT8_K_MULTIPLE, CpuInt4Weight, int4_dequantize_mm, int4_mm_cpu, int8_dequantize_mm,
                             int8_mm_cpu, pack_int4_for_cpu)
from zoo.kernels.reference import (dequantize_int4, dequantize_int8, int4_linear_ref, int8_linear_ref, pack_int4,
                                   unpack_int4)

INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_DTYPE = torch.bfloat16  # the CPU paths compute in bf16 whatever x's dtype
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


@dataclass
class Int8Weight:
    """int8 [N, K], symmetric, one scale per output channel: w[n, k] = qweight[n, k] * scales[n].

    `native` is set by prepare() on a CPU where zoo's native kernel runs (native.py): it reads qweight
    as it is, with the scales in fp32 (`native_scales`). Elsewhere `cpu` is qweight padded with zero
    columns to a multiple of 16 for torch's CPU operator (cpu.py), made by prepare() on the CPU when K
    needs it (never saved); qweight is then a view of its first K columns, so the weight is held
    once. Round K (every LLaMA size) leaves it None.
    """
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor   # [N], fp32 or the activation dtype
    cpu: torch.Tensor | None = None  # int8 [N, K padded to 16]
    native_scales: torch.Tensor | None = None  # fp32 [N], for native.int8_mm

    def __post_init__(self):
        n = self.qweight.shape[0]
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2 or self.scales.shape != (n,):
            raise ValueError(f"Int8Weight needs qweight int8 [N, K] and scales [N], got qweight "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}, scales {tuple(self.scales.shape)}")

    @torch.compiler.disable  # layout work, once: run as Python even when a compiled forward reaches it first
    def prepare(self, drop_packed: bool = False) -> "Int8Weight":
        """On the CPU: the native kernel's fp32 scales, or else, with K not a multiple of 16, the weight
        padded for torch's operator (`cpu`). Else nothing to lay out: the Triton kernel reads the stored format."""
        k = self.qweight.shape[1]
        if self.qweight.device.type == "cpu" and native.load() is not None:
            self.native_scales = self.scales.float().contiguous()
        elif self.qweight.device.type == "cpu" and k % CPU_INT8_K_MULTIPLE and self.cpu is None:
            self.cpu = F.pad(self.qweight, (0, -k % CPU_INT8_K_MULTIPLE))  # [N, K padded]: zero columns
            self.qweight = self.cpu[:, :k]  # [N, K], the same memory
        return self


@dataclass
class Int4Weight:
    """int4, one scale and zero per group of K: w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g].

    `packed` holds two q per byte, column 2j in the low nibble (reference.pack_int4). `cpu` is the
    CPU layout of the same weight, made by prepare() and never saved: native.py's (NativeInt4Weight)
    where zoo's native kernel runs, else torch's operator's (CpuInt4Weight, which depends on the CPU's
    instruction set); int4_linear reads only `cpu` there. prepare(drop_packed=True), as QuantLinear
    calls it on its first forward, then frees `packed`, `scales` and `zeros` so the weight is held once.
    """
    packed: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # [N, K/group_size]
    zeros: torch.Tensor   # [N, K/group_size], floating point
    group_size: int
    cpu: CpuInt4Weight | native.NativeInt4Weight | None = None

    def __post_init__(self):
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        groups = k // self.group_size if self.group_size in INT4_GROUP_SIZES and k % self.group_size == 0 else None
        if (self.packed.dtype != torch.uint8 or self.packed.dim() != 2 or groups is None
                or self.scales.shape != (n, groups) or self.zeros.shape != (n, groups)):
            raise ValueError(f"Int4Weight needs packed uint8 [N, K/2], group_size in {INT4_GROUP_SIZES} dividing K, "
                             f"scales and zeros [N, K/group_size]; got packed {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}, group_size {self.group_size}, scales "
                             f"{tuple(self.scales.shape)}, zeros {tuple(self.zeros.shape)}")

    @torch.compiler.disable  # as Int8Weight.prepare
    def prepare(self, drop_packed: bool = False) -> "Int4Weight":
        """Lay the weight out for the device it is on: the native or torch's CPU layout on CPU, nothing on CUDA.

        drop_packed: on CPU, then free `packed`, `scales` and `zeros` (only `cpu`, which holds its own
        scales and zeros, is read there), so the weight is held once; it can then no longer be saved
        or moved to another device.
        """
        on_cpu = self.packed is not None and self.packed.device.type == "cpu"
        if on_cpu and native.load() is not None:
            self.cpu = native.int4_layout(self.packed, self.scales, self.zeros, self.group_size)
        elif on_cpu and CPU_INT4_OP:
            self.cpu = pack_int4_for_cpu(self.packed, self.scales, self.zeros, self.group_size, CPU_DTYPE)
        if self.cpu is not None and drop_packed:
            self.packed = self.scales = self.zeros = None
        return self


def int8_path(x: torch.Tensor, weight: Int8Weight) -> str:
    """The code int8_linear runs for this x: "triton", "cpu-native", "cpu-fp32", "cpu-op" or "cpu-dequantize"
    (module docstring)."""
    _check_device(x, weight.qweight)
    if x.device.type == "cuda":
        return "triton"
    if weight.native_scales is not None and x.dtype != CPU_DTYPE:
        return "cpu-fp32"
    if weight.native_scales is not None:
        return "cpu-native" if x.numel() // x.shape[-1] <= NATIVE_MAX_M else "cpu-native-dequantize"
    if x.numel() // x.shape[-1] > INT8_CPU_OP_MAX_M:
        return "cpu-dequantize"
    if weight.cpu is None and weight.qweight.shape[1] % CPU_INT8_K_MULTIPLE:
        raise RuntimeError(f"this Int8Weight's K = {weight.qweight.shape[1]} is not a multiple of "
                           f"{CPU_INT8_K_MULTIPLE}, which torch's CPU operator needs: call weight.prepare() once, at "
                           f"load (it pads K)")
    return "cpu-op"


def int4_path(x: torch.Tensor, weight: Int4Weight) -> str:
    """The code int4_linear runs for this x: "triton", "cpu-native", "cpu-fp32", "cpu-op" or "cpu-dequantize"
    (module docstring)."""
    _check_device(x, weight.packed if weight.packed is not None else weight.cpu.packed)
    if x.device.type == "cuda":
        return "triton"
    if isinstance(weight.cpu, native.NativeInt4Weight):
        if x.dtype != CPU_DTYPE:
            return "cpu-fp32"
        return "cpu-native" if x.numel() // x.shape[-1] <= NATIVE_MAX_M else "cpu-native-dequantize"
    if weight.cpu is not None:
        return "cpu-op"
    if CPU_INT4_OP:
        raise RuntimeError("this Int4Weight was not prepared for the CPU: call weight.prepare() once, at load")
    return "cpu-dequantize"


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """y = x @ w.T for x [..., K] (fp32/fp16/bf16) -> [..., N] in x's dtype. Bias is the caller's."""
    path = int8_path(x, weight)
    if path == "triton":
        from zoo.kernels.triton_matmul import w8a16_matmul  # imported here: CPU-only use needs no Triton
        return w8a16_matmul(x, weight.qweight, weight.scales)
    if path == "cpu-native":
        y = torch.ops.zoo_native.int8_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight.qweight, weight.native_scales)
        return y.view(*x.shape[:-1], y.shape[-1])  # [..., N]
    if path == "cpu-native-dequantize":
        y = torch.ops.zoo_native.int8_dequantize_mm(x.reshape(-1, x.shape[-1]), weight.qweight, weight.native_scales)
        return y.view(*x.shape[:-1], y.shape[-1])  # [..., N]
    if path == "cpu-fp32":
        return int8_linear_ref(x, weight.qweight, weight.scales)
    x2 = x.reshape(-1, x.shape[-1]).to(CPU_DTYPE).contiguous()  # [M, K]
    if path == "cpu-op" and weight.cpu is not None:  # K padded by prepare(): x takes zero columns too
        y = int8_mm_cpu(F.pad(x2, (0, weight.cpu.shape[1] - x2.shape[1])), weight.cpu, weight.scales)
    elif path == "cpu-op":
        y = int8_mm_cpu(x2, weight.qweight, weight.scales)
    else:
        y = int8_dequantize_mm(x2, weight.qweight, weight.scales)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])  # [..., N]


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """y = x @ w.T for x [..., K] (fp32/fp16/bf16) -> [..., N] in x's dtype. Bias is the caller's."""
    path = int4_path(x, weight)
    if path == "triton":
        from zoo.kernels.triton_matmul import w4a16_matmul
        return w4a16_matmul(x, weight.packed, weight.scales, weight.zeros, weight.group_size)
    if path == "cpu-native":
        w = weight.cpu
        y = torch.ops.zoo_native.int4_mm(x.reshape(-1, x.shape[-1]).contiguous(), w.packed, w.scales,
                                         w.scaled_zeros, w.group_size)
        return y.view(*x.shape[:-1], y.shape[-1])  # [..., N]
    if path == "cpu-native-dequantize":
        w = weight.cpu
        y = torch.ops.zoo_native.int4_dequantize_mm(x.reshape(-1, x.shape[-1]), w.packed, w.scales, w.scaled_zeros,
                                                    w.group_size)
        return y.view(*x.shape[:-1], y.shape[-1])  # [..., N]
    if path == "cpu-fp32":
        return (x.float() @ native.int4_dequantize(weight.cpu).T).to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(CPU_DTYPE).contiguous()  # [M, K]
    if path == "cpu-op":
        y = int4_mm_cpu(x2, weight.cpu)
    else:
        y = int4_dequantize_mm(x2, weight.packed, weight.scales, weight.zeros, weight.group_size)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])  # [..., N]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), the one every dense (not quantized) linear layer of zoo's models calls.

    On the CPU, a bf16 x of at most BF16_NATIVE_MAX_M rows (a decode step) goes through native.cpp's
    bf16_linear where it runs (AVX512-BF16): the same sums in fp32, in another order, rounded to bf16 once.
    Measured with 2 threads on TinyLlama-1.1B's layers, weights read from memory: 31-58 GB/s against
    F.linear's 23-30 at 1 to 8 rows, even at 16. Not when compiling (inductor's own prepacked
    GEMMs do better inside a graph) nor when autograd records (the kernel has no backward).
    """
    if (not torch.compiler.is_compiling() and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() <= BF16_NATIVE_MAX_M * x.shape[-1] and x.numel() and weight.dtype == torch.bfloat16
            and weight.stride(-1) == 1 and native.bf16_linear_runs()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        y = torch.ops.zoo_native.bf16_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
        return y.view(*x.shape[:-1], y.shape[-1])  # [..., N]
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and next(_cpu_gemms) % TRIM_EVERY == 0:
        from zoo.formats.files import release_freed_memory  # here: zoo.formats imports the models, which import this
        release_freed_memory()
    return F.linear(x, weight, bias)


def _check_device(x: torch.Tensor, w: torch.Tensor):
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}")
    if x.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"quantized matmul runs on cpu and cuda, not {x.device.type}")


__all__ = [
    "Int8Weight", "Int4Weight", "int8_linear", "int4_linear", "linear", "int8_path", "int4_path",
    "pack_int4", "unpack_int4", "dequantize_int8", "dequantize_int4", "int8_linear_ref", "int4_linear_ref",
]

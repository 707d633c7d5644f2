"""Quantized matmul kernels against the plain-PyTorch reference (zoo/kernels/reference.py).

Errors are max|y - ref| / max|ref|, ref = dequantize in fp32 and multiply in fp32 (kept in fp32).
Tolerances:
  fp32  1e-5   both sides sum K fp32 products in different orders: ~sqrt(K) * 2^-24 (measured <= 3e-6
               for K = 4096, <= 5e-7 for K <= 512); an indexing bug or a lost K tile costs ~1e-1.
  fp16  3e-3   y is rounded to fp16, and so is each dequantized weight (Triton, dequantize paths) or
               scale (torch's operators): <= 2^-11 relative each (measured <= 9e-4).
  bf16  1e-2   the same with bf16's 8 significant bits: <= 2^-8 = 3.9e-3 each, so <= 7.8e-3 plus the
               sums' own error (measured <= 7.7e-3, torch's int8 operator, whose scales are in bf16).
               The Triton interpreter rounds fp32 -> bf16 by truncation (off by up to 2^-7, always
               toward zero) where the GPU rounds to nearest: 2e-2 there (measured <= 1.1e-2).
The Triton kernels run on this CPU under TRITON_INTERPRET=1 in one subprocess (the variable must be
set before the kernels are defined); their cases are small, ~10-30 program x K-tile steps each.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from zoo.kernels import Int4Weight, Int8Weight, native
from zoo.kernels import quantized_linear as int4_linear, quantized_linear as int8_linear  # one entry, both formats
from zoo.kernels import quantized_path as int4_path, quantized_path as int8_path
from zoo.kernels.cpu import (int4_dequantize_mm, int4_mm_cpu, int8_dequantize_mm, int8_mm_cpu,
                             pack_int4_for_cpu)
from zoo.kernels.reference import (dequantize_int4, dequantize_int8, int4_linear_ref, int8_linear_ref, pack_int4,
                                   unpack_int4)

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
INTERPRETER_TOL = {**TOL, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def random_int8(n, k, seed=0, scale_dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.01 + 1e-3
    return qweight.to(device), scales.to(scale_dtype).to(device)


def random_int4(n, k, group_size, symmetric=False, seed=0, scale_dtype=torch.float32, device="cpu"):
    """packed, scales, zeros: asymmetric zeros are arbitrary floats in [0, 15] (an HQQ-style zero)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // group_size, generator=g) * 0.1 + 0.01
    zeros = torch.full_like(scales, 8.0) if symmetric else torch.rand(n, k // group_size, generator=g) * 15
    return pack_int4(q).to(device), scales.to(scale_dtype).to(device), zeros.to(scale_dtype).to(device)


def random_x(shape, dtype, seed=1, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


# ---------------------------------------------------------------- the formats and the reference

def test_pack_int4_nibble_order():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]  # column 2j low nibble, 2j+1 high nibble
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (37, 130), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    packed = torch.randint(0, 256, (5, 64), dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[16, 0]]))


def test_dequantize_formulas():
    qweight = torch.tensor([[-127, 0, 5], [1, 2, 3]], dtype=torch.int8)
    assert torch.equal(dequantize_int8(qweight, torch.tensor([0.5, 2.0])),
                       torch.tensor([[-63.5, 0.0, 2.5], [2.0, 4.0, 6.0]]))
    # one row, K = 64, group 32: q = k % 16; group 0 (zero 8, scale 1), group 1 (zero 2.5, scale 0.5)
    q = torch.arange(64) % 16
    w = dequantize_int4(pack_int4(q[None]), torch.tensor([[1.0, 0.5]]), torch.tensor([[8.0, 2.5]]), 32)
    expected = torch.cat([q[:32] - 8.0, (q[32:] - 2.5) * 0.5])
    assert torch.equal(w[0], expected)


def test_reference_linear_is_x_times_w_transposed():
    qweight, scales = random_int8(24, 64)
    x = random_x((2, 3, 64), torch.float32)
    y = int8_linear_ref(x, qweight, scales)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ dequantize_int8(qweight, scales).T)
    packed, s, z = random_int4(24, 64, 32)
    torch.testing.assert_close(int4_linear_ref(x, packed, s, z, 32), x @ dequantize_int4(packed, s, z, 32).T)
    assert int4_linear_ref(x.bfloat16(), packed, s, z, 32).dtype == torch.bfloat16


# ---------------------------------------------------------------- torch's CPU operators

@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_int8_cpu_operator(m, dtype):
    dtype = DTYPES[dtype]
    qweight, scales = random_int8(70, 96)
    x = random_x((m, 96), dtype)
    y = int8_mm_cpu(x, qweight, scales)
    assert y.dtype == dtype and y.shape == (m, 70)
    assert rel_err(y, int8_linear_ref(x.float(), qweight, scales)) <= TOL[dtype]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int4_cpu_operator(group_size, dtype, symmetric):
    dtype = DTYPES[dtype]
    n, k = 45, 2 * 256  # N = 45 is padded to 48 for the operator
    packed, scales, zeros = random_int4(n, k, group_size, symmetric)
    weight = pack_int4_for_cpu(packed, scales, zeros, group_size, dtype=dtype)
    for m in (1, 5, 33):
        x = random_x((m, k), dtype, seed=m)
        y = int4_mm_cpu(x, weight)
        assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
        assert rel_err(y, int4_linear_ref(x.float(), packed, scales, zeros, group_size)) <= TOL[dtype]


def test_int4_cpu_zero_convention_is_exact():
    """zero_torch = (8 - zero) * scale gives torch's (q - 8) * scale + zero_torch = our (q - zero) * scale:
    with an identity x, y is the dequantized weight itself."""
    packed, scales, zeros = random_int4(32, 64, 32)
    weight = pack_int4_for_cpu(packed, scales, zeros, 32, dtype=torch.float32)
    w = int4_mm_cpu(torch.eye(64), weight).T  # [N, K]
    torch.testing.assert_close(w, dequantize_int4(packed, scales, zeros, 32), rtol=1e-6, atol=1e-6)


def test_int4_cpu_layout_made_in_row_blocks_equals_whole():
    """pack_int4_for_cpu converts CPU_INT4_ROWS rows at a time (to bound the int32 temporary): the
    blocks must join into exactly the layout of one call on the whole (padded) weight, on this CPU."""
    from zoo.kernels import cpu
    n, k = 2 * cpu.CPU_INT4_ROWS + 72, 128  # two full blocks and a ragged tail, padded to 16
    packed, scales, zeros = random_int4(n, k, 32)
    whole_q = torch.nn.functional.pad(unpack_int4(packed).to(torch.int32), (0, 0, 0, -n % 16))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(whole_q, 2)
    assert torch.equal(pack_int4_for_cpu(packed, scales, zeros, 32).packed, whole)


def test_int4_cpu_weight_checks_dtype():
    packed, scales, zeros = random_int4(16, 64, 32)
    weight = pack_int4_for_cpu(packed, scales, zeros, 32)
    with pytest.raises(TypeError):
        int4_mm_cpu(torch.randn(1, 64), weight)  # packed for bf16, given fp32


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dequantize_then_matmul_paths(dtype):
    dtype = DTYPES[dtype]
    x = random_x((7, 128), dtype)
    qweight, scales = random_int8(40, 128)
    assert rel_err(int8_dequantize_mm(x, qweight, scales), int8_linear_ref(x.float(), qweight, scales)) <= TOL[dtype]
    packed, s, z = random_int4(40, 128, 64)
    assert rel_err(int4_dequantize_mm(x, packed, s, z, 64), int4_linear_ref(x.float(), packed, s, z, 64)) <= TOL[dtype]


# ---------------------------------------------------------------- the dispatcher

@pytest.fixture
def torch_paths(monkeypatch):
    """The dispatcher as on a CPU where zoo's native kernels do not run (ZOO_NATIVE=0): torch's operators."""
    monkeypatch.setattr(native, "load", lambda: None)


@pytest.fixture(params=["native", "torch"])
def cpu_paths(request, monkeypatch):
    """Each CPU dispatch in turn: zoo's native kernels (where this CPU runs them), then torch's operators."""
    if request.param == "torch" or not native.cpu_supported():
        monkeypatch.setattr(native, "load", lambda: None)
    return request.param


def test_dispatch_paths_on_cpu(torch_paths):
    int8 = Int8Weight(*random_int8(32, 64)).prepare()
    for shape, path in [((1, 64), "cpu-op"), ((128, 64), "cpu-op"), ((129, 64), "cpu-dequantize"),
                        ((2, 64, 64), "cpu-op"), ((3, 64, 64), "cpu-dequantize")]:
        for dtype in DTYPES.values():
            assert int8_path(torch.zeros(shape, dtype=dtype), int8) == path, (shape, dtype)
    int4 = Int4Weight(*random_int4(32, 64, 32), group_size=32)
    with pytest.raises(RuntimeError, match="prepare"):
        int4_path(torch.zeros(1, 64), int4)  # not prepared: no silent slow path
    int4 = int4.prepare()
    for m in (1, 16, 1000):
        assert int4_path(torch.zeros(m, 64, dtype=torch.bfloat16), int4) == "cpu-op"
    with pytest.raises(ValueError, match="x is on meta"):
        int8_path(torch.zeros(1, 64, device="meta"), int8)


def test_torch_cpu_paths_compute_an_fp32_x_in_fp32(torch_paths):
    """An fp32 x through torch's operators and dequantize paths (any layout: int8 at K % 16 == 0 and padded, int4
    packed for fp32 by prepare(fp32)) gives the fp32 reference to fp32 rounding, as the native kernels' "cpu-fp32"
    does: an fp32 model's numbers do not depend on the CPU. An x of another dtype on the fp32 int4 layout is cast."""
    for k in (64, 72):
        qweight, scales = random_int8(40, k)
        weight = Int8Weight(qweight, scales).prepare(torch.float32)
        for m in (1, 129):  # "cpu-op", "cpu-dequantize"
            x = random_x((m, k), torch.float32, seed=m)
            assert rel_err(int8_linear(x, weight), int8_linear_ref(x, qweight, scales)) <= TOL[torch.float32], (k, m)
    packed, s, z = random_int4(40, 128, 32)
    int4 = Int4Weight(packed, s, z, group_size=32).prepare(torch.float32)
    assert int4.dtype == torch.float32
    for m in (1, 200):
        x = random_x((m, 128), torch.float32, seed=m)
        assert rel_err(int4_linear(x, int4), int4_linear_ref(x, packed, s, z, 32)) <= TOL[torch.float32], m
        y = int4_linear(x.bfloat16(), int4)
        assert y.dtype == torch.bfloat16 and rel_err(y, int4_linear_ref(x.bfloat16().float(), packed, s, z, 32)) <= 4e-3


def test_native_dispatch_paths_on_cpu():
    if native.load() is None:  # not this CPU: test_native.py checks that
        assert not native.cpu_supported()
        return
    int8 = Int8Weight(*random_int8(32, 72)).prepare()
    assert isinstance(int8, native.NativeInt8Weight) and int8.scales.dtype == torch.float32  # odd K: nothing padded
    for shape, path in [((1, 72), "cpu-native"), ((32, 72), "cpu-native"), ((33, 72), "cpu-native-dequantize")]:
        assert int8_path(torch.zeros(shape, dtype=torch.bfloat16), int8) == path, shape
        for dtype in (torch.float32, torch.float16):  # exact fp32 math: for checking, not for speed
            assert int8_path(torch.zeros(shape, dtype=dtype), int8) == "cpu-fp32", (shape, dtype)
    int4 = Int4Weight(*random_int4(32, 64, 32), group_size=32).prepare()
    assert isinstance(int4, native.NativeInt4Weight)
    for m in (1, 16, 32, 33, 1000):
        assert int4_path(torch.zeros(m, 64, dtype=torch.bfloat16), int4) == ("cpu-native" if m <= 32 else
                                                                             "cpu-native-dequantize")
        assert int4_path(torch.zeros(m, 64), int4) == "cpu-fp32"


def test_int8_weight_pads_k_once_for_the_cpu_operator(torch_paths):
    """torch's int8 operator needs K % 16 == 0 (cpu.py): prepare() pads the weight with zero columns once,
    keeps qweight as a view of the same memory (held once, saved unpadded), and int8_linear pads x."""
    qweight, scales = random_int8(40, 72)
    weight = Int8Weight(qweight.clone(), scales)
    with pytest.raises(RuntimeError, match=r"K = 72 is not a multiple of 16.*call weight.prepare\(\)"):
        int8_linear(torch.zeros(3, 72), weight)  # unprepared: a clear error, not torch's garbage or SIGSEGV
    with pytest.raises(ValueError, match=r"needs K a multiple of 16.*got weight \(40, 72\)"):
        int8_mm_cpu(torch.zeros(3, 72, dtype=torch.bfloat16), qweight, scales)
    weight = weight.prepare()
    assert weight.padded.shape == (40, 80) and torch.equal(weight.padded[:, 72:], torch.zeros(40, 8, dtype=torch.int8))
    assert torch.equal(weight.stored().qweight, qweight) and weight.stored().qweight.data_ptr() == weight.padded.data_ptr()
    for m in (1, 17, 129):  # the padded operator, and the dequantize path past INT8_CPU_OP_MAX_M
        x = random_x((m, 72), torch.bfloat16, seed=m)
        assert rel_err(int8_linear(x, weight), int8_linear_ref(x.float(), qweight, scales)) <= TOL[torch.bfloat16]
    assert (w := Int8Weight(*random_int8(40, 96))).prepare() is w  # round K: nothing padded, nothing copied


def test_padding_costs_round_k_nothing(torch_paths):
    """The operator calls of int8_linear: round K runs torch's operator on x as it is (what it ran before
    odd K was padded), odd K adds one pad of x; both call the operator once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    for k, pads in ((96, 0), (72, 1)):
        weight = Int8Weight(*random_int8(40, k)).prepare()
        x = random_x((1, k), torch.bfloat16)
        with Ops() as ops:
            int8_linear(x, weight)
        assert ops.names.count("_weight_int8pack_mm.default") == 1, ops.names
        assert ops.names.count("constant_pad_nd.default") == pads, ops.names


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 200])
def test_dispatch_matches_reference_on_cpu(m, dtype, cpu_paths):
    """torch's CPU paths run every x dtype in bf16 (module docstring), so bf16's tolerance is the bound for
    all; the native ones multiply x quantized to int8 (native.py): their reference takes that x."""
    dtype = DTYPES[dtype]
    x = random_x((m // 2 or 1, 2 if m > 1 else 1, 256), dtype)  # [..., K]: leading dims are flattened
    int8 = Int8Weight(*random_int8(48, 256)).prepare()
    y = int8_linear(x, int8)
    x_ref = x.float().view(-1, 256)
    if int8_path(x, int8) == "cpu-native":
        x_ref = native.dequantize_activations(x_ref)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 48)
    assert rel_err(y.view(-1, 48), int8_linear_ref(x_ref, int8.qweight, int8.scales)) <= TOL[torch.bfloat16]
    packed, scales, zeros = random_int4(48, 256, 64)
    int4 = Int4Weight(packed, scales, zeros, group_size=64).prepare()
    y = int4_linear(x, int4)
    x_ref = x.float().view(-1, 256)
    if int4_path(x, int4) == "cpu-native":
        x_ref = native.dequantize_activations(x_ref)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 48)
    assert rel_err(y.view(-1, 48), int4_linear_ref(x_ref, packed, scales, zeros, 64)) <= TOL[torch.bfloat16]


def test_weight_classes_check_shapes():
    qweight, scales = random_int8(8, 32)
    with pytest.raises(ValueError):
        Int8Weight(qweight, scales[:4])
    with pytest.raises(ValueError):
        Int8Weight(qweight.to(torch.int16), scales)
    packed, s, z = random_int4(8, 64, 32)
    with pytest.raises(ValueError):
        Int4Weight(packed, s, z, group_size=16)
    with pytest.raises(ValueError):
        Int4Weight(packed, s, z, group_size=64)  # scales are for groups of 32
    with pytest.raises(ValueError):
        Int4Weight(packed.to(torch.int8), s, z, group_size=32)


# ---------------------------------------------------------------- Triton, under the interpreter

class Case(NamedTuple):
    id: str
    kind: str  # "int8" or "int4"
    m: int
    n: int
    k: int
    group_size: int | None = None
    symmetric: bool = False  # int4: zeros = 8
    dtype: str = "fp32"  # of x
    scale_dtype: str = "fp32"  # of scales (and zeros)
    lead: tuple = ()  # extra leading dims of x
    config: dict | None = None  # block sizes; None: autotuned (under the interpreter: 16 x 32 x 32)


# Ragged M, N and (for int8) K against the tiles; each case ~10-30 program x K-tile steps.
TRITON_CASES = [
    Case("int8-3x70x96-fp32", "int8", 3, 70, 96),
    Case("int8-3x70x96-bf16", "int8", 3, 70, 96, dtype="bf16"),
    Case("int8-3x70x96-fp16", "int8", 3, 70, 96, dtype="fp16"),
    Case("int8-20x33x100-fp32", "int8", 20, 33, 100),
    Case("int8-20x33x100-bf16-bf16scales", "int8", 20, 33, 100, dtype="bf16", scale_dtype="bf16"),
    Case("int8-2x3x40x64-fp32", "int8", 3, 40, 64, lead=(2,)),
]
for _g, (_m, _n, _k) in {32: (5, 40, 96), 64: (3, 45, 192), 128: (17, 45, 256), 256: (2, 33, 512)}.items():
    for _sym in (False, True):
        for _dtype in ("fp32", "bf16"):
            TRITON_CASES.append(Case(f"int4-g{_g}-{_m}x{_n}x{_k}-{'sym' if _sym else 'asym'}-{_dtype}", "int4",
                                     _m, _n, _k, _g, _sym, _dtype))
TRITON_CASES += [
    Case("int4-g64-3x45x192-fp16", "int4", 3, 45, 192, 64, dtype="fp16"),
    Case("int4-g32-4x40x64-bf16-bf16scales", "int4", 4, 40, 64, 32, dtype="bf16", scale_dtype="bf16"),
    Case("int4-g64-2x3x45x128-fp32", "int4", 3, 45, 128, 64, lead=(2,)),
    # the tile shapes the GPU autotuner picks from: a decode tile with long K tiles (several per group,
    # and one tile = one group), a prefill tile with ragged M and N
    Case("int8-5x100x300-bf16-decode-tile", "int8", 5, 100, 300, dtype="bf16",
         config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)),
    Case("int4-g256-5x100x512-bf16-decode-tile", "int4", 5, 100, 512, 256, dtype="bf16",
         config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)),
    Case("int4-g128-5x100x512-bf16-tile-is-group", "int4", 5, 100, 512, 128, dtype="bf16",
         config=dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128)),
    Case("int4-g64-70x70x128-fp32-prefill-tile", "int4", 70, 70, 128, 64,
         config=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)),
]


def triton_case_error(case: Case, device) -> dict:
    """Run one case through w8a16_matmul / w4a16_matmul: its error against the reference, dtype, shape."""
    from zoo.kernels.triton_matmul import w4a16_matmul, w8a16_matmul
    x = random_x((*case.lead, case.m, case.k), DTYPES[case.dtype], device=device)
    if case.kind == "int8":
        qweight, scales = random_int8(case.n, case.k, scale_dtype=DTYPES[case.scale_dtype], device=device)
        y, ref = w8a16_matmul(x, qweight, scales, config=case.config), int8_linear_ref(x.float(), qweight, scales)
    else:
        packed, scales, zeros = random_int4(case.n, case.k, case.group_size, case.symmetric,
                                            scale_dtype=DTYPES[case.scale_dtype], device=device)
        y = w4a16_matmul(x, packed, scales, zeros, case.group_size, config=case.config)
        ref = int4_linear_ref(x.float(), packed, scales, zeros, case.group_size)
    return dict(error=rel_err(y, ref), dtype=str(y.dtype), shape=list(y.shape),
                expected_shape=[*case.lead, case.m, case.n])


def print_interpreter_errors():
    """Entry point of the interpreter subprocess: one JSON line, {case id: triton_case_error}."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps({case.id: triton_case_error(case, "cpu") for case in TRITON_CASES}))


@pytest.fixture(scope="module")
def interpreter_results():
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            "import test_kernels; test_kernels.print_interpreter_errors()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.id for c in TRITON_CASES])
def test_triton_kernels_in_interpreter(case, interpreter_results):
    result = interpreter_results[case.id]
    dtype = DTYPES[case.dtype]
    assert result["dtype"] == str(dtype)
    assert result["shape"] == result["expected_shape"]
    assert result["error"] <= INTERPRETER_TOL[dtype], result


def test_triton_configs_cover_every_shape():
    """The autotuner keeps at least one config for every M and group size, and only valid ones."""
    from zoo.kernels.triton_matmul import DECODE_CONFIGS, PREFILL_CONFIGS, _prune_configs
    for m in (1, 7, 16, 17, 32, 33, 100, 4096):
        for group_size in (None, 32, 64, 128, 256):
            # as the autotuner calls it: positional kernel arguments by name, then the keyword ones
            keywords = {} if group_size is None else {"GROUP_SIZE": group_size}
            kept = _prune_configs(DECODE_CONFIGS + PREFILL_CONFIGS, {"M": m, "N": 4096, "K": 4096}, **keywords,
                                  DOT_PRECISION="tf32")
            assert kept
            for config in kept:
                assert (config.kwargs["BLOCK_M"] == 16) == (m <= 16)
                assert group_size is None or group_size % config.kwargs["BLOCK_K"] == 0


COMPILE_FOR_GPU = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from zoo.kernels import triton_matmul as tm

def compile(kernel, types, constants, config, arch):
    names = kernel.fn.arg_names
    constants = {**constants, **config.kwargs}
    signature = {a: "constexpr" if a in constants else types.get(a, "i32") for a in names}
    constexprs = {(names.index(a),): v for a, v in constants.items()}
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))

for arch in (80, 90):
    for config in (tm.DECODE_CONFIGS[0], tm.PREFILL_CONFIGS[-1]):
        int8 = compile(tm._w8a16_kernel, {"x_ptr": "*bf16", "w_ptr": "*i8", "scales_ptr": "*fp32", "y_ptr": "*bf16"},
                       {"DOT_PRECISION": "tf32"}, config, arch)
        int4 = compile(tm._w4a16_kernel, {"x_ptr": "*bf16", "w_ptr": "*u8", "scales_ptr": "*fp32",
                                           "zeros_ptr": "*fp32", "y_ptr": "*bf16"},
                       {"DOT_PRECISION": "tf32", "GROUP_SIZE": 128}, config, arch)
        for kernel in (int8, int4):
            assert "mma" in kernel.asm["ptx"], "bf16 tiles should go to the tensor cores"
print("ok")
"""


def test_triton_kernels_compile_for_a100_and_h100():
    """Compile (not run: no GPU needed) a decode and a prefill config of both kernels for sm_80 and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-5000:]


# ---------------------------------------------------------------- Triton on a GPU

@needs_cuda
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.id for c in TRITON_CASES])
def test_triton_kernels_on_cuda(case):
    result = triton_case_error(case, "cuda")
    dtype = DTYPES[case.dtype]
    assert result["dtype"] == str(dtype) and result["shape"] == result["expected_shape"]
    assert result["error"] <= TOL[dtype], result


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 17, 300])
def test_dispatch_on_cuda(m):
    for dtype in DTYPES.values():
        x = random_x((m, 512), dtype, device="cuda")
        int8 = Int8Weight(*random_int8(192, 512, device="cuda")).prepare()
        assert int8_path(x, int8) == "triton"
        assert rel_err(int8_linear(x, int8), int8_linear_ref(x.float(), int8.qweight, int8.scales)) <= TOL[dtype]
        int4 = Int4Weight(*random_int4(192, 512, 128, device="cuda"), group_size=128).prepare()
        assert int4_path(x, int4) == "triton"
        ref = int4_linear_ref(x.float(), int4.packed, int4.scales, int4.zeros, 128)
        assert rel_err(int4_linear(x, int4), ref) <= TOL[dtype]

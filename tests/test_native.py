"""zoo's native CPU kernels (zoo/kernels/native.py): building, falling back, x's quantization, the int4 layout,
torch.compile. Their matmuls against the reference at many shapes are in tests/test_quant_widths.py.

On a CPU without AVX-512 VNNI the kernels cannot run: there the tests check that they are not used.
"""
import subprocess
import sys

import torch
from test_kernels import random_int4, random_int8, random_x

from zoo.kernels import Int4Weight, Int8Weight, native
from zoo.kernels import quantized_linear as int4_linear, quantized_linear as int8_linear  # one entry, both formats
from zoo.kernels.reference import dequantize_int4

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, **env}, timeout=300)


def test_built_where_the_cpu_runs_it():
    assert (native.load() is not None) == native.cpu_supported()


def test_zoo_native_0_uses_torchs_operators():
    r = run("import torch; from zoo.kernels import Int8Weight, native, quantized_path as int8_path\n"
            "w = Int8Weight(torch.ones(8, 32, dtype=torch.int8), torch.ones(8)).prepare()\n"
            "print(native.load(), type(w).__name__, int8_path(torch.ones(1, 32, dtype=torch.bfloat16), w))",
            ZOO_NATIVE="0")
    assert r.returncode == 0 and r.stdout.split() == ["None", "Int8Weight", "cpu-op"], r.stderr


def test_a_failed_build_falls_back_and_says_so_once():
    r = run("import torch.utils.cpp_extension as c\n"
            "def fail(**kwargs): raise RuntimeError('Ninja is required to load C++ extensions')\n"
            "c.load = fail\n"
            "import torch; from zoo.kernels import Int4Weight, native, quantized_path as int4_path\n"
            "from zoo.kernels.reference import pack_int4\n"
            "w = Int4Weight(pack_int4(torch.zeros(16, 64, dtype=torch.uint8)), torch.ones(16, 2), torch.ones(16, 2), 32)\n"
            "w.prepare(); w = w.prepare()\n"
            "print(int4_path(torch.ones(1, 64, dtype=torch.bfloat16), w))")
    if not native.cpu_supported():  # never built there, so nothing to say
        assert r.returncode == 0 and r.stderr == "", r.stderr
        return
    assert r.returncode == 0 and r.stdout.strip() == "cpu-op", r.stderr
    assert r.stderr == ("zoo.kernels: the native CPU kernels did not build (Ninja is required to load C++ "
                        "extensions); using torch's operators\n")


def test_activation_quantization_error_bound():
    """x ~ scale * (q + r / 256) per block of 32: off by at most max|x| / (127 * 256) of its block (half
    of r's step, a whole one where r is clamped to 127), plus fp32's rounding; zeros stay zeros."""
    x = random_x((5, 100), torch.float32) * torch.logspace(-3, 3, 100)  # blocks of very different sizes
    x[1, 32:64] = 0
    got = native.dequantize_activations(x)
    blocks = torch.nn.functional.pad(x, (0, 28)).view(5, -1, 32)
    bound = (blocks.abs().amax(-1, keepdim=True) / (127 * 256) * (1 + 1e-5)).expand(-1, -1, 32).reshape(5, -1)[:, :100]
    assert ((got - x).abs() <= bound + 1e-30).all()
    assert torch.equal(got[1, 32:64], torch.zeros(32))
    q, r, scale = native.quantize_activations(x)
    assert q.shape == r.shape == (5, 128) and scale.shape == (5, 4) and q.abs().max() == 127 and r.abs().max() <= 127
    assert ((got - x).abs().max() / x.abs().max()).item() < 3e-5  # bf16 would be ~2e-3


def test_int4_layout_holds_the_same_weight():
    for group_size, k in ((32, 96), (64, 192), (128, 384), (256, 512)):  # 96 and 192: K padded to 128 (256)
        packed, scales, zeros = random_int4(24, k, group_size)
        layout = native.int4_layout(packed, scales, zeros, group_size)
        kp = -(-k // max(128, group_size)) * max(128, group_size)
        assert layout.packed.shape == (24, kp // 2) and layout.scales.shape == (24, kp // group_size)
        torch.testing.assert_close(native.int4_dequantize(layout), dequantize_int4(packed, scales, zeros, group_size),
                                   rtol=1e-6, atol=1e-6)
        assert (layout.scales[:, k // group_size:] == 0).all()  # the padding's groups are zero


def test_first_chunk_byte_order():
    """Byte j of a 128-column chunk: column j in the low nibble, column 64 + j in the high one."""
    q = torch.arange(128) % 16
    layout = native.int4_layout(torch.tensor([(q[0::2] | q[1::2] << 4).tolist()], dtype=torch.uint8),
                                torch.ones(1, 1), torch.zeros(1, 1), 128)
    assert layout.packed[0].tolist() == (q[:64] | q[64:] << 4).tolist()


def test_compiled_calls_the_kernels_with_the_same_result():
    if native.load() is None:
        assert not native.cpu_supported()
        return
    int8 = Int8Weight(*random_int8(40, 256)).prepare()
    int4 = Int4Weight(*random_int4(40, 256, 64), group_size=64).prepare()

    def f(x):
        return int8_linear(x, int8) + int4_linear(x, int4)
    compiled = torch.compile(f, fullgraph=True)  # no graph break: the kernels are opaque operators
    for m in (1, 3):
        x = random_x((m, 256), torch.bfloat16, seed=m)
        torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


BF16_GRID = r"""
import torch
from zoo.kernels import native
ops = native.load()
worst = 0.0
for k in (1, 7, 31, 32, 33, 64, 100, 2056):
    for n in (1, 3, 4, 5, 9):
        for m in range(1, 10):
            for bias in (False, True):
                g = torch.Generator().manual_seed(k * 1000 + n * 10 + m)
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                wide = torch.randn(n, k + 3, generator=g).to(torch.bfloat16)
                w = wide[:, 1 : k + 1]  # rows of stride k + 3
                b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
                y = ops.bf16_linear(x, w, b)
                exact = x.double() @ w.double().T + (0 if b is None else b.double())
                size = x.double().abs() @ w.double().abs().T + 1
                # one bf16 rounding of the result, plus fp32 sums' error
                err = ((y.double() - exact).abs() - 2.0 ** -8 * exact.abs()) / (1e-5 * size)
                assert y.dtype == torch.bfloat16 and y.shape == (m, n), (y.dtype, y.shape)
                worst = max(worst, err.max().item())
print(worst)
"""


def test_bf16_linear_is_one_rounding_of_the_exact_sums_at_odd_widths():
    """native bf16_linear against float64 sums, K from 1 to 2056 (tails of the 32-column loads), N 1 to 9
    (tiles of 4 rows and their rest), M 1 to 9 (pairs of rows and the odd one), with and without bias, on a
    weight whose rows are not contiguous with each other: within one bf16 rounding of the result plus
    fp32 summation error. In a subprocess: a crash is a failure here, not the end of the test run."""
    if not native.cpu_supported(("avx512_bf16",)) or native.load() is None:
        assert not native.bf16_linear_runs()
        return
    r = run(BF16_GRID)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout) <= 1.0, r.stdout


def test_linear_takes_the_bf16_kernel_only_for_a_few_bf16_rows():
    """zoo.kernels.linear: bf16 x of up to 8 rows on the CPU -> bf16_linear; more rows, fp32, or an x that
    autograd records -> F.linear (and its gradient)."""
    from torch.profiler import profile

    from zoo.kernels import BF16_NATIVE_MAX_M, linear

    def used(x, w):
        with profile() as p:
            y = linear(x, w)
        return any(e.name == "zoo_native::bf16_linear" for e in p.events()), y

    w = random_x((24, 64), torch.bfloat16, seed=1)
    runs = native.bf16_linear_runs()
    for shape in ((1, 64), (2, 4, 64), (BF16_NATIVE_MAX_M, 64)):
        took, y = used(random_x(shape, torch.bfloat16, seed=2), w)
        assert took == runs and y.shape == (*shape[:-1], 24)
    assert not used(random_x((BF16_NATIVE_MAX_M + 1, 64), torch.bfloat16), w)[0]
    assert not used(random_x((1, 64), torch.float32), w.float())[0]
    x = random_x((1, 64), torch.bfloat16).requires_grad_()
    took, y = used(x, w)
    y.float().sum().backward()
    assert not took and torch.equal(x.grad, w.sum(0, keepdim=True))
    with torch.no_grad():
        assert used(x, w)[0] == runs


def test_dequantize_mm_in_blocks_of_rows_equals_the_whole_weights_product():
    """int8/int4_dequantize_mm dequantize about 4 MB of bf16 rows at a time (1,024 rows at K = 2048) and
    multiply each block: with 2,100 rows (two whole blocks and 52 rows), the product of the whole
    dequantized weight, within bf16's rounding of the result and fp32 summation's error."""
    if native.load() is None:
        assert not native.cpu_supported()
        return
    n, k = 2100, 2048
    x = random_x((40, k), torch.bfloat16, seed=3)
    int8 = Int8Weight(*random_int8(n, k)).prepare()
    int4 = Int4Weight(*random_int4(n, k, 128), group_size=128).prepare()
    w4 = native.int4_dequantize(int4).to(torch.bfloat16)  # the bf16 weights the kernel multiplies
    w8 = (int8.qweight.float() * int8.scales[:, None]).to(torch.bfloat16)
    for y, w in ((native.load().int8_dequantize_mm(x, int8.qweight, int8.scales), w8),
                 (native.load().int4_dequantize_mm(x, int4.packed, int4.scales, int4.scaled_zeros, 128), w4)):
        exact = x.double() @ w.double().T
        assert y.shape == (40, n)
        size = x.double().abs() @ w.double().abs().T  # fp32 sums err by a fraction of this
        assert ((y.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-5 * size).all()


ONE_ROW = r"""
import torch
from test_kernels import random_int4, random_int8, random_x
from zoo.kernels import Int4Weight, Int8Weight, native
ops = native.load()
for n, k in ((1, 64), (5, 200), (37, 256), (131, 2056)):
    int8 = Int8Weight(*random_int8(n, k)).prepare()
    int4 = Int4Weight(*random_int4(n, k // 64 * 64, 64), group_size=64).prepare()  # whole groups
    w16 = torch.randn(n, k + 3).to(torch.bfloat16)[:, 1 : k + 1]  # rows of stride k + 3
    x = random_x((3, k), torch.bfloat16, seed=n)
    products = [lambda x: ops.int8_mm(x, int8.qweight, int8.scales),
                lambda x: ops.int4_mm(x[:, : k // 64 * 64].contiguous(), int4.packed, int4.scales,
                                      int4.scaled_zeros, 64)]
    for f in products:  # a bf16 y is the fp32 y (of the same x, in fp32) rounded once
        assert torch.equal(f(x), f(x.float()).to(torch.bfloat16)), (n, k)
    if native.bf16_linear_runs():
        products.append(lambda x: ops.bf16_linear(x, w16, None))
    for f in products:
        many = f(x)
        for i in range(3):
            assert torch.equal(f(x[i : i + 1].contiguous()), many[i : i + 1]), (n, k, i)
print("ok")
"""


def test_one_row_of_x_gives_the_rows_of_a_batch_bit_for_bit():
    """One row of x (a decode step at batch 1) goes through the weight a row at a time, more rows in tiles of
    4 weight rows (native.cpp, for_each_tile): each row of a 3-row product is the 1-row product of that row,
    bit for bit, for int8, int4 and bf16 weights, N from 1 to 131 (tiles and their rest). And the int8/int4
    kernels' y for a bf16 x is their fp32 y for the same x (in fp32) rounded once, bit for bit. In a
    subprocess."""
    if native.load() is None:
        assert not native.cpu_supported()
        return
    r = run(ONE_ROW, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


ROTARY = r"""
import torch
from zoo.kernels import native
from zoo.rotary import inv_frequencies, rope_angles, rotated
ops = native.load()
for dtype in (torch.bfloat16, torch.float32):
    for batch, seq, heads, head_dim, rot in ((1, 1, 32, 64, 64), (3, 7, 4, 32, 32), (2, 5, 3, 64, 16), (2, 1, 2, 80, 20)):
        for per_row in (False, True):
            for interleaved in (True, False):
                g = torch.Generator().manual_seed(batch * 100 + seq)
                x = (torch.randn(batch, seq, heads, head_dim, generator=g) * 4).to(dtype)
                start = torch.tensor([[3], [0], [11]])[:batch] if per_row else torch.tensor([[40]])
                cos, sin = rope_angles(inv_frequencies(rot, 10000.0), start + torch.arange(seq)[None])
                want = rotated(x, cos, sin, interleaved)
                got = ops.rotary(x, cos.contiguous(), sin.contiguous(), interleaved)
                assert got.dtype == dtype and torch.equal(got, want), (dtype, batch, seq, heads, head_dim, rot,
                                                                        per_row, interleaved, (got - want).abs().max())
for bad in (torch.zeros(2, 3, 4, 8, dtype=torch.float16), torch.zeros(2, 3, 4)):
    try:
        ops.rotary(bad, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4), True)
        raise SystemExit("no error")
    except RuntimeError as e:
        assert "zoo_native::rotary: x must be" in str(e), e
try:
    ops.rotary(torch.zeros(2, 3, 4, 8), torch.zeros(1, 3, 1, 5), torch.zeros(1, 3, 1, 5), True)
    raise SystemExit("no error")
except RuntimeError as e:
    assert "cos and sin must be" in str(e), e
print("ok")
"""


def test_rotary_is_the_torch_operators_bit_for_bit():
    """native rotary against zoo.rotary.rotated (the PyTorch definition): bf16 and fp32, interleaved and
    half-split, whole and partial rotary (NeoX), one position or several, angles shared by the batch or per
    row (a left-padded batch), equal bit for bit; bad shapes and dtypes are errors naming them. In a subprocess."""
    if native.load() is None:
        assert not native.cpu_supported()
        return
    r = run(ROTARY)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]

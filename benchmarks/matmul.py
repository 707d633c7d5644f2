"""Weight-only matmul benchmark on LLaMA layer shapes:  python benchmarks/matmul.py [--all] [--shape N,K] ...

For each weight shape [N, K] and batch size M, every backend this machine has computes y = x @ w.T:

    linear-fp32 / -bf16 / -fp16   F.linear on a dense weight: the baseline to beat
    int8-cpu / int4-cpu           torch's CPU weight-only operators with bf16 x (zoo/kernels/cpu.py)
    int8-cpu-fp32 / int4-cpu-fp32 the same operators fed fp32 x as is (slow: opt-in, see --backends)
    int8-dequant / int4-dequant   dequantize the whole weight to bf16 on every call, then F.linear
                                  (zoo/kernels/cpu.py: torch's CPU path for many rows)
    int8-native / int4-native     zoo's AVX-512 VNNI kernels, bf16 x quantized to int8 on each call
                                  (zoo/kernels/native.py), as the dispatcher runs them up to 32 rows
    int8-native-dequant / int4-   native.cpp's dequantize to bf16, a block of rows at a time, each
      native-dequant              multiplied by F.linear: the dispatcher's native path for more rows
    linear-bf16-native            native.cpp's bf16 matrix-vector kernel (AVX512-BF16) on a dense bf16
                                  weight, up to 8 rows: zoo.kernels.linear's path for a decode step
    int8-triton / int4-triton     the fused Triton kernels with bf16 x (CUDA)

Reported per case: the median time over repeats (after warmup) and the minimum (the steadier number
on a machine shared with other jobs, where --threads 1 also helps), TFLOP/s (2*M*N*K flops), GB/s of
the bytes a perfect kernel must move (the stored weight, x and y; a dequantize-first backend moves
more, so its GB/s is what it achieves, not what it touches), and that as a % of the memory bandwidth
(measured with a large copy and a large read, or --bandwidth). Each call uses the next of several
copies of the weight, together larger than the caches, so no weight is read from cache.

The default run on a CPU is short (7B shapes, M = 1, 8, 32: about a minute on 2 cores); --all runs
every shape, batch and backend (the fp32-fed operators only up to M = 32: seconds per call beyond).
"""
import argparse
import importlib.util
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from zoo.kernels.cpu import int4_dequantize_mm, int4_mm_cpu, int8_dequantize_mm, int8_mm_cpu, pack_int4_for_cpu

# (N, K) = (out_features, in_features) of the linear layers of one transformer block.
MODEL_SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],  # q/k/v/o, gate/up, down
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],  # q/o, k/v (8 kv heads), gate/up, down
}
ALL_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CPU_DEFAULT_BATCHES = [1, 8, 32]
GROUP_SIZE = 128


@dataclass
class Weight:
    """One copy of a weight, ready to multiply: fn(x [M, K]) -> [M, N]."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int  # bytes of the stored weight (what a perfect kernel reads)


@dataclass
class Backend:
    name: str
    x_dtype: torch.dtype
    make: Callable[[int, int, torch.device], Weight]  # (N, K, device) -> one weight copy
    devices: tuple[str, ...]  # device types it runs on
    default: bool = True  # part of the default set (else only by --backends or --all)
    max_batch: int | None = None  # skip larger M
    beyond: str = "slower than a second per call beyond"  # why max_batch


def _random_int8(n, k, device):
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scales = torch.rand(n, device=device) / 127
    return qweight, scales


def _random_int4(n, k, device):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scales = torch.rand(n, k // GROUP_SIZE, device=device) / 8
    zeros = torch.rand(n, k // GROUP_SIZE, device=device) * 15
    return packed, scales, zeros


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_linear(dtype):
    def make(n, k, device):
        w = torch.empty(n, k, dtype=dtype, device=device).uniform_(-0.05, 0.05)
        return Weight(lambda x: F.linear(x, w), _nbytes(w))
    return make


def make_int8_cpu(n, k, device):
    qweight, scales = _random_int8(n, k, device)
    return Weight(lambda x: int8_mm_cpu(x, qweight, scales), _nbytes(qweight, scales))


def make_int4_cpu(x_dtype):
    def make(n, k, device):
        packed, scales, zeros = _random_int4(n, k, device)
        weight = pack_int4_for_cpu(packed, scales, zeros, GROUP_SIZE, dtype=x_dtype)
        return Weight(lambda x: int4_mm_cpu(x, weight), _nbytes(packed, scales, zeros))
    return make


def make_int8_dequant(n, k, device):
    qweight, scales = _random_int8(n, k, device)
    return Weight(lambda x: int8_dequantize_mm(x, qweight, scales), _nbytes(qweight, scales))


def make_int4_dequant(n, k, device):
    packed, scales, zeros = _random_int4(n, k, device)
    return Weight(lambda x: int4_dequantize_mm(x, packed, scales, zeros, GROUP_SIZE), _nbytes(packed, scales, zeros))


def make_int8_native(n, k, device):
    qweight, scales = _random_int8(n, k, device)
    return Weight(lambda x: torch.ops.zoo_native.int8_mm(x, qweight, scales), _nbytes(qweight, scales))


def make_int4_native(n, k, device):
    from zoo.kernels import native
    w = native.int4_layout(*_random_int4(n, k, device), GROUP_SIZE)
    return Weight(lambda x: torch.ops.zoo_native.int4_mm(x, w.packed, w.scales, w.scaled_zeros, GROUP_SIZE),
                  _nbytes(w.packed, w.scales, w.scaled_zeros))


def make_int8_native_dequant(n, k, device):
    qweight, scales = _random_int8(n, k, device)
    return Weight(lambda x: torch.ops.zoo_native.int8_dequantize_mm(x, qweight, scales), _nbytes(qweight, scales))


def make_int4_native_dequant(n, k, device):
    from zoo.kernels import native
    w = native.int4_layout(*_random_int4(n, k, device), GROUP_SIZE)
    return Weight(lambda x: torch.ops.zoo_native.int4_dequantize_mm(x, w.packed, w.scales, w.scaled_zeros, GROUP_SIZE),
                  _nbytes(w.packed, w.scales, w.scaled_zeros))


def make_linear_bf16_native(n, k, device):
    w = torch.randn(n, k, device=device).to(torch.bfloat16)
    return Weight(lambda x: torch.ops.zoo_native.bf16_linear(x, w, None), _nbytes(w))


def make_int8_triton(n, k, device):
    from zoo.kernels.triton_matmul import w8a16_matmul
    qweight, scales = _random_int8(n, k, device)
    return Weight(lambda x: w8a16_matmul(x, qweight, scales), _nbytes(qweight, scales))


def make_int4_triton(n, k, device):
    from zoo.kernels.triton_matmul import w4a16_matmul
    packed, scales, zeros = _random_int4(n, k, device)
    return Weight(lambda x: w4a16_matmul(x, packed, scales, zeros, GROUP_SIZE), _nbytes(packed, scales, zeros))


BACKENDS = [
    Backend("linear-fp32", torch.float32, make_linear(torch.float32), ("cpu", "cuda")),
    Backend("linear-bf16", torch.bfloat16, make_linear(torch.bfloat16), ("cpu", "cuda")),
    Backend("linear-fp16", torch.float16, make_linear(torch.float16), ("cpu", "cuda")),
    Backend("linear-bf16-native", torch.bfloat16, make_linear_bf16_native, ("cpu",), max_batch=8,
            beyond="zoo.kernels.linear takes F.linear beyond"),
    Backend("int8-cpu", torch.bfloat16, make_int8_cpu, ("cpu",)),
    Backend("int4-cpu", torch.bfloat16, make_int4_cpu(torch.bfloat16), ("cpu",)),
    Backend("int8-cpu-fp32", torch.float32, make_int8_cpu, ("cpu",), default=False, max_batch=32),
    Backend("int4-cpu-fp32", torch.float32, make_int4_cpu(torch.float32), ("cpu",), default=False, max_batch=32),
    Backend("int8-dequant", torch.bfloat16, make_int8_dequant, ("cpu", "cuda")),
    Backend("int4-dequant", torch.bfloat16, make_int4_dequant, ("cpu", "cuda")),
    Backend("int8-native", torch.bfloat16, make_int8_native, ("cpu",)),
    Backend("int4-native", torch.bfloat16, make_int4_native, ("cpu",)),
    Backend("int8-native-dequant", torch.bfloat16, make_int8_native_dequant, ("cpu",)),
    Backend("int4-native-dequant", torch.bfloat16, make_int4_native_dequant, ("cpu",)),
    Backend("int8-triton", torch.bfloat16, make_int8_triton, ("cuda",)),
    Backend("int4-triton", torch.bfloat16, make_int4_triton, ("cuda",)),
]


def unavailable(backend: Backend, device: torch.device) -> str | None:
    """Why `backend` cannot run here, or None."""
    if device.type not in backend.devices:
        return f"runs on {' / '.join(backend.devices)} only"
    if "triton" in backend.name:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    if "native" in backend.name:
        from zoo.kernels import native
        if native.load() is None:
            return "zoo's native kernels do not run here (zoo/kernels/native.py)"
        if backend.name == "linear-bf16-native" and not native.bf16_linear_runs():
            return "this CPU has no AVX512-BF16 (zoo/kernels/native.py)"
    if backend.name.startswith("int4-cpu") and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    return None


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Memory bandwidth in GB/s: the better of a large copy (read + write counted) and a large read (sum)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)

    def best(fn, moved):
        times = []
        for _ in range(5):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return moved / min(times[1:]) / 1e9

    copy = best(lambda: b.copy_(a), 2 * nbytes)
    read = best(lambda: a.sum(), nbytes)
    print(f"memory bandwidth: copy {copy:.1f} GB/s (read + write), read {read:.1f} GB/s "
          f"-> roofline {max(copy, read):.1f} GB/s")
    return max(copy, read)


def time_calls(weights: list[Weight], x: torch.Tensor, device: torch.device, warmup: int, repeats: int,
               min_seconds: float) -> list[float]:
    """Seconds of each timed call, each call on the next weight copy; at least `repeats` calls, and more
    until `min_seconds` of measurement."""
    for i in range(warmup):
        weights[i % len(weights)].fn(x)
    synchronize(device)
    times, i = [], 0
    while len(times) < repeats or sum(times) < min_seconds:
        fn = weights[i % len(weights)].fn
        i += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        if len(times) >= 1000:
            break
    return times


def run(shapes, batches, backends, device, bandwidth, rotate_bytes, warmup, repeats, min_seconds) -> list[dict]:
    rows = []
    header = (f"{'N':>6} {'K':>6} {'M':>4}  {'backend':<19} {'ms':>9} {'min ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
              f"{'% BW':>6}")
    print(header)
    print("-" * len(header))
    for n, k in shapes:
        for backend in backends:
            first = backend.make(n, k, device)
            copies = max(2, -(-rotate_bytes // first.nbytes))  # enough copies to overflow the caches
            weights = [first] + [backend.make(n, k, device) for _ in range(copies - 1)]
            for m in batches:
                if backend.max_batch and m > backend.max_batch:
                    continue
                x = torch.randn(m, k, device=device).to(backend.x_dtype)
                times = time_calls(weights, x, device, warmup, repeats, min_seconds)
                seconds = statistics.median(times)
                moved = first.nbytes + x.numel() * x.element_size() + m * n * x.element_size()  # weight + x + y
                row = dict(N=n, K=k, M=m, backend=backend.name, ms=seconds * 1e3, min_ms=min(times) * 1e3,
                           calls=len(times), tflops=2 * m * n * k / seconds / 1e12, gbps=moved / seconds / 1e9)
                row["bw_percent"] = 100 * row["gbps"] / bandwidth
                rows.append(row)
                print(f"{n:>6} {k:>6} {m:>4}  {backend.name:<19} {row['ms']:>9.3f} {row['min_ms']:>9.3f} "
                      f"{row['tflops']:>8.3f} {row['gbps']:>8.1f} {row['bw_percent']:>5.0f}%", flush=True)
            del weights, first
        print()
    return rows


def plot(rows: list[dict], path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        for name in dict.fromkeys(r["backend"] for r in rows):
            points = [(r["M"], r["ms"]) for r in rows if (r["N"], r["K"], r["backend"]) == (n, k, name)]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(title=f"N={n}, K={k}", xlabel="batch M", ylabel="ms per call (median)", yscale="log")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def parse_shape(text: str) -> tuple[int, int]:
    n, k = (int(v) for v in text.split(","))
    return n, k


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated LLaMA-2 sizes of {', '.join(MODEL_SHAPES)} (default: all on CUDA, 7b on CPU)")
    p.add_argument("--shape", type=parse_shape, action="append", default=[],
                   help="N,K of one more weight (repeatable); alone, replaces the model shapes")
    p.add_argument("--batches", default=None,
                   help=f"comma-separated M (default: {','.join(map(str, ALL_BATCHES))} on CUDA, "
                        f"{','.join(map(str, CPU_DEFAULT_BATCHES))} on CPU)")
    p.add_argument("--backends", default=None, help=f"comma-separated, of: {', '.join(b.name for b in BACKENDS)}")
    p.add_argument("--all", action="store_true", help="every model shape, batch size and backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s (default: measure)")
    p.add_argument("--rotate-mb", type=int, default=None,
                   help="total size of the rotated weight copies (default: 256 on CUDA, 128 on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None,
                   help="at least this many timed calls per case (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--min-seconds", type=float, default=0.2, help="and timed calls until this much time")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--plot", default=None, help="write a plot of time against batch to this image (matplotlib)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    if args.models:
        models = args.models.split(",")
    elif args.all or not on_cpu:
        models = list(MODEL_SHAPES)
    else:
        models = [] if args.shape else ["7b"]
    shapes = [s for name in models for s in MODEL_SHAPES[name]] + args.shape
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    else:
        batches = CPU_DEFAULT_BATCHES if on_cpu and not args.all else ALL_BATCHES
    if args.backends:
        wanted = args.backends.split(",")
        unknown = set(wanted) - {b.name for b in BACKENDS}
        if unknown:
            p.error(f"unknown backends {sorted(unknown)}")
        chosen = [b for b in BACKENDS if b.name in wanted]
    else:
        chosen = [b for b in BACKENDS if b.default or args.all]
    backends = []
    for backend in chosen:
        reason = unavailable(backend, device)
        if reason:
            print(f"skipping {backend.name}: {reason}")
        else:
            backends.append(backend)
    if not args.backends and not args.all:
        print("not run by default (--backends or --all): "
              + ", ".join(b.name for b in BACKENDS if not b.default and not unavailable(b, device)))
    for backend in backends:
        if backend.max_batch and max(batches) > backend.max_batch:
            print(f"{backend.name}: only M <= {backend.max_batch} ({backend.beyond})")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    bandwidth = args.bandwidth or measure_bandwidth(device)
    rotate_mb = args.rotate_mb or (128 if on_cpu else 256)  # a few times the last-level cache (H100: 50 MB)
    repeats = args.repeats or (3 if on_cpu else 10)
    rows = run(shapes, batches, backends, device, bandwidth, rotate_mb << 20, args.warmup, repeats, args.min_seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, threads=torch.get_num_threads(), torch=torch.__version__,
                           bandwidth_gbps=bandwidth, group_size=GROUP_SIZE, results=rows), f, indent=1)
        print(f"results written to {args.json}")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

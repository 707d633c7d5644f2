"""Every quantized-matmul path at odd and round widths, against zoo/kernels/reference.py, crash-proof.

torch's int8 CPU operator reads past the rows when K is not a multiple of 16 (bf16 x): garbage for
a row or three, SIGSEGV for more (zoo/kernels/cpu.py). So the cases run in a subprocess (this file,
run as a script), many to a process: it prints START before each case and its result after, and a
process that dies is restarted after the case it died in, which fails alone with its exit status.

    K (inputs)   int8: 8, 24, 40, 72, 100, 136, 200, 232, 264 and round 16, 256
                 int4: 1, 3 and 5 groups of 32, 64 (1, 3 of 128; 1, 3 of 256): whole groups, as int4
                 takes no other K (other widths stay in floating point: zoo.quant.plan, tested here too)
    N (outputs)  8, 40, 100, 200        M (rows of x)  1, 3, 17 (and 129 for int8's dispatch)
    paths        "dispatch": Int8Weight / Int4Weight.prepare() then int8_linear / int4_linear, as
                 QuantLinear runs them: zoo's native kernels (zoo/kernels/native.py) where they run;
                 "torch": the same with ZOO_NATIVE=0, torch's CPU operators (K padded for int8
                 where it must be); "native": native.int8_mm / int4_mm called directly with fp32 x
                 at every M from 1 to 17 (their tiles take 2 rows of x at a time);
                 "dequantize": int8_dequantize_mm / int4_dequantize_mm; "triton": the fused kernels
                 under TRITON_INTERPRET=1 (a subset: the interpreter runs a program at a time), and
                 on a GPU the whole grid through the dispatcher (skipped without CUDA)

x is bf16 (torch's CPU paths compute in bf16 whatever x is: zoo/kernels/__init__.py), but fp32 for
"native". Tolerances are test_kernels.py's: 1e-2 of max|ref| in bf16, 2e-2 under the interpreter
(it truncates to bf16). The native kernels quantize x to two int8 parts (native.py): their reference
is the reference matmul of that quantized x (native.dequantize_activations), which they match in
fp32 to 1e-4 of max|ref| (measured <= 1.7e-5: the int8 kernel's unsigned-weight offset, 128 sum(x),
is subtracted from sums that hold it, which costs a few fp32 roundings of the larger number; an
indexing or scale bug costs ~1e-1); the error of x's quantization itself is test_native.py's.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo import quant
from zoo.kernels import native

ROOT = Path(__file__).resolve().parent.parent
ODD_K = (8, 24, 40, 72, 100, 136, 200, 232, 264)
INT8_K = ODD_K + (16, 256)
INT4_K = {32: (32, 96, 160), 64: (64, 192, 320), 128: (128, 384), 256: (256, 768)}
NS, MS = (8, 40, 100, 200), (1, 3, 17)
TOL, INTERPRETER_TOL, NATIVE_TOL = 1e-2, 2e-2, 1e-4
NATIVE_MS = tuple(range(1, 18))


def case_id(kind, path, k, n, m, group_size=None):
    return f"{kind}{f'-g{group_size}' if group_size else ''}-{path}-K{k}-N{n}-M{m}"


def cases(kind, path, k, group_size=None, ns=NS, ms=MS, device="cpu"):
    return [dict(id=case_id(kind, path, k, n, m, group_size), kind=kind, path=path, k=k, n=n, m=m,
                 group_size=group_size, device=device) for n in ns for m in ms]


# One pytest item per (scheme, path, K): its N x M cases, each run and reported on its own.
CPU_GROUPS = {f"int8-{path}-K{k}": cases("int8", path, k, ms=MS + ((129,) if path == "dispatch" else ()))
              for path in ("dispatch", "dequantize") for k in INT8_K}
CPU_GROUPS.update({f"int4-g{g}-{path}-K{k}": cases("int4", path, k, g, ms=MS + ((33,) if path == "dispatch" else ()))
                   for path in ("dispatch", "dequantize") for g, ks in INT4_K.items() for k in ks})
NATIVE_GROUPS = {f"int8-native-K{k}": cases("int8", "native", k, ns=(1, 5, 40, 131), ms=NATIVE_MS)
                 for k in INT8_K + (2056,)}
NATIVE_GROUPS.update({f"int4-g{g}-native-K{k}": cases("int4", "native", k, g, ns=(1, 5, 40, 131), ms=NATIVE_MS)
                      for g, ks in INT4_K.items() for k in ks})
if native.cpu_supported():  # elsewhere the native kernels cannot run (test_native.py checks they are not used)
    CPU_GROUPS.update(NATIVE_GROUPS)
# ZOO_NATIVE=0: torch's operators, in processes of their own
TORCH_GROUPS = {f"int8-torch-K{k}": cases("int8", "torch", k, ms=MS + (129,)) for k in INT8_K}
TORCH_GROUPS.update({f"int4-g{g}-torch-K{k}": cases("int4", "torch", k, g) for g, ks in INT4_K.items() for k in ks})
TRITON_GROUPS = {f"int8-triton-K{k}": cases("int8", "triton", k, ns=(8, 100), ms=(1, 17)) for k in (8, 72, 100, 264)}
TRITON_GROUPS.update({f"int4-g{g}-triton-K{ks[-1] if g < 256 else ks[0]}":
                      cases("int4", "triton", ks[-1] if g < 256 else ks[0], g, ns=(8, 100), ms=(1, 17))
                      for g, ks in INT4_K.items()})
# On a GPU: the whole grid, through the dispatcher (the Triton kernels, autotuned).
CUDA_GROUPS = {f"int8-cuda-K{k}": cases("int8", "dispatch", k, device="cuda") for k in INT8_K}
CUDA_GROUPS.update({f"int4-g{g}-cuda-K{k}": cases("int4", "dispatch", k, g, device="cuda")
                    for g, ks in INT4_K.items() for k in ks})


# ---------------------------------------------------------------- the subprocess side

def run_case(case: dict) -> dict:
    """One case: y on its path and the reference's, compared (the weights are random formats, not quantized)."""
    from test_kernels import random_int4, random_int8, random_x, rel_err

    from zoo.kernels import Int4Weight, Int8Weight, int4_linear_ref, int8_linear_ref, native
    from zoo.kernels import quantized_linear as int4_linear, quantized_linear as int8_linear
    from zoo.kernels import quantized_path as int4_path, quantized_path as int8_path
    from zoo.kernels.cpu import int4_dequantize_mm, int8_dequantize_mm
    k, n, m, g, device = case["k"], case["n"], case["m"], case["group_size"], case["device"]
    x = random_x((m, k), torch.float32 if case["path"] == "native" else torch.bfloat16, seed=m, device=device)
    taken = case["path"]
    x_ref = x.float()
    if case["path"] == "native" or (case["path"] == "dispatch" and native.load() is not None and device == "cpu"):
        x_ref = native.dequantize_activations(x)  # what the native kernels multiply (their reference)
    if case["kind"] == "int8":
        qweight, scales = random_int8(n, k, seed=k + n, device=device)
        if case["path"] in ("dispatch", "torch"):
            weight = Int8Weight(qweight.clone(), scales).prepare()
            taken = int8_path(x, weight)
            if taken in ("cpu-dequantize", "cpu-native-dequantize"):
                x_ref = x.float()
            y = int8_linear(x, weight)
        elif case["path"] == "native":
            y = native.load().int8_mm(x, qweight, scales)
        elif case["path"] == "dequantize":
            y = int8_dequantize_mm(x, qweight, scales)
        else:
            from zoo.kernels.triton_matmul import w8a16_matmul
            y = w8a16_matmul(x, qweight, scales)
        ref = int8_linear_ref(x_ref, qweight, scales)
    else:
        packed, scales, zeros = random_int4(n, k, g, seed=k + n, device=device)
        if case["path"] in ("dispatch", "torch"):
            weight = Int4Weight(packed, scales, zeros, g).prepare()
            taken = int4_path(x, weight)
            if taken == "cpu-native-dequantize":
                x_ref = x.float()
            y = int4_linear(x, weight)
        elif case["path"] == "native":
            w = native.int4_layout(packed, scales, zeros, g)
            y = native.load().int4_mm(x, w.packed, w.scales, w.scaled_zeros, g)
        elif case["path"] == "dequantize":
            y = int4_dequantize_mm(x, packed, scales, zeros, g)
        else:
            from zoo.kernels.triton_matmul import w4a16_matmul
            y = w4a16_matmul(x, packed, scales, zeros, g)
        ref = int4_linear_ref(x_ref, packed, scales, zeros, g)
    return dict(shape=list(y.shape), finite=bool(torch.isfinite(y).all()), error=rel_err(y, ref), path=taken)


def worker(run) -> None:
    """Read cases (JSON) on stdin; for each print START <id>, then RESULT <json> of run(case), which
    returns a JSON-able dict (an exception is a result too)."""
    torch.set_num_threads(1)
    for case in json.loads(sys.stdin.read()):
        print(f"START {case['id']}", flush=True)
        try:
            result = {**run(case), "id": case["id"]}
        except Exception as e:  # reported against the case; the next case still runs
            result = dict(id=case["id"], exception=f"{type(e).__name__}: {e}")
        print(f"RESULT {json.dumps(result)}", flush=True)


# ---------------------------------------------------------------- the pytest side

def run_in_subprocesses(all_cases: list[dict], env: dict | None = None, script: str = __file__) -> dict[str, dict]:
    """Every case's result from `python script` (which runs worker()); a case whose process died gets
    {"died": why}, and the cases after it go on in a new process."""
    results, todo = {}, list(all_cases)
    while todo:
        done = subprocess.run([sys.executable, script], input=json.dumps(todo), capture_output=True, text=True,
                              cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})
        started = None
        for line in done.stdout.splitlines():
            if line.startswith("START "):
                started = line[len("START "):]
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                results[result["id"]] = result
                started = None
        died = f"the process died (exit status {done.returncode}): {done.stderr.strip()[-300:]}"
        if started is not None:
            results[started] = dict(id=started, died=died)
        elif done.returncode:  # before the first case (an import error): every case left fails with it
            results.update({case["id"]: dict(id=case["id"], died=died) for case in todo})
        todo = [case for case in todo if case["id"] not in results]
    return results


def expected_path(case: dict) -> str:
    """The path int8_linear / int4_linear must take for this case (zoo/kernels/__init__.py's table)."""
    from zoo.kernels import native
    if case["path"] not in ("dispatch", "torch"):
        return case["path"]
    if case["device"] == "cuda":
        return "triton"
    if case["path"] == "dispatch" and native.load() is not None:
        return "cpu-native" if case["m"] <= 32 else "cpu-native-dequantize"
    return "cpu-dequantize" if case["kind"] == "int8" and case["m"] > 128 else "cpu-op"


def check(group: list[dict], results: dict[str, dict], tol: float):
    failures = []
    for case in group:
        r = results[case["id"]]
        expected = expected_path(case)
        case_tol = NATIVE_TOL if case["path"] == "native" else tol
        if "died" in r or "exception" in r:
            failures.append(f"{case['id']}: {r.get('died') or r.get('exception')}")
        elif not (r["finite"] and r["shape"] == [case["m"], case["n"]] and r["error"] <= case_tol
                  and r["path"] == expected):
            failures.append(f"{case['id']}: {r}")
    assert not failures, f"{len(failures)} of {len(group)} cases failed:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def cpu_results():
    return run_in_subprocesses([case for group in CPU_GROUPS.values() for case in group])


@pytest.fixture(scope="module")
def torch_results():
    return run_in_subprocesses([case for group in TORCH_GROUPS.values() for case in group], env={"ZOO_NATIVE": "0"})


@pytest.fixture(scope="module")
def triton_results():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (for its interpreter)")
    return run_in_subprocesses([case for group in TRITON_GROUPS.values() for case in group],
                               env={"TRITON_INTERPRET": "1"})


@pytest.mark.parametrize("group", CPU_GROUPS)
def test_cpu_paths(group, cpu_results):
    check(CPU_GROUPS[group], cpu_results, TOL)


@pytest.mark.parametrize("group", TORCH_GROUPS)
def test_cpu_torch_paths(group, torch_results):
    check(TORCH_GROUPS[group], torch_results, TOL)


@pytest.mark.parametrize("group", TRITON_GROUPS)
def test_triton_kernels_in_interpreter(group, triton_results):
    check(TRITON_GROUPS[group], triton_results, INTERPRETER_TOL)


@pytest.fixture(scope="module")
def cuda_results():
    return run_in_subprocesses([case for group in CUDA_GROUPS.values() for case in group])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", CUDA_GROUPS)
def test_triton_kernels_on_cuda(group, cuda_results):
    check(CUDA_GROUPS[group], cuda_results, TOL)


def test_a_crash_is_one_failed_case():
    """The runner itself: a case that kills its process fails alone, and the cases after it still run."""
    cases_ = [dict(id="fine-before", kind="int8", path="dispatch", k=16, n=8, m=1, group_size=None, device="cpu"),
              dict(id="dies", kind="int8", path="crash", k=16, n=8, m=1, group_size=None, device="cpu"),
              dict(id="fine-after", kind="int8", path="dispatch", k=24, n=8, m=3, group_size=None, device="cpu")]
    results = run_in_subprocesses(cases_, env={"ZOO_TEST_CRASH_ON": "crash"})
    assert "exit status -11" in results["dies"]["died"]  # SIGSEGV, as torch's operator did
    assert results["fine-before"]["error"] <= TOL and results["fine-after"]["error"] <= TOL


@pytest.mark.parametrize("k", ODD_K + (64, 96, 128, 256))
def test_int4_takes_whole_groups_only(k):
    """int4 quantizes a layer whose K splits into groups and leaves every other one in floating point
    (zoo.quant.plan); int8 quantizes every width."""
    model = torch.nn.Module()
    model.config = type("Config", (), {"tie_embeddings": False})()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].wide, model.blocks[0].odd = torch.nn.Linear(256, 40), torch.nn.Linear(k, 40)
    for g in quant.INT4_GROUP_SIZES:
        assert quant.plan(model, "int4", g, announce=False) == ["blocks.0.wide"] + (["blocks.0.odd"] if k % g == 0 else [])
    assert quant.plan(model, "int8") == ["blocks.0.wide", "blocks.0.odd"]


if __name__ == "__main__":
    if os.environ.get("ZOO_TEST_CRASH_ON"):  # test_a_crash_is_one_failed_case: a path that segfaults
        import ctypes
        _run_case = run_case

        def run_case(case):  # noqa: F811
            if case["path"] == os.environ["ZOO_TEST_CRASH_ON"]:
                ctypes.string_at(0)  # reads address 0: SIGSEGV
            return _run_case(case)
    worker(run_case)

"""benchmarks/gpu.py, the one-command GPU check, run here with --smoke (the same code on the CPU, tiny sizes):
a GPU session has 15 minutes in all, so the script must not fail there on what the CPU can find first.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_has_no_errors_and_times_every_configuration(tmp_path):
    """parity, torchrun and decode on the CPU: no section records an error, and decode has a positive rate for
    bf16, int8 and int4, eager and compiled, at batch 1 and 8 (the "tests" and "kernels" sections run other
    test files and benchmarks/matmul.py, tested below and on their own)."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--only", "parity,torchrun,decode",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["sections"]) == {"parity", "torchrun", "decode"}
    for name, section in report["sections"].items():
        assert "error" not in section and "skipped" not in section, (name, section)
    decode = report["sections"]["decode"]["result"]
    for scheme in ("bf16", "int8", "int4"):
        for kind in ("eager", "compiled"):
            for batch in (1, 8):
                assert decode[f"{scheme} {kind} b={batch}"] > 0, (scheme, kind, batch)


def test_no_benchmark_script_shadows_an_installed_module():
    """A script's own folder comes first on sys.path, so benchmarks/NAME.py hides any installed module NAME from
    every library the script imports: benchmarks/kernels.py hid Hugging Face's `kernels` (a dependency of
    transformers >= 5), and gpu.py's parity section failed on `from kernels import CUDAProperties`."""
    import importlib.util
    clashes = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py"))
               if p.stem in sys.stdlib_module_names or importlib.util.find_spec(p.stem) is not None]
    assert clashes == [], f"benchmarks/ scripts named like an installed module: {clashes}"


def test_matmul_benchmark_times_every_cpu_backend(tmp_path):
    """benchmarks/matmul.py (gpu.py's "kernels" section) at one tiny shape on the CPU: every backend this machine
    has gets a positive time, and the dense baseline and torch's quantized operators are among them."""
    out = tmp_path / "matmul.json"
    r = subprocess.run([sys.executable, "benchmarks/matmul.py", "--shape", "256,128", "--batches", "1,4",
                        "--repeats", "1", "--warmup", "0", "--min-seconds", "0", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {"linear-fp32", "int8-cpu", "int4-cpu", "int8-dequant"} <= {row["backend"] for row in rows}
    assert {(row["M"], row["N"], row["K"]) for row in rows} == {(1, 256, 128), (4, 256, 128)}
    assert all(row["ms"] > 0 and row["gbps"] > 0 for row in rows), rows

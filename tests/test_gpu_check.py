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
    test files and benchmarks/kernels.py, which are tested on their own)."""
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

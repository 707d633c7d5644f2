"""benchmarks/peers.py --quick: the smoke check of the side-by-side CPU benchmark (tiny model, zoo eager, one round)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_its_rows(tmp_path):
    out = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, "benchmarks/peers.py", "--quick", "--formats", "int8,int4", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads(out.read_text())["table"]
    assert sorted(table) == ["zoo-eager int4", "zoo-eager int8"]
    for row in table.values():
        assert row["rounds"] == 1 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["decode_batch_tok_s"] > 0
        assert abs(row["decode_weights_gb_s"] / (row["decode_tok_s"] * row["weights_gb_per_token"]) - 1) < 1e-12
    assert "zoo-eager int8" in r.stdout and "wrote" in r.stdout


def test_bad_arguments_are_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "benchmarks/peers.py", "--only", "zoo,llama.cpp"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr == "peers.py: --only zoo: not one of zoo-eager, zoo-compiled, hf, llama.cpp\n"

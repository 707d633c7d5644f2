"""benchmarks/peers.py --quick: the smoke check of the side-by-side CPU benchmark (tiny model, zoo eager and api, one
round); benchmarks/decode.py --quick, the public-API timing it runs."""
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
    assert sorted(table) == ["zoo-api int4", "zoo-api int8", "zoo-eager int4", "zoo-eager int8"]
    bandwidth = json.loads(out.read_text())["memory_bandwidth_gb_s"]
    for name, row in table.items():
        assert row["rounds"] == 1 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
        assert ("decode_batch_tok_s" in row) == name.startswith("zoo-eager")
        assert abs(row["decode_weights_gb_s"] / (row["decode_tok_s"] * row["weights_gb_per_token"]) - 1) < 1e-12
        assert abs(row["decode_share_of_bandwidth"] * bandwidth / row["decode_weights_gb_s"] - 1) < 1e-12
    assert "zoo-eager int8" in r.stdout and "zoo-api int4" in r.stdout and "memory bandwidth" in r.stdout
    assert "wrote" in r.stdout


def test_decode_quick(tmp_path):
    """The public-API script alone: each format in its own process, the tokens those of one greedy generation."""
    out = tmp_path / "decode.json"
    r = subprocess.run([sys.executable, "benchmarks/decode.py", "--quick", "--formats", "bf16,int4", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(rows) == ["bf16", "int4"]
    for row in rows.values():
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and len(row["tokens"]) == 9
    r = subprocess.run([sys.executable, "benchmarks/decode.py", "--formats", "fp8"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr == "decode.py: --formats fp8: not one of bf16, int8, int4\n"


def test_bad_arguments_are_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "benchmarks/peers.py", "--only", "zoo,llama.cpp"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr == "peers.py: --only zoo: not one of zoo-eager, zoo-compiled, zoo-api, hf, llama.cpp\n"

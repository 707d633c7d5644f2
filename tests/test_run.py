"""run.py end to end on the bundled tiny model, as a user runs it."""
import subprocess
import sys

from conftest import ROOT


def run(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_demo_with_flags_streams_text_and_speed():
    r = run("--prompt", "A list comprehension", "--max-new-tokens", "24", "--dtype", "float32",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("A list comprehension")
    assert len(r.stdout.strip()) > len("A list comprehension") + 10  # it wrote something
    assert "prefill" in r.stderr and "decode" in r.stderr and "tokens/s" in r.stderr


def test_prompt_from_stdin_and_sampling_flags_are_seeded():
    args = ("--max-new-tokens", "16", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7")
    a, b = run(*args, stdin="The import statement"), run(*args, stdin="The import statement")
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("The import statement") and a.stdout == b.stdout


def test_interactive_reads_prompts_until_eof():
    r = run("--interactive", "--max-new-tokens", "8", stdin="The while loop\nA tuple\n")
    assert r.returncode == 0, r.stderr
    assert "The while loop" in r.stdout and "A tuple" in r.stdout
    assert r.stderr.count("[prefill") == 2  # a speed report per prompt


def test_unknown_checkpoint_is_a_clear_error():
    r = run("--ckpt", "no-such-model")
    assert r.returncode == 2
    assert "checkpoint 'no-such-model' not found" in r.stderr and "Traceback" not in r.stderr


def test_prompt_longer_than_context_is_a_clear_error():
    r = run("--prompt", "word " * 2000, "--max-new-tokens", "4")
    assert r.returncode == 2
    assert "does not fit the model's context" in r.stderr and "Traceback" not in r.stderr


def test_quantized_int4():
    r = run("--quant", "int4", "--max-new-tokens", "12", "--prompt", "The for statement")  # groups of 128
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The for statement") and "decode" in r.stderr
    bad = run("--quant", "int4", "--group-size", "48", "--max-new-tokens", "4")
    assert bad.returncode == 2 and "int4 group size 48 is not supported; choose one of (32, 64, 128, 256)" in bad.stderr

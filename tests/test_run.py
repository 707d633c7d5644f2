"""run.py on the bundled tiny model: what it prints is the model's continuation, and every flag counts.

The expected text comes from the model itself, outside run.py: greedy tokens by a full forward per
token (no KV cache, no zoo.generate), or zoo.generate with the same sampling settings. run.py runs
in this process (`main(argv)`), except once as a user starts it, in a subprocess.
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from helpers import run_py, run_py_module

import zoo

DEMO_PROMPT = run_py_module().DEMO_PROMPT


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return zoo.load(tiny_dir, dtype=torch.float32)


def continuation(model, prompt: str, new: list[int]) -> str:
    """The text run.py prints after the prompt for these new tokens (decoded behind the last prompt token)."""
    tok = model.tokenizer
    anchor = tok.encode(prompt, bos=True)[-1:]
    return tok.decode(anchor + new)[len(tok.decode(anchor)):]


def greedy(model, prompt: str, n: int) -> list[int]:
    """Greedy tokens by a full forward over the whole sequence for each one, up to a stop token."""
    tokens, new = model.tokenizer.encode(prompt, bos=True), []
    with torch.no_grad():
        for _ in range(n):
            token = model(torch.tensor([tokens + new]))[0, -1].argmax().item()
            if token in model.tokenizer.stop_ids:
                break
            new.append(token)
    return new


def test_greedy_prints_the_models_continuation(tiny):
    status, out, err = run_py("--prompt", "A list comprehension", "--max-new-tokens", "24", "--temperature", "0",
                           "--dtype", "float32", "--device", "cpu")
    assert status == 0, err
    new = greedy(tiny, "A list comprehension", 24)
    assert len(new) == 24  # no stop token: all 24 were generated
    assert out == "A list comprehension" + continuation(tiny, "A list comprehension", new) + "\n"
    assert len(continuation(tiny, "A list comprehension", new)) > 20
    prompt_tokens = len(tiny.tokenizer.encode("A list comprehension", bos=True))
    assert f"[prefill {prompt_tokens} tokens: " in err and "decode 23 tokens: " in err and "tokens/s" in err


def test_sampling_flags_and_seed_are_used(tiny):
    """--temperature, --top-k, --top-p and --seed reach the sampler: same seed same text, another seed another."""
    prompt = "The import statement"
    flags = ("--max-new-tokens", "16", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--dtype", "float32")
    a, b, c = (run_py(*flags, "--seed", seed, stdin=prompt) for seed in ("7", "7", "8"))
    assert a[0] == b[0] == c[0] == 0, a[2]
    assert a[1] == b[1] != c[1]
    ids = tiny.tokenizer.encode(prompt, bos=True)
    for (_, out, _), seed in ((a, 7), (c, 8)):
        new = zoo.generate(tiny, [ids], max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=seed)[0]
        assert out == prompt + continuation(tiny, prompt, new) + "\n"
    assert a[1] != prompt + continuation(tiny, prompt, greedy(tiny, prompt, 16)) + "\n"  # it did sample


def test_interactive_reads_prompts_until_eof(tiny):
    status, out, err = run_py("--interactive", "--max-new-tokens", "8", "--temperature", "0", "--dtype", "float32",
                           stdin="The while loop\nA tuple\n")
    assert status == 0, err
    want = "".join(f"> {p}{continuation(tiny, p, greedy(tiny, p, 8))}\n" for p in ("The while loop", "A tuple"))
    assert out == want + "> "  # the last prompt meets the end of input
    assert err.count("[prefill") == 2  # a speed report per prompt


def test_unknown_checkpoint_is_a_clear_error():
    status, out, err = run_py("--ckpt", "no-such-model")
    assert status == 2 and out == ""
    assert "checkpoint 'no-such-model' not found" in err


def test_prompt_longer_than_context_is_a_clear_error():
    status, _, err = run_py("--prompt", "word " * 2000, "--max-new-tokens", "4")
    assert status == 2
    assert "does not fit the model's context of 512" in err


def test_quantized_int4(tiny_dir):
    status, out, err = run_py("--quant", "int4", "--max-new-tokens", "12", "--temperature", "0",
                           "--prompt", "The for statement")  # groups of 128, bf16
    assert status == 0, err
    model = zoo.load(tiny_dir, quant="int4")
    assert out == "The for statement" + continuation(model, "The for statement", greedy(model, "The for statement", 12)) + "\n"
    status, _, err = run_py("--quant", "int4", "--group-size", "48", "--max-new-tokens", "4")
    assert status == 2 and "int4 group size 48 is not supported; choose one of (32, 64, 128, 256)" in err


def test_demo_as_a_user_runs_it(tiny_dir):
    """`python run.py`: the demo prompt, with the documented defaults (bf16, temperature 0.7, top-p 0.9, seed 0)."""
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--max-new-tokens", "20"], input="",
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})  # as this process (conftest): same bf16 sums
    assert r.returncode == 0, r.stderr
    model = zoo.load(tiny_dir, dtype=torch.bfloat16)
    ids = model.tokenizer.encode(DEMO_PROMPT, bos=True)
    new = zoo.generate(model, [ids], max_new_tokens=20, temperature=0.7, top_p=0.9, seed=0)[0]
    assert r.stdout == DEMO_PROMPT + continuation(model, DEMO_PROMPT, new) + "\n"
    assert "prefill" in r.stderr and "decode" in r.stderr and "tokens/s" in r.stderr and "Traceback" not in r.stderr

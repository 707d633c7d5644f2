"""zoo.perplexity and `python -m zoo perplexity`: strided windows scored as Hugging Face's guide scores them.

References: the windows written out by hand; each token's NLL from a log-softmax computed by hand in
float64; Hugging Face's LlamaForCausalLM loss (labels = -100 outside the scored tokens) on the same
windows, from the same weights; Python's statistics module for the standard error.
"""
import math
import re
import statistics

import pytest
import torch
from helpers import hf_llama, save_hf, spawn

import zoo
from zoo.__main__ import main
from zoo.perplexity import evaluate, windows


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A Hugging Face LLaMA with random weights and zoo's fp32 load of the same weights."""
    hf = hf_llama("gqa", num_key_value_heads=2)
    directory = save_hf(hf, tmp_path_factory.mktemp("ppl") / "hf")
    return hf, zoo.load(directory, dtype=torch.float32, device="cpu")


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_windows_written_out():
    # (begin, end, first scored): tokens[begin:end] scores tokens first..end-1
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(10, 4, 3) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]  # stride == ctx: 4 and 8 have no context
    assert windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]  # the one-token window [8, 9) scores nothing
    assert windows(3, 8, 2) == [(0, 3, 1)]  # shorter than ctx: one window
    assert windows(2, 2, 1) == [(0, 2, 1)]


def test_nll_by_hand(pair):
    """Each window's logits by a plain forward, log-softmax by hand in float64, summed over the tokens it scores."""
    _, model = pair
    ids = random_ids(11)
    result = evaluate(model, ids, ctx=5, stride=3)
    expected = []
    for begin, end, scored in [(0, 5, [1, 2, 3, 4]), (3, 8, [5, 6, 7]), (6, 11, [8, 9, 10])]:
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]]))[0].double()
        for t in scored:
            row = logits[t - 1 - begin]  # the position before t predicts t
            top = row.max()
            log_sum_exp = top + torch.log(torch.exp(row - top).sum())
            expected.append((log_sum_exp - row[ids[t]]).item())
    assert result.tokens == 10 and result.windows == 3
    assert torch.allclose(result.nll, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    assert result.nll.sum().item() == pytest.approx(sum(expected), abs=1e-4)
    assert result.ppl == pytest.approx(math.exp(sum(expected) / 10), rel=1e-5)


def hf_guide_nll(hf, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """The summed NLL and token count by the loop of HF's "Perplexity of fixed-length models" guide, counting
    the tokens its loss averages exactly (the labels after the shift that are not -100)."""
    input_all = torch.tensor([ids])
    seq_len, prev_end, total, count = len(ids), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + ctx, seq_len)
        trg_len = end - prev_end
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        n_loss = (target_ids[:, 1:] != -100).sum().item()
        if n_loss:
            with torch.no_grad():
                total += hf(input_ids, labels=target_ids).loss.item() * n_loss
            count += n_loss
        prev_end = end
        if end == seq_len:
            break
    return total, count


@pytest.mark.parametrize("n, ctx, stride", [(50, 16, 8), (50, 16, 5), (50, 16, 16), (49, 16, 16), (12, 16, 4),
                                            (40, 40, 40)])
def test_same_nll_as_hugging_face_on_the_same_windows(pair, n, ctx, stride):
    hf, model = pair
    ids = random_ids(n, seed=n + ctx + stride)
    result = evaluate(model, ids, ctx=ctx, stride=stride)
    total, count = hf_guide_nll(hf, ids, ctx, stride)
    assert result.tokens == count
    assert result.nll.sum().item() == pytest.approx(total, rel=1e-5, abs=1e-4)


def test_standard_error_and_interval(pair):
    _, model = pair
    result = evaluate(model, random_ids(40), ctx=16, stride=8)
    values = result.nll.tolist()
    se = statistics.stdev(values) / math.sqrt(len(values))
    assert result.stderr == pytest.approx(se, rel=1e-9)
    assert result.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    low, high = result.interval()
    assert (low, high) == pytest.approx((math.exp(result.mean - 1.96 * se), math.exp(result.mean + 1.96 * se)))
    other = evaluate(model, random_ids(40), ctx=16, stride=16)  # other windows: other tokens scored
    with pytest.raises(ValueError, match="scored different tokens"):
        result.difference(other)
    diffs = [0.5 * v for v in values]  # a model half as surprised at every token
    half = type(result)(result.nll * 0.5, result.windows, 1.0)
    assert result.difference(half) == pytest.approx((statistics.fmean(diffs) - statistics.fmean(values),
                                                     statistics.stdev(diffs) / math.sqrt(len(diffs))), rel=1e-9)


def test_argument_errors(pair):
    _, model = pair
    ids = random_ids(20)
    for kwargs, message in [(dict(ctx=8, stride=9), r"stride=9 is not accepted: an int in 1..8 \(ctx\)"),
                            (dict(ctx=1), "ctx=1 is not accepted: an int >= 2"),
                            (dict(ctx=300), "ctx=300 is not accepted: at most the model's context, 256 tokens"),
                            (dict(ctx=8, stride=0), "stride=0 is not accepted: an int >= 1")]:
        with pytest.raises(ValueError, match=message):
            evaluate(model, ids, **kwargs)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, ids[:1], ctx=8)
    with pytest.raises(ValueError, match=r"ids holds 320: token ids are ints in 0..319"):
        evaluate(model, ids + [320], ctx=8)


def run_main(capsys, *argv) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse's errors
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_command_rows_side_by_side(tiny_dir, tmp_path, capsys):
    """--quant none int8 and --compare: one table, each row the perplexity evaluate() gives that model."""
    text = (tiny_dir / "README.md").read_text()
    path = tmp_path / "text.txt"
    path.write_text(text)
    status, out, err = run_main(capsys, "perplexity", str(tiny_dir), str(path), "--ctx", "64", "--stride", "32",
                                "--max-tokens", "300", "--quant", "none", "int8", "--compare", str(tiny_dir),
                                "--dtype", "float32")
    assert status == 0, err
    fp32 = zoo.load(tiny_dir, dtype=torch.float32, device="cpu")
    int8 = zoo.load(tiny_dir, dtype=torch.float32, device="cpu", quant="int8")
    ids = fp32.tokenizer.encode(text, bos=True)[:300]
    expected = {"": evaluate(fp32, ids, 64, 32), " int8": evaluate(int8, ids, 64, 32)}
    lines = out.splitlines()
    assert lines[0] == f"{path}: 300 tokens, windows of 64 every 32, 299 scored in 9 windows"
    rows = [line.split() for line in lines[3:]]
    assert [r[0] + (f" {r[1]}" if r[1] == "int8" else "") for r in rows] == [str(tiny_dir), f"{tiny_dir} int8"] * 2
    for row in rows:
        r = expected[" int8" if row[1] == "int8" else ""]
        low, high = r.interval()
        values = row[2:] if row[1] == "int8" else row[1:]
        assert values[:4] == [f"{r.ppl:.3f}", f"{low:.3f}..{high:.3f}", f"{r.mean:.4f}", f"{r.stderr:.4f}"]
    assert rows[2][1:5] == rows[0][1:5]  # the same checkpoint again: the same numbers, difference 0
    assert rows[2][5:7] == ["+0.0000", "0.0000"]
    assert len(re.findall(r"tokens/s *\n", err)) == 4 and "\r" in err  # a progress line per row, finished


@pytest.mark.parametrize("argv, message", [
    (["--ctx", "8", "--stride", "9"], "error: --stride=9 is not accepted: at most --ctx (8): a stride beyond the "
                                      "window would skip the tokens between windows"),
    (["--ctx", "1"], "error: --ctx=1 is not accepted: an int >= 2"),
    (["--ctx", "1000"], "error: ctx=1000 is not accepted: at most the model's context, 512 tokens"),
    (["--max-tokens", "1"], "error: --max-tokens=1 is not accepted: an int >= 2"),
    (["--quant", "int3"], "error: argument --quant: invalid choice: 'int3' (choose from "),  # then as argparse quotes
    (["--ctx", "x"], "error: argument --ctx: invalid int value: 'x' (see python -m zoo perplexity --help)"),
])
def test_command_bad_arguments_one_line(tiny_dir, tmp_path, capsys, argv, message):
    path = tmp_path / "text.txt"
    path.write_text("The for statement")
    status, out, err = run_main(capsys, "perplexity", str(tiny_dir), str(path), *argv)
    assert (status, out) == (2, "") and err.startswith(message) and err.count("\n") == 1, err
    assert err == message + "\n" or err.endswith(" (see python -m zoo perplexity --help)\n")


def test_command_bad_files_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    hf = save_hf(hf_llama(), tmp_path / "no-tokenizer")
    (tmp_path / "text.txt").write_text("The for statement")
    capsys.readouterr()  # (save_pretrained's progress)
    for argv, message in [
        ([str(tiny_dir), str(tmp_path / "empty.txt")], f"{tmp_path / 'empty.txt'}: empty: there is no text to score"),
        ([str(tiny_dir), str(tmp_path / "blank.txt")], f"{tmp_path / 'blank.txt'}: only whitespace: there is no "
                                                         f"text to score"),
        ([str(tiny_dir), str(tmp_path / "latin1.txt")], f"{tmp_path / 'latin1.txt'}: not UTF-8 text (unexpected "
                                                          f"end of data at byte 3)"),
        ([str(tiny_dir), str(tmp_path / "missing.txt")], f"[Errno 2] No such file or directory: "
                                                           f"'{tmp_path / 'missing.txt'}'"),
        ([str(tiny_dir), str(tmp_path / "text.txt"), "--compare", str(hf)],
         f"{hf}: no tokenizer (tokenizer.model, tokenizer.json, or vocab.json + merges.txt) to read "
         f"{tmp_path / 'text.txt'} with"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "text.txt")], f"checkpoint {str(tmp_path / 'nowhere')!r} not found"),
    ]:
        status, out, err = run_main(capsys, "perplexity", *argv)
        assert (status, out) == (2, "") and err.startswith("error: " + message) and err.count("\n") == 1, err


def _tp_evaluate(rank, tiny_dir, ids, out):
    model = zoo.load(tiny_dir, dtype=torch.float32, device="cpu")
    result = evaluate(model, ids, ctx=64, stride=24)
    if rank == 0:
        torch.save(result.nll, out)


def test_two_ranks_score_what_one_process_scores(tiny_dir, tmp_path):
    model = zoo.load(tiny_dir, dtype=torch.float32, device="cpu")
    ids = model.tokenizer.encode((tiny_dir / "README.md").read_text(), bos=True)[:200]
    spawn(_tp_evaluate, 2, tiny_dir, ids, tmp_path / "nll.pt")
    one = evaluate(model, ids, ctx=64, stride=24)
    assert one.tokens == 199 and torch.allclose(torch.load(tmp_path / "nll.pt"), one.nll, atol=1e-5, rtol=0)

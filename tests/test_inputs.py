"""Bad input to the public API: each gives an error naming the argument (or key), its value and what is
accepted, before any work is done; and the edge values that are valid work."""
import pytest
import torch
from helpers import hf_family, save_hf

import run
import zoo


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return zoo.load(tiny_dir, dtype=torch.float32)


IDS = [1, 306, 4, 87]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens=-1 is not accepted: an int >= 0"),
    (dict(max_new_tokens=2.5), TypeError, r"max_new_tokens=2.5 is not accepted: an int >= 0"),
    (dict(temperature=-1), ValueError, r"temperature=-1 is not accepted: a number >= 0"),
    (dict(temperature=float("nan")), ValueError, r"temperature=nan is not accepted"),
    (dict(top_k=-1), ValueError, r"top_k=-1 is not accepted: None or an int >= 0 \(None or 0: no cut-off"),
    (dict(top_k=2.0), ValueError, r"top_k=2.0 is not accepted"),
    (dict(top_p=-0.5), ValueError, r"top_p=-0.5 is not accepted: None or a number in \(0, 1\]"),
    (dict(top_p=0), ValueError, r"top_p=0 is not accepted"),
    (dict(top_p=1.5), ValueError, r"top_p=1.5 is not accepted"),
    (dict(seed="7"), ValueError, r"seed='7' is not accepted: None or an int"),
    (dict(stop_ids=317), TypeError, r"stop_ids=317 is not accepted: None \(the tokenizer's\) or a set of token ids"),
])
def test_generation_options(tiny, kwargs, error, message):
    for call in (zoo.generate, zoo.steps):  # steps checks on the call, not at the first step
        with pytest.raises(error, match=message):
            call(tiny, [IDS], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(error, match=message):
        zoo.stream(tiny, IDS, **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize("prompts, error, message", [
    (torch.tensor([IDS]), TypeError, r"prompts=a int64 tensor of shape \(1, 4\) is not accepted: .*tokens.tolist\(\)"),
    (IDS, TypeError, r"is one prompt; pass a list of prompts: \[ids\]"),
    ([], TypeError, r"prompts=\[\] is not accepted"),
    ([IDS, []], ValueError, r"prompts\[1\]=\[\] is not accepted: at least one token"),
    ([IDS, [1, 4096]], ValueError, r"prompts\[1\] holds 4096: token ids are ints in 0..4095"),
    ([[1, -2]], ValueError, r"prompts\[0\] holds -2"),
    ([[1, 2.0]], TypeError, r"prompts\[0\] holds 2.0"),
    ([list(range(1, 513))], ValueError, r"a prompt of 512 tokens does not fit the model's context of 512"),
])
def test_bad_prompts(tiny, prompts, error, message):
    with pytest.raises(error, match=message):
        zoo.generate(tiny, prompts, max_new_tokens=4)


def test_edge_values_that_are_valid(tiny):
    assert zoo.generate(tiny, [IDS, IDS[:2]], max_new_tokens=0) == [[], []]
    stats = {}
    assert list(zoo.stream(tiny, IDS, stats=stats, max_new_tokens=0)) == [] and stats["decode_tokens"] == 0
    greedy = zoo.generate(tiny, [IDS], max_new_tokens=6, stop_ids=set())
    # no cut-off: top_k 0 or the vocabulary, top_p 1.0 sample from the whole distribution, as top_k/top_p None
    free = zoo.generate(tiny, [IDS], max_new_tokens=6, temperature=1.0, seed=3, stop_ids=set())
    for options in (dict(top_k=0), dict(top_k=4096), dict(top_p=1.0), dict(top_k=0, top_p=1.0)):
        assert zoo.generate(tiny, [IDS], max_new_tokens=6, temperature=1.0, seed=3, stop_ids=set(), **options) == free
    assert zoo.generate(tiny, [IDS], max_new_tokens=6, top_k=1, temperature=1.0, seed=3, stop_ids=set()) == greedy
    assert zoo.generate(tiny, [IDS], max_new_tokens=6, stop_ids=[], temperature=0) == greedy


def test_bad_model_inputs(tiny):
    tokens = torch.tensor([IDS])
    cases = [
        (dict(tokens=tokens[0]), ValueError, r"tokens=a int64 tensor of shape \(4,\) .*tokens\[None\] adds the batch dim"),
        (dict(tokens=tokens.float()), TypeError, r"tokens=a float32 tensor of shape \(1, 4\) is not accepted"),
        (dict(tokens=IDS), TypeError, r"tokens=\[1, 306, 4, 87\] is not accepted: a \(batch, seq\) tensor"),
        (dict(tokens=tokens + 4096), ValueError, r"ids in 0..4095 \(got 4097..4402\)"),
        (dict(tokens=torch.zeros(1, 0, dtype=torch.long)), ValueError, r"shape \(1, 0\) is not accepted"),
        (dict(tokens=torch.ones(1, 513, dtype=torch.long)), ValueError, r"at most the model's context of 512"),
        (dict(tokens=tokens.expand(2, 4), left_pad=torch.tensor([1])), ValueError,
         r"left_pad=a int64 tensor of shape \(1,\) is not accepted: a tensor or list of 2 ints"),
        (dict(tokens=tokens.expand(2, 4), left_pad=torch.tensor([0, 4])), ValueError,
         r"left_pad=\[0, 4\] is not accepted: .* each in 0..3: the number of padding tokens a row starts with \(not its length\)"),
        (dict(tokens=tokens.expand(2, 4), left_pad=[0, 1.5]), ValueError, r"left_pad=\[0, 1.5\]"),
        (dict(tokens=tokens, cache=tiny.new_cache(2, 8)), ValueError, r"2 rows, the batch size of the cache"),
        (dict(tokens=tokens, cache=tiny.new_cache(1, 8), left_pad=torch.tensor([0])), ValueError,
         r"left_pad=.* None with a cache: the cache carries its own"),
        (dict(tokens=tokens.to("meta")), ValueError, r"on the model's device, cpu \(got meta\)"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            tiny(**kwargs)
    with pytest.raises(ValueError, match=r"max_len=513 is not accepted: an int in 1..512"):
        tiny.new_cache(1, 513)
    with pytest.raises(TypeError, match=r"batch='2' is not accepted"):
        tiny.new_cache("2", 8)
    with pytest.raises(ValueError, match=r"left_pad=\[9\] is not accepted"):
        tiny.new_cache(1, 8, left_pad=torch.tensor([9]))
    # a list is taken for a tensor, and masks the same positions
    padded = torch.tensor([[0, 0] + IDS, [5, 6] + IDS])
    assert torch.equal(tiny(padded, left_pad=[2, 0]), tiny(padded, left_pad=torch.tensor([2, 0])))


def test_bad_load_arguments(tiny_dir):
    with pytest.raises(ValueError, match=r"dtype=torch.int8 is not accepted: .*pass quant='int8'"):
        zoo.load(tiny_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"dtype='int8' is not accepted"):
        zoo.load(tiny_dir, dtype="int8")
    with pytest.raises(ValueError, match=r"device='tpu' is not accepted: 'cpu', 'cuda', 'cuda:N'"):
        zoo.load(tiny_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' is not accepted: this torch .* sees no CUDA GPU"):
            zoo.load(tiny_dir, device="cuda")
    with pytest.raises(ValueError, match=r"max_seq_len=0 is not accepted: an int >= 1"):
        zoo.load(tiny_dir, max_seq_len=0)
    model = zoo.load(tiny_dir, dtype="float32", max_seq_len=64)  # names of dtypes are taken
    assert model.embed.weight.dtype == torch.float32 and model.config.max_seq_len == 64


def test_opt_runs_with_a_shorter_context(tmp_path):
    """OPT keeps every learned position and holds max_seq_len of them: the same logits, a clear error beyond."""
    directory = save_hf(hf_family("opt-pre-ln"), tmp_path)  # 256 learned positions
    full = zoo.load(directory, dtype=torch.float32)
    short = zoo.load(directory, dtype=torch.float32, max_seq_len=64)
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    assert short.config.max_seq_len == 64 and torch.equal(short(tokens), full(tokens))
    assert zoo.generate(short, [tokens[0].tolist()], max_new_tokens=8) == zoo.generate(full, [tokens[0].tolist()], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"max_seq_len=257 is not accepted: this model learned 256 positions"):
        zoo.load(directory, max_seq_len=257)
    with pytest.raises(ValueError, match=r"at most the model's context of 64"):
        short(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-1"], "error: max_new_tokens=-1 is not accepted: an int >= 0"),
    (["--top-p", "2"], "error: top_p=2.0 is not accepted"),
    (["--temperature", "x"], "error: argument --temperature: invalid float value: 'x' (see --help)"),
    (["--dtype", "int8"], "error: argument --dtype: invalid choice: 'int8'"),
    (["--ckpt", "no-such-model"], "error: checkpoint 'no-such-model' not found"),
    (["--prompt", "word " * 600], "error: a prompt of 602 tokens does not fit the model's context of 512"),
])
def test_run_py_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(run.main(["--max-new-tokens", "4", "--prompt", "The for", *argv]))
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(message), err  # nothing echoed, one line


def test_run_py_with_no_new_tokens(capsys):
    assert run.main(["--max-new-tokens", "0", "--prompt", "The for statement"]) == 0
    out, err = capsys.readouterr()
    assert out == "The for statement\n" and "decode 0 tokens" in err

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
    with pytest.raises(TypeError, match=r"group_size='128' is not accepted: an int"):
        zoo.load(tiny_dir, quant="int4", group_size="128")


def test_bad_save_arguments(tiny_dir):
    quantized = zoo.load(tiny_dir, quant="int8")
    with pytest.raises(TypeError, match=r"directory=123 is not accepted: a path"):
        zoo.quant.save(quantized, 123)
    with pytest.raises(TypeError, match=r"source=5 is not accepted: a path"):
        zoo.quant.save(quantized, "unused", source=5)


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


# ---- config files: every key checked as it is read; no invalid config ever becomes a model ----------------

import json  # noqa: E402
import random  # noqa: E402

from zoo.formats.files import CheckpointError  # noqa: E402
from zoo.loader import build_empty  # noqa: E402

COUNTS = [0, -1, 2.5, 6.0, "4", True, None, [4]]
NUMBERS = [0, -1e-5, "1e-5", None, True, [1.0]]
FLAGS = ["true", 1, None]
# format -> (file, a valid config, {key: bad values}); the valid ones are small models of each family
CONFIGS = {
    "meta": ("params.json", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32,
                                 norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128),
             {"dim": COUNTS, "n_layers": COUNTS, "n_heads": COUNTS, "n_kv_heads": [0, 3, 2.0, "2"],
              "vocab_size": [0, -2, 2.5, "320"], "multiple_of": COUNTS, "norm_eps": NUMBERS,
              "rope_theta": NUMBERS, "max_seq_len": COUNTS, "ffn_dim_multiplier": [0, -1, "1.3", True],
              "use_scaled_rope": FLAGS[:2]}),
    "llama": ("config.json", dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=176, vocab_size=320, rms_norm_eps=1e-5,
                                  max_position_embeddings=128),
              {"hidden_size": COUNTS, "num_hidden_layers": COUNTS, "num_attention_heads": COUNTS,
               "num_key_value_heads": [0, 3, "2", 2.0], "intermediate_size": COUNTS, "vocab_size": COUNTS,
               "rms_norm_eps": NUMBERS, "rope_theta": NUMBERS, "max_position_embeddings": COUNTS, "head_dim": [0, 15, "16"],
               "tie_word_embeddings": FLAGS, "attention_bias": FLAGS, "mlp_bias": FLAGS, "hidden_act": ["gelu", 1],
               "rope_scaling": ["linear", 2, {"rope_type": "linear", "factor": 0}, {"rope_type": "yarn", "factor": 2.0},
                                {"rope_type": "llama3", "factor": 8.0}]}),
    "opt": ("config.json", dict(model_type="opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=160,
                                vocab_size=320, max_position_embeddings=128),
            {"hidden_size": COUNTS, "num_hidden_layers": COUNTS, "num_attention_heads": COUNTS + [3], "ffn_dim": COUNTS,
             "vocab_size": COUNTS, "max_position_embeddings": COUNTS, "word_embed_proj_dim": [0, "32"],
             "do_layer_norm_before": FLAGS, "enable_bias": FLAGS, "activation_function": ["swish", None]}),
    "gpt_neox": ("config.json", dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=160, vocab_size=320, max_position_embeddings=128),
                 {"hidden_size": COUNTS, "num_hidden_layers": COUNTS, "num_attention_heads": COUNTS + [3],
                  "intermediate_size": COUNTS, "vocab_size": COUNTS, "layer_norm_eps": NUMBERS,
                  "rotary_pct": [-0.5, 1.5, "0.25", None, 0.1], "rotary_emb_base": NUMBERS,
                  "use_parallel_residual": FLAGS, "hidden_act": ["swish", None]}),
}


def write_config(directory, fmt, cfg):
    file = CONFIGS[fmt][0]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / file).write_text(json.dumps(cfg))
    return directory / file


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_every_bad_config_value_is_refused_naming_the_file_and_key(fmt, tmp_path):
    file, valid, bad = CONFIGS[fmt]
    build_empty(write_config(tmp_path / "valid", fmt, valid).parent)  # the base builds
    for name, values in bad.items():
        for value in values:
            path = write_config(tmp_path / f"{name}-{values.index(value)}", fmt, {**valid, name: value})
            with pytest.raises(CheckpointError) as e:
                build_empty(path.parent)
            message = str(e.value)
            assert message.startswith(f"{path}: "), message
            # the key, or for a size that does not fit the others, the sizes that disagree
            assert name in message or "multiple of" in message or "head_dim" in message or "rope" in message, message


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_random_invalid_configs_never_make_a_model(fmt, tmp_path):
    """Property-style: several keys broken at once, at random (seeded): always an error naming the file."""
    file, valid, bad = CONFIGS[fmt]
    rng = random.Random(fmt)
    for trial in range(40):
        names = rng.sample(sorted(bad), rng.randint(1, 3))
        cfg = {**valid, **{n: rng.choice(bad[n]) for n in names}}
        path = write_config(tmp_path / str(trial), fmt, cfg)
        with pytest.raises(CheckpointError, match=rf"^{path}: "):
            build_empty(path.parent)


def test_config_errors_through_load_and_inspect(tiny_dir, tmp_path, capsys):
    from zoo.__main__ import main as zoo_main
    directory = tmp_path / "tiny"
    directory.mkdir()
    for f in tiny_dir.iterdir():
        (directory / f.name).symlink_to(f)
    (directory / "params.json").unlink()
    params = json.loads((tiny_dir / "params.json").read_text())
    for broken, message in (({"n_layers": 6.0}, r"key 'n_layers': 6.0 is not accepted: an int in 1..1024"),
                            ({"norm_eps": "1e-5"}, r"key 'norm_eps': '1e-5' is not accepted: a number > 0"),
                            ({"n_heads": 0}, r"key 'n_heads': 0 is not accepted")):
        (directory / "params.json").write_text(json.dumps({**params, **broken}))
        with pytest.raises(CheckpointError, match=rf"params.json: {message}"):
            zoo.load(directory)
        assert zoo_main(["inspect", str(directory)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    # a wrong n_kv_heads in a single-file checkpoint says what may be wrong
    (directory / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(CheckpointError, match=r"either params.json does not describe this checkpoint"):
        zoo.load(directory)


def _tp_sizes(rank, directory, tiny_dir):
    with pytest.raises(CheckpointError, match=r"world size 2 does not divide n_heads \(4\) and n_kv_heads \(1\)"):
        build_empty(write_config(directory / f"mqa-{rank}", "llama", {**CONFIGS["llama"][1], "num_key_value_heads": 1}).parent)


def test_heads_the_world_size_does_not_divide_are_named_on_every_rank(tmp_path, tiny_dir):
    """The one split that cannot be padded (other sizes are: test_parallel.py), refused on every rank."""
    from helpers import spawn
    spawn(_tp_sizes, 2, tmp_path, tiny_dir)


def test_a_directory_with_two_checkpoints_is_refused(tiny_dir, tmp_path):
    """A zoo-quantized model.safetensors beside Meta's files: an error, never the float model silently."""
    quantized = zoo.quant.save(zoo.load(tiny_dir, quant="int8"), tmp_path / "int8")
    both = tmp_path / "both"
    both.mkdir()
    for f in tiny_dir.iterdir():
        (both / f.name).symlink_to(f)
    (both / "model.safetensors").symlink_to(quantized / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"holds both a zoo-quantized model.safetensors and a meta checkpoint"):
        zoo.load(both)
    assert zoo.load(quantized).blocks[0].attn.wq.__class__.__name__ == "QuantLinear"  # each alone loads

"""zoo.activations and `python -m zoo collect`: activation datasets in safetensors shards.

Differential checks: every stored row equals `zoo.hooks.collect` on that prompt alone (no padding),
in fp32, for every hook point but the attention pattern and every position mode; an interrupted and
resumed run writes the same bytes as one never interrupted; two tensor-parallel ranks store what one
process stores.
"""
import json

import pytest
import torch
from helpers import spawn

import zoo
from zoo import activations, hooks
from zoo.__main__ import main
from zoo.generate import left_padded

TEXTS = ["The for statement", "def f(x):\n    return x * 2", "A", "Lists are mutable sequences, typically used to "
         "store collections of homogeneous items.", "import os", "The with statement is used to wrap the execution "
         "of a block", "x = 1"]
POINTS = ["embed", "blocks.*.resid_pre", "blocks.*.attn_in", "blocks.*.q", "blocks.*.k", "blocks.*.v", "blocks.*.z",
          "blocks.*.attn_out", "blocks.*.resid_mid", "blocks.*.mlp_in", "blocks.*.mlp_pre", "blocks.*.mlp_post",
          "blocks.*.mlp_out", "blocks.*.resid_post", "ln_final", "logits"]  # every point but blocks.*.pattern


@pytest.fixture(scope="module")
def model(tiny_dir):
    return zoo.load(tiny_dir, dtype=torch.float32, device="cpu")


def write_prompts(path, texts=TEXTS, ids=True):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": f"q{i}"} if ids else {"text": t}) + "\n")
    return path


def files(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("positions, kept", [
    ("last", lambda n: [n - 1]), ("all", lambda n: list(range(n))),
    ("1:9:3", lambda n: [p for p in (1, 4, 7) if p < n]), ("5", lambda n: [5] if n > 5 else []),
    ("3:", lambda n: list(range(3, n))),
])
def test_rows_equal_each_prompt_alone(model, tmp_path, monkeypatch, positions, kept):
    """Batches of 1 without padding (PAD_MULTIPLE 1): the very same values. Batches of 1 and 3, left-padded (to
    a multiple of PAD_MULTIPLE, as collect runs them): within 1e-6 of the prompt's
    largest |activation| (fp32 rounding: a padded batch runs other matmul shapes, and a residual stream of
    values up to 37, whose fp32 spacing is 4e-6, carries its rounding into every later point; measured 1.2e-5
    at most, 3e-7 of the scale)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    names = activations.point_names(model, POINTS)
    assert len(names) == 6 * 13 + 3
    alone = []
    for text in TEXTS:
        ids = model.tokenizer.encode(text, bos=True)
        alone.append(hooks.collect(*POINTS))
        with torch.no_grad():
            model(torch.tensor([ids]), hooks=alone[-1])
    padded = activations.PAD_MULTIPLE
    for batch, multiple, tolerance in ((1, 1, 0.0), (1, padded, 1e-6), (3, padded, 1e-6)):
        monkeypatch.setattr(activations, "PAD_MULTIPLE", multiple)
        out = activations.write(model, prompts, tmp_path / f"acts{batch}-{multiple}", POINTS, positions=positions,
                                batch=batch, dtype=torch.float32, shard_size="256K")
        index = activations.read_index(out)
        assert list(index["points"]) == names
        assert index["complete"] and index["dtype"] == "float32" and len(index["shards"]) > 1
        assert [p["id"] for p in index["prompts"]] == [f"q{i}" for i in range(7)]
        assert [p["line"] for p in index["prompts"]] == list(range(1, 8))
        for entry, recorded in zip(index["prompts"], alone):
            n = recorded["embed"].shape[1]
            assert entry["tokens"] == n and entry["positions"] == kept(n)
            stored = activations.rows(out, entry)
            scale = max(x.abs().max().item() for x in recorded.values())
            for name in names:
                expected = recorded[name][0, entry["positions"]]
                assert stored[name].shape == expected.shape
                assert list(expected.shape[1:]) == index["points"][name]["shape"]
                gap = (stored[name] - expected).abs()
                assert gap.numel() == 0 or gap.max().item() <= tolerance * scale, (batch, name)


def test_index_rows_and_shards_written_out(model, tmp_path):
    """Shards close after the batch that fills them; a prompt's rows lie in one shard, in order."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", ids=False)
    out = activations.write(model, prompts, tmp_path / "acts", ["blocks.0.resid_post"], positions="all", batch=2,
                            shard_size=20 * 256 * 4)  # 20 rows of 256 fp32
    index = activations.read_index(out)
    lengths = [len(model.tokenizer.encode(t, bos=True)) for t in TEXTS]
    assert lengths == [4, 13, 2, 21, 3, 13, 5]  # batches of 2: 17 rows, 23 (40: shard full), 16, 5 (21: full)
    assert index["shards"] == [{"file": "shard-00000.safetensors", "rows": 40, "prompts": [0, 4]},
                               {"file": "shard-00001.safetensors", "rows": 21, "prompts": [4, 7]}]
    assert [(p["id"], p["shard"], p["rows"]) for p in index["prompts"]] == [
        (1, 0, [0, 4]), (2, 0, [4, 17]), (3, 0, [17, 19]), (4, 0, [19, 40]), (5, 1, [0, 3]), (6, 1, [3, 16]),
        (7, 1, [16, 21])]  # ids default to the line numbers
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors", "shard-00001.safetensors"]


def test_resumed_run_writes_the_same_files(model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    settings = dict(points=["blocks.*.resid_post", "blocks.2.z"], positions="all", batch=2, shard_size="16K")
    whole = activations.write(model, prompts, tmp_path / "whole", **settings)
    assert len(activations.read_index(whole)["shards"]) == 4
    part = tmp_path / "part"
    activations.write(model, prompts, part, **settings, stop_after_shards=1)  # "interrupted" after one shard
    index = activations.read_index(part)
    assert not index["complete"] and len(index["shards"]) == 1 and len(index["prompts"]) == 2
    (part / "shard-00001.safetensors.partial").write_bytes(b"half a shard")  # what a kill mid-write leaves
    (part / "shard-00001.safetensors").write_bytes(b"a shard the index does not list")
    activations.write(model, prompts, part, **settings, stop_after_shards=2)
    assert len(activations.read_index(part)["shards"]) == 3
    activations.write(model, prompts, part, **settings)
    assert files(part) == files(whole)


def test_refusals_name_what_differs(model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "acts"
    activations.write(model, prompts, out, ["blocks.0.resid_post"], batch=2, shard_size="1K", stop_after_shards=1)
    with pytest.raises(ValueError, match=r"acts: cannot resume an unfinished dataset with other settings \(points: "
                                         r"\[\"blocks.1.resid_post\"\] here, \[\"blocks.0.resid_post\"\] in .*index.json; "
                                         r"positions: \"all\" here, \"last\" in .*index.json\); run with the same ones, "
                                         r"or --force \(force=True\) to start over"):
        activations.write(model, prompts, out, ["blocks.1.resid_post"], positions="all", batch=2, shard_size="1K")
    other = write_prompts(tmp_path / "other.jsonl", TEXTS[:3])
    with pytest.raises(ValueError, match=r"prompts_sha256: .* prompts: 3 here, 7 in"):
        activations.write(model, other, out, ["blocks.0.resid_post"], batch=2, shard_size="1K")
    activations.write(model, prompts, out, ["blocks.0.resid_post"], batch=2, shard_size="1K")
    finished = files(out)
    with pytest.raises(ValueError, match=r"acts: holds a finished activation dataset \(7 prompts\); --force"):
        activations.write(model, prompts, out, ["blocks.0.resid_post"], batch=2, shard_size="1K")
    activations.write(model, other, out, ["blocks.0.resid_post"], batch=2, shard_size="1M", force=True)
    assert len(activations.read_index(out)["prompts"]) == 3 and set(files(out)) == {"index.json",
                                                                                    "shard-00000.safetensors"}
    assert finished != files(out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"mine: holds files that are not an activation dataset \(no index.json: "
                                         r"notes.txt\)"):
        activations.write(model, prompts, tmp_path / "mine", ["embed"], force=True)
    with pytest.raises(ValueError, match=r"notes.txt: is a file"):
        activations.write(model, prompts, tmp_path / "mine" / "notes.txt", ["embed"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"line 2: not JSON \(Expecting ',' delimiter at column 13\)"),
    (['{"text": "a"}', '', '["b"]'], r"line 3: expected an object with a \"text\" string"),
    (['{"txt": "a"}'], r"line 1: expected an object with a \"text\" string \(and an optional \"id\"\), got "
                       r"\{\"txt\": \"a\"\}"),
    (['{"text": 5}'], r"line 1: expected an object with a \"text\" string"),
    (['{"text": "a", "id": true}'], r"line 1: \"id\" is true: an id is a string or an int"),
    (['{"text": "a", "id": "x"}', '{"text": "b", "id": "x"}'], r"line 2: id \"x\" is already the id of line 1"),
    (['{"text": "a"}', '{"text": "b", "id": 1}'], r"line 2: id 1 is already the id of line 1"),
    ([], r"prompts.jsonl: no prompts"),
    (['', '  '], r"prompts.jsonl: no prompts"),
    (['{"text": "a"}', json.dumps({"text": "word " * 600})], r"line 2: 602 tokens do not fit the model's context "
                                                              r"of 512"),
])
def test_bad_prompt_lines(model, tmp_path, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        activations.write(model, path, tmp_path / "acts", ["embed"])
    assert not (tmp_path / "acts").exists()  # refused before anything is written


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(points=["blocks.*.pattern"]), ValueError, r"blocks.0.pattern, blocks.1.pattern, blocks.2.pattern, \.\.\. "
                                                    r"have a key dimension as long as each prompt"),
    (dict(points=["blocks.0.resid"]), ValueError, r"no hook point matches 'blocks.0.resid'; nearest: "),
    (dict(points="embed"), TypeError, r"points='embed' is not accepted: a list of hook point names"),
    (dict(positions="-1"), ValueError, r"positions='-1' is not accepted: 'last', 'all', a slice"),
    (dict(positions="1:5:0"), ValueError, r"positions='1:5:0' is not accepted"),
    (dict(positions="first"), ValueError, r"positions='first' is not accepted"),
    (dict(batch=0), ValueError, r"batch=0 is not accepted: an int >= 1"),
    (dict(shard_size="12X"), ValueError, r"shard_size='12X' is not accepted: a size in bytes > 0"),
    (dict(shard_size=0), ValueError, r"shard_size=0 is not accepted: an int >= 1"),
    (dict(dtype="int8"), ValueError, r"dtype='int8' is not accepted"),
])
def test_bad_arguments(model, tmp_path, kwargs, error, message):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(error, match=message):
        activations.write(model, prompts, tmp_path / "acts", **{"points": ["embed"], **kwargs})
    assert not (tmp_path / "acts").exists()


def test_sizes_parse():
    assert [activations.parse_size(s) for s in ("100", "64K", "512M", "1G", "2gib", "3 MB")] == \
        [100, 65536, 512 * 2**20, 2**30, 2 * 2**30, 3 * 2**20]


def run_main(capsys, *argv):
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_command(tiny_dir, tmp_path, capsys):
    """The command writes what the library writes (bf16 by default), and refuses in one line with exit status 2."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    status, out, err = run_main(capsys, "collect", str(tiny_dir), "--points", "blocks.*.resid_post", "logits",
                                "--prompts", str(prompts), "--out", str(tmp_path / "cli"), "--batch", "4",
                                "--shard-size", "64K", "--positions", "0:4")
    assert status == 0, err
    assert out == f"wrote {tmp_path / 'cli'}: 7 prompts, 25 rows of 7 points (bfloat16) in 2 shards\n"
    assert "collect [" in err and "7/7 prompts" in err
    bf16 = zoo.load(tiny_dir, device="cpu")
    activations.write(bf16, prompts, tmp_path / "lib", ["blocks.*.resid_post", "logits"], positions="0:4", batch=4,
                      shard_size="64K", checkpoint=str(tiny_dir.resolve()))
    assert files(tmp_path / "cli") == files(tmp_path / "lib")
    base = ["collect", str(tiny_dir), "--prompts", str(prompts), "--points", "embed"]
    for argv, message in [
        (base + ["--out", str(tmp_path / "cli")], f"error: {tmp_path / 'cli'}: holds a finished activation dataset "
                                                  f"(7 prompts); --force (force=True) replaces it\n"),
        (base + ["--out", str(tmp_path / "x"), "--positions", "-1"], "error: positions='-1' is not accepted: 'last', "
                                                                     "'all', a slice 'START:STOP[:STEP]' or one "
                                                                     "position 'N' (ints >= 0, STEP >= 1)\n"),
        (base + ["--out", str(tmp_path / "x"), "--batch", "0"], "error: --batch=0 is not accepted: an int >= 1\n"),
        (base + ["--out", str(tmp_path / "x"), "--shard-size", "lots"], "error: shard_size='lots' is not accepted: a "
                                                                        "size in bytes > 0, or with K, M or G (powers "
                                                                        "of 1024): '512M', '1G'\n"),
        (["collect", str(tiny_dir), "--prompts", str(tmp_path / "none.jsonl"), "--points", "embed", "--out",
          str(tmp_path / "x")], f"error: [Errno 2] No such file or directory: '{tmp_path / 'none.jsonl'}'\n"),
        (["collect", str(tiny_dir), "--prompts", str(prompts), "--out", str(tmp_path / "x")],
         "error: the following arguments are required: --points (see python -m zoo collect --help)\n"),
    ]:
        assert run_main(capsys, *argv) == (2, "", message)
    assert not (tmp_path / "x").exists()


# ---- tensor parallelism ------------------------------------------------------------------------

TP_POINTS = ["blocks.*.resid_post", "blocks.1.z", "blocks.2.mlp_post", "blocks.0.k", "logits"]  # split and not


def _tp_write(rank, tiny_dir, prompts, out):
    model = zoo.load(tiny_dir, dtype=torch.float32, device="cpu")
    activations.write(model, prompts, out, TP_POINTS, positions="all", batch=3, shard_size="64K")
    try:
        activations.write(model, prompts, out, TP_POINTS, positions="all", batch=3, shard_size="64K")
    except ValueError as e:  # every rank meets rank 0's refusal
        assert "holds a finished activation dataset" in str(e)
    else:
        raise AssertionError(f"rank {rank}: a finished dataset was not refused")


def test_two_ranks_store_what_one_process_stores(model, tiny_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    spawn(_tp_write, 2, tiny_dir, prompts, tmp_path / "tp")
    one = activations.write(model, prompts, tmp_path / "one", TP_POINTS, positions="all", batch=3, shard_size="64K")
    index, tp_index = activations.read_index(one), activations.read_index(tmp_path / "tp")
    assert tp_index == index and len(index["shards"]) > 1
    assert index["points"]["blocks.1.z"]["shape"] == [8, 32] and index["points"]["blocks.2.mlp_post"]["shape"] == [768]
    for entry in index["prompts"]:
        for name, x in activations.rows(one, entry).items():
            # fp32 rounding of the split sums, carried by a residual stream of values up to 42 (spacing 4e-6) into
            # every later point: measured 1.7e-5 at most (batches padded to a multiple of PAD_MULTIPLE)
            assert torch.allclose(activations.rows(tmp_path / "tp", entry)[name], x, atol=4e-5, rtol=0), name


def test_batches_run_at_lengths_of_a_multiple_of_pad_multiple(model, tmp_path, monkeypatch):
    """Every forward of a collect is padded to a multiple of PAD_MULTIPLE tokens, and never past the context."""
    assert left_padded([[1, 2, 3]], "cpu", 16)[0].shape == (1, 16)
    assert left_padded([[1, 2, 3], [4]], "cpu", 16, limit=10)[1].tolist() == [7, 9]
    assert left_padded([[1] * 17], "cpu", 16, limit=20)[0].shape == (1, 20)
    assert left_padded([[1] * 17], "cpu", 1)[0].shape == (1, 17)
    lengths = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, tokens, *a, **k: lengths.append(tokens.shape[1])
                        or forward(self, tokens, *a, **k))
    activations.write(model, write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "acts", ["embed"], batch=2)
    assert lengths and all(n % activations.PAD_MULTIPLE == 0 for n in lengths), lengths

"""zoo.stats: streaming per-unit activation statistics, against the same numbers computed from a plain `collect`
of the same tokens (float64), padding never counted, the same under tensor parallelism, saved and loaded."""
import argparse
import json

import pytest
import torch
from helpers import check_outcome, hf_family, hf_llama, save_hf, spawn_checks

import zoo
from zoo import hooks, parallel
from zoo import stats as zs

VARIANTS = ["llama-gqa", "opt-pre-ln", "neox-rotary-0.25-parallel"]
LENGTHS = [9, 4, 12, 7, 12, 2, 5]  # windows of varied lengths: left-padded batches
WINDOWS = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n + i)).tolist()
           for i, n in enumerate(LENGTHS)]


def build(variant, **more):
    return hf_llama("gqa", **more) if variant.startswith("llama") else hf_family(variant, **more)


@pytest.fixture(scope="module", params=VARIANTS)
def directory(request, tmp_path_factory):
    return save_hf(build(request.param), tmp_path_factory.mktemp(request.param))


def reference(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of rows (n, *units), from their definitions, in float64."""
    a = rows.double()
    return {"count": torch.full(a.shape[1:], float(a.shape[0]), dtype=torch.float64), "mean": a.mean(0),
            "std": a.std(0, correction=0), "mean_abs": a.abs().mean(0), "mean_sqrt": a.abs().sqrt().mean(0),
            "pos_mass": a.clamp(min=0).mean(0), "neg_mass": a.clamp(max=0).mean(0),
            "freq_pos": (a > 0).double().mean(0)}


def from_collect(model, batches) -> dict[str, torch.Tensor]:
    """Every layer's mlp_post and z rows over the batches, real positions only (collect's positions), as
    stats keys (n_layers, *units)."""
    rows = {}
    for tokens, left_pad in batches:
        cache = hooks.collect("blocks.*.mlp_post", "blocks.*.z")
        with torch.no_grad():
            model(tokens, left_pad=left_pad, hooks=cache)
        for name in cache:
            real = (cache.positions(name) >= 0).expand(tokens.shape[0], -1)
            rows.setdefault(name, []).append(cache[name][real])
    out = {}
    for point in zs.POINTS:
        per_layer = [reference(torch.cat(rows[f"blocks.{i}.{point}"])) for i in range(model.config.n_layers)]
        out.update({f"{point}.{s}": torch.stack([r[s] for r in per_layer]) for s in zs.STATS})
    return out


def assert_close(got, want, tol):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert (got[key] - want[key]).abs().max() <= tol * (1 + want[key].abs().max()), key


@pytest.mark.parametrize("batch, chunk", [(3, 5), (1, zs.CHUNK)])
def test_stats_equal_a_collect_of_the_same_batches_in_float64(directory, batch, chunk, monkeypatch):
    """Summed `chunk` rows at a time (5: several chunks per batch, the last one short)."""
    monkeypatch.setattr(zs, "CHUNK", chunk)
    model = zoo.load(directory, dtype=torch.float32)
    got = zs.collect_stats(model, WINDOWS, batch=batch)
    assert got["mlp_post.mean"].shape == (model.config.n_layers, model.config.d_mlp)
    assert got["z.mean"].shape == (model.config.n_layers, model.config.n_heads, model.config.d_head)
    assert got["z.count"].unique().tolist() == [sum(LENGTHS)]  # every real position, no padding
    assert all(v.dtype == torch.float64 for v in got.values())
    assert_close(got, from_collect(model, zs.batches(WINDOWS, batch, "cpu")), 1e-12)


def test_padding_is_never_counted(directory):
    """Left-padded batches give each window's own statistics: within fp32 rounding of one window at a time."""
    model = zoo.load(directory, dtype=torch.float32)
    got = zs.collect_stats(model, WINDOWS, batch=len(WINDOWS))
    assert_close(got, from_collect(model, zs.batches(WINDOWS, 1, "cpu")), 1e-5)
    # the definitions hold together
    assert torch.allclose(got["mlp_post.pos_mass"] + got["mlp_post.neg_mass"], got["mlp_post.mean"], atol=1e-12)
    assert torch.allclose(got["z.pos_mass"] - got["z.neg_mass"], got["z.mean_abs"], atol=1e-12)


def _check_stats(rank, directory, want):
    assert parallel.world_size() == 2
    model = zoo.load(directory, dtype=torch.float32)
    assert model.blocks[0].mlp.w_out.weight.shape[1] == 88  # 175 hidden units: 88 + 87 and one of padding
    assert_close(zs.collect_stats(model, WINDOWS, batch=3), want, 1e-5)


def pruned(directory):
    """Two steps of zoo.prune (neurons and heads, means folded in) on WINDOWS: the records and the final logits."""
    from zoo import prune as zp
    model = zoo.load(directory, dtype=torch.float32)
    sets = (WINDOWS[:5], WINDOWS[5:]), (WINDOWS[2:], WINDOWS[:2])
    records = zp.prune(model, *sets, ff_frac=0.05, attn_frac=0.125, steps=2, offset="mean", batch=3)
    with torch.no_grad():
        return records, model(torch.tensor([WINDOWS[0]]))


def _check_prune(rank, directory, want):
    records, logits = pruned(directory)
    for got, expected in zip(records, want[0]):
        assert {k: v for k, v in got.items() if k not in ("focus", "cripple")} == \
            {k: v for k, v in expected.items() if k not in ("focus", "cripple")}
        assert abs(got["cripple"]["loss"] - expected["cripple"]["loss"]) < 1e-5
    assert (logits - want[1]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    """The tensor-parallel checks, in one group of 2 ranks (gloo) started once: a LLaMA of 175 hidden units, which
    do not split in two (88 + 87 and one of padding)."""
    root = tmp_path_factory.mktemp("stats-tp")
    directory = save_hf(hf_llama("gqa", intermediate_size=175), root / "llama")
    stats = zs.collect_stats(zoo.load(directory, dtype=torch.float32), WINDOWS, batch=3)
    assert stats["mlp_post.mean"].shape[1] == 175
    spawn_checks({"stats": (_check_stats, (directory, stats)), "prune": (_check_prune, (directory, pruned(directory)))},
                 2, root)
    return root


def test_tensor_parallel_stats_equal_one_process(world_2):
    """Each rank's heads and neurons, gathered to global indices, the MLP's padding cut."""
    check_outcome(world_2, "stats", 2)


def test_tensor_parallel_pruning_equals_one_process(world_2):
    """zoo.prune under TP (deletion through zoo.weights' write-through copies, biases added per rank's shard):
    the same units deleted, the same evaluation, the same logits."""
    check_outcome(world_2, "prune", 2)


def test_save_and_load(tmp_path, tiny_dir):
    stats = {"mlp_post.mean": torch.randn(2, 5, dtype=torch.float64), "z.std": torch.rand(2, 3, 4, dtype=torch.float64)}
    path = zs.save(stats, tmp_path / "s.safetensors", {"tokens": 10})
    loaded = zs.load(path)
    assert sorted(loaded) == sorted(stats) and all(torch.equal(loaded[k], stats[k]) for k in stats)
    with pytest.raises(ValueError, match="params.json: not a safetensors file"):
        zs.load(tiny_dir / "params.json")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors: not zoo activation statistics"):
        zs.load(tmp_path / "other.safetensors")


def test_text_windows(tiny_dir, tmp_path):
    model = zoo.load(tiny_dir, dtype=torch.float32)
    (tmp_path / "t.txt").write_text("The for statement is used to iterate over the elements of a sequence. " * 20)
    windows = zs.text_windows(model, tmp_path / "t.txt", tokens=50, ctx=16)
    assert [len(w) for w in windows] == [16, 16, 16, 2] and windows[0][0] == model.tokenizer.bos_id
    (tmp_path / "t.jsonl").write_text('{"text": "def f(x):"}\n{"text": "return x"}\n')
    windows = zs.text_windows(model, tmp_path / "t.jsonl")
    assert windows == [model.tokenizer.encode(t, bos=True) for t in ("def f(x):", "return x")]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="only whitespace"):
        zs.text_windows(model, tmp_path / "empty.txt")


def stats_args(**kw):
    p = argparse.ArgumentParser()
    zs.add_arguments(p)
    return p.parse_args([kw.pop("ckpt"), *[a for k, v in kw.items() for a in (f"--{k}", *v.split())]])


def test_command_writes_the_statistics(tiny_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("A for loop:\n\n   for i in range(10):\n       print(i)\n" * 30)
    out = tmp_path / "s.safetensors"
    args = stats_args(ckpt=str(tiny_dir), texts=str(tmp_path / "t.txt"), tokens="300", ctx="64", out=str(out),
                      dtype="float32")
    assert zs.command(args) == 0
    stats = zs.load(out)
    assert stats["mlp_post.count"].unique().tolist() == [300] and stats["z.mean"].shape == (6, 8, 32)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"exists \(--force replaces it\)"):
        zs.command(args)


def test_benchmark_quick(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_stats", zs.__file__.replace("zoo/stats.py", "benchmarks/stats.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--threads", "2", "--out", str(tmp_path / "stats.json")])
    assert sorted(rows) == sorted(bench.CASES) and rows["plain"]["ratio_best"] == 1.0
    assert json.loads((tmp_path / "stats.json").read_text())["cases"]["both"]["tokens_per_s_best"] > 0


def test_benchmark_paired(tmp_path):
    """--paired: plain and both alone, batch by batch into one accumulator; both's statistics are those of all the windows."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_stats", zs.__file__.replace("zoo/stats.py", "benchmarks/stats.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--paired", "--threads", "2", "--out", str(tmp_path / "stats.json")])
    assert sorted(rows) == ["both", "plain"] and rows["plain"]["ratio_best"] == 1.0 and rows["both"]["ratio_best"] > 0
    assert json.loads((tmp_path / "stats.json").read_text())["settings"]["paired"] is True

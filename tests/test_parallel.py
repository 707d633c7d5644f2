"""Tensor parallelism at world size 2 (gloo, CPU): same logits as one process, any checkpoint split onto any world size."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from helpers import hf_llama, save_hf, save_meta, spawn

import zoo
from zoo import parallel

TP_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One set of weights in HF layout, Meta MP=1 and Meta MP=2 (embedding split on dim 1 and dim 0)."""
    root = tmp_path_factory.mktemp("tp")
    hf_dir = save_hf(hf_llama("gqa"), root / "hf")  # 4 heads, 2 kv heads
    model = zoo.load(hf_dir, dtype=torch.float32)
    dirs = {"hf": hf_dir, "meta1": save_meta(model, root / "meta1"),
            "meta2": save_meta(model, root / "meta2", shards=2),
            "meta2-vocab": save_meta(model, root / "meta2v", shards=2, vocab_parallel=True)}
    tied = save_hf(hf_llama("tied-embeddings"), root / "tied")
    return dirs, tied, root


def reference(directory, tokens):
    """Single-process logits: a full forward, a KV-cached prefill + 6 decode steps, and 12 greedy tokens."""
    model = zoo.load(directory, dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(tokens.shape[0], tokens.shape[1])
        steps = [model(tokens[:, :10], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(10, 16)]
    greedy = zoo.generate(model, [tokens[0, :5].tolist(), tokens[1, :9].tolist()], max_new_tokens=12, stop_ids=set())
    return full, torch.cat(steps, dim=1), greedy


def _check_world_2(rank, dirs, tied, tokens, want):
    assert parallel.world_size() == 2 and parallel.rank() == rank
    for name, directory in list(dirs.items()) + [("tied", tied)]:
        full, cached, greedy = want[name]
        model = zoo.load(directory, dtype=torch.float32)
        assert model.blocks[0].attn.n_heads == 2 and model.blocks[0].attn.n_kv_heads == (1 if name != "tied" else 2)
        assert isinstance(model.blocks[0].attn.wq, parallel.ColumnParallelLinear)
        assert model.blocks[0].mlp.w_out.weight.shape[1] == model.config.hidden_dim // 2  # holds half the columns
        with torch.no_grad():
            got = model(tokens)
            cache = model.new_cache(tokens.shape[0], tokens.shape[1])
            steps = [model(tokens[:, :10], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(10, 16)]
        assert (got - full).abs().max() < TP_TOL, name
        assert (torch.cat(steps, dim=1) - cached).abs().max() < TP_TOL, name
        out = zoo.generate(model, [tokens[0, :5].tolist(), tokens[1, :9].tolist()], max_new_tokens=12, stop_ids=set())
        assert out == greedy, name


def test_world_2_equals_single_process_for_every_layout(checkpoints):
    dirs, tied, _ = checkpoints
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    want = {name: reference(d, tokens) for name, d in list(dirs.items()) + [("tied", tied)]}
    # all four layouts hold the same weights: MP=2 merged in one process equals MP=1
    assert all(torch.equal(want[n][0], want["meta1"][0]) for n in ("meta2", "meta2-vocab"))
    spawn(_check_world_2, 2, dirs, tied, tokens, want)


def _check_errors(rank, mqa):
    with pytest.raises(zoo.CheckpointError, match=r"world size 2 does not divide n_heads \(4\) and n_kv_heads "
                                                  r"\(1\): run with a world size in \[1\]"):
        zoo.load(mqa)


def test_world_size_that_does_not_divide_heads(checkpoints):
    mqa = save_hf(hf_llama("mqa"), checkpoints[2] / "mqa")  # 1 kv head cannot be split over 2 ranks
    spawn(_check_errors, 2, mqa)


def _check_layers_against_fairscale(rank):
    from fairscale.nn.model_parallel import initialize, layers
    initialize.initialize_model_parallel(2)
    torch.manual_seed(0)  # the same full weights and inputs on both ranks
    w, b = torch.randn(12, 8), torch.randn(12)
    emb = torch.randn(10, 6)
    x = torch.randn(3, 5, 8)
    tokens = torch.randint(0, 10, (3, 5))
    cases = [
        (parallel.ColumnParallelLinear(8, 12, bias=True, gather_output=True),
         layers.ColumnParallelLinear(8, 12, bias=True, gather_output=True), w, b, 0, x),
        (parallel.RowParallelLinear(12, 8, bias=True, input_is_parallel=False),
         layers.RowParallelLinear(12, 8, bias=True, input_is_parallel=False), w.T.contiguous(), b[:8], 1,
         torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))),
        (parallel.ParallelEmbedding(10, 6), layers.ParallelEmbedding(10, 6), emb, None, 1, tokens),
        (parallel.VocabParallelEmbedding(10, 6), layers.VocabParallelEmbedding(10, 6), emb, None, 0, tokens),
    ]
    for ours, theirs, weight, bias, dim, inp in cases:
        for layer in (ours, theirs):
            layer.weight.data.copy_(weight.chunk(2, dim)[rank])
            if bias is not None:
                layer.bias.data.copy_(bias if dim == 1 else bias.chunk(2)[rank])
        outs, grads = [], []
        for layer in (ours, theirs):
            x_in = inp.clone().requires_grad_(True) if inp.is_floating_point() else inp
            y = layer(x_in)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a non-uniform upstream gradient
            outs.append(y.detach())
            grads.append([layer.weight.grad] + ([x_in.grad] if inp.is_floating_point() else []))
        assert outs[0].shape == outs[1].shape
        assert (outs[0] - outs[1]).abs().max() < 1e-5, type(ours).__name__
        for g_ours, g_theirs in zip(*grads):
            assert (g_ours - g_theirs).abs().max() < 1e-5, type(ours).__name__
    # and against the unsplit computation
    full = F.linear(x, w, b)
    assert (cases[0][0](x) - full).abs().max() < 1e-5
    initialize.destroy_model_parallel()


def test_layers_match_fairscale_forward_and_backward():
    spawn(_check_layers_against_fairscale, 2)


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "run.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_py_under_torchrun_prints_once_and_matches_one_process(tiny_dir):
    args = ("--prompt", "The for statement", "--max-new-tokens", "16", "--temperature", "0", "--dtype", "float32")
    one = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=300)
    two = torchrun(*args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # the same text, printed by rank 0 only
    assert two.stderr.count("[prefill") == 1


def test_run_py_under_torchrun_missing_shard_exits_on_every_rank(hf_and_meta2):
    directory = hf_and_meta2
    (directory / "consolidated.01.pth").unlink()
    r = torchrun("--ckpt", str(directory), "--max-new-tokens", "4")
    assert r.returncode != 0
    assert r.stderr.count("consolidated.01.pth ... consolidated.01.pth are missing") == 1  # said once, by rank 0
    assert r.stderr.count("error: ") == 1  # (torchrun then reports the failed ranks itself)


@pytest.fixture
def hf_and_meta2(checkpoints, tmp_path):
    import shutil
    shutil.copytree(checkpoints[0]["meta2"], tmp_path / "m")
    return tmp_path / "m"

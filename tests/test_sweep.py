"""Activation patching sweeps: every entry equal to the patched run made by hand with zoo.hooks (one forward
each), whatever the batching; Decoder.forward_from equal to the forward on every family; at world size 2
the sweep and the attribution equal one process's."""
import pytest
import torch
from helpers import FAMILY_VARIANTS, hf_family, hf_llama, save_hf, spawn

import zoo
from zoo import hooks
from zoo.analysis import attribute, patch_sweep

SEQ = 7
CLEAN = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(0))
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 2] = (CLEAN[:, 2] + 17) % 320  # one token differs, as in a prompt pair


def metric(logits):
    """Reads every position, so that a wrong earlier position (from the corrupted run's) would show."""
    return (logits[..., 3] - logits[..., 11]).mean() + logits[:, -1, 5].sum()


@pytest.fixture(scope="module", params=["llama-gqa", "neox-rotary-0.25-parallel", "opt-post-ln-proj"])
def model(request, tmp_path_factory):
    built = hf_llama("gqa") if request.param == "llama-gqa" else hf_family(request.param)
    return zoo.load(save_hf(built, tmp_path_factory.mktemp(request.param)), dtype=torch.float32)


def by_hand(model, point, position=None, unit=None):
    """The metric of the corrupted run with the clean activation at `point` (at one position, one unit)."""
    clean = hooks.collect(point)
    with torch.no_grad():
        model(CLEAN, hooks=clean)
        if position is None and unit is None:
            return metric(model(CORRUPTED, hooks=hooks.patch(clean))).item()
        if unit is None:
            return metric(model(CORRUPTED, hooks={point: hooks.replace(clean[point], positions=[position])})).item()

        def one_unit(x, ctx):
            y = x.clone()
            where = slice(None) if position is None else position
            y[:, where, unit] = clean[point][:, where, unit]
            return y
        return metric(model(CORRUPTED, hooks={point: one_unit})).item()


def close(a, b):
    return abs(a - b) < 1e-4 * max(1.0, abs(b))


@pytest.mark.parametrize("family", ["llama-gqa", *sorted(FAMILY_VARIANTS)])
def test_forward_from_any_layer_is_the_forward(family, tmp_path):
    built = hf_llama("gqa") if family == "llama-gqa" else hf_family(family)
    model = zoo.load(save_hf(built, tmp_path), dtype=torch.float32)
    entering = hooks.collect("blocks.*.resid_pre")
    kv = model.new_cache(2, SEQ)
    with torch.no_grad():
        want = model(CLEAN, kv, hooks=entering)
        for layer in range(len(model.blocks)):
            h = entering[f"blocks.{layer}.resid_pre"]
            assert (model.forward_from(layer, h, CLEAN) - want).abs().max() < 1e-5, layer
            kv.seek(3)  # positions 3.. from the cache's keys and values before them
            rest = model.forward_from(layer, h[:, 3:], CLEAN[:, 3:], kv)
            assert (rest - want[:, 3:]).abs().max() < 1e-5, layer


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_layer_position_sweep_equals_patching_by_hand(model, batch):
    got = patch_sweep(model, CLEAN, CORRUPTED, metric, point="resid_pre", by="layer,position", batch=batch)
    assert got.shape == (len(model.blocks), SEQ)
    for layer in range(len(model.blocks)):
        for t in range(SEQ):
            assert close(got[layer, t].item(), by_hand(model, f"blocks.{layer}.resid_pre", t)), (layer, t)
    with torch.no_grad():
        base = metric(model(CORRUPTED)).item()
    assert (got[:, :2] - base).abs().max() < 1e-4 < (got[:, 2] - base).abs().max()  # the tokens differ from 2 on


def test_head_neuron_and_layer_sweeps_equal_patching_by_hand(model):
    heads = patch_sweep(model, CLEAN, CORRUPTED, metric, by="head", batch=3)
    assert heads.shape == (len(model.blocks), model.config.n_heads)
    for layer in range(len(model.blocks)):
        for h in range(model.config.n_heads):
            assert close(heads[layer, h].item(), by_hand(model, f"blocks.{layer}.z", unit=h)), (layer, h)
    by_pos = patch_sweep(model, CLEAN, CORRUPTED, metric, point="v", by="head,position", batch=5)
    assert by_pos.shape == (len(model.blocks), SEQ, model.config.n_kv_heads)
    for layer, t, h in [(0, 2, 0), (1, 2, model.config.n_kv_heads - 1), (1, 5, 1), (0, 0, 0)]:
        assert close(by_pos[layer, t, h].item(), by_hand(model, f"blocks.{layer}.v", t, h)), (layer, t, h)
    neurons = patch_sweep(model, CLEAN, CORRUPTED, metric, by="neuron", batch=64)
    assert neurons.shape == (len(model.blocks), model.config.hidden_dim)
    for layer, n in [(0, 0), (1, 17), (1, model.config.hidden_dim - 1)]:
        assert close(neurons[layer, n].item(), by_hand(model, f"blocks.{layer}.mlp_post", unit=n)), (layer, n)
    layers = patch_sweep(model, CLEAN, CORRUPTED, metric, point="mlp_in", by="layer")
    for layer in range(len(model.blocks)):
        assert close(layers[layer].item(), by_hand(model, f"blocks.{layer}.mlp_in")), layer


def test_block_sweep_is_resid_pre_attn_out_mlp_out(model):
    got = patch_sweep(model, CLEAN, CORRUPTED, metric, by="block", batch=4)
    assert got.shape == (3, len(model.blocks), SEQ)
    for k, point in enumerate(["resid_pre", "attn_out", "mlp_out"]):
        for layer in range(len(model.blocks)):
            for t in (0, 2, SEQ - 1):
                assert close(got[k, layer, t].item(), by_hand(model, f"blocks.{layer}.{point}", t)), (point, layer, t)


def test_progress_and_errors(model, capsys):
    patch_sweep(model, CLEAN, CORRUPTED, metric, by="layer", progress=True)
    assert capsys.readouterr().err.endswith(f"\rpatch_sweep: {len(model.blocks)}/{len(model.blocks)} patched runs\n")
    with pytest.raises(ValueError, match="by='rows': choose one of 'layer,position'"):
        patch_sweep(model, CLEAN, CORRUPTED, metric, by="rows")
    with pytest.raises(ValueError, match="by='head' patches heads of q, k, v, z, q_normed, k_normed, not 'resid_pre'"):
        patch_sweep(model, CLEAN, CORRUPTED, metric, point="resid_pre", by="head")
    with pytest.raises(ValueError, match="point='pattern'"):
        patch_sweep(model, CLEAN, CORRUPTED, metric, point="pattern")
    with pytest.raises(ValueError, match=r"clean \(2, 7\) and corrupted \(2, 6\) must have the same shape"):
        patch_sweep(model, CLEAN, CORRUPTED[:, :6], metric)
    with pytest.raises(TypeError, match="clean must be a"):
        patch_sweep(model, CLEAN.float(), CORRUPTED, metric)
    with pytest.raises(ValueError, match="batch=0"):
        patch_sweep(model, CLEAN, CORRUPTED, metric, batch=0)


def _check_world_2(rank, directory, want):
    model = zoo.load(directory, dtype=torch.float32)
    for by, point in [("layer,position", "resid_pre"), ("head", "z"), ("neuron", "mlp_post"), ("block", None)]:
        got = patch_sweep(model, CLEAN, CORRUPTED, metric, point=point, by=by, batch=5)
        assert (got - want[by]).abs().max() < 1e-4, by
    est = attribute(model, CLEAN, CORRUPTED, metric, points=("resid_pre", "z", "mlp_post"))
    for point, t in want["attribute"].items():
        assert est[point].shape == t.shape and (est[point] - t).abs().max() < 1e-4, point


def test_sweep_and_attribution_at_world_size_2_equal_one_process(tmp_path):
    """Heads split 2 and 2, the MLP's 171 hidden units 86 and 85 (+1 padding): global unit indices."""
    directory = save_hf(hf_llama("gqa", intermediate_size=171), tmp_path)
    model = zoo.load(directory, dtype=torch.float32)
    want = {by: patch_sweep(model, CLEAN, CORRUPTED, metric, point=point, by=by)
            for by, point in [("layer,position", "resid_pre"), ("head", "z"), ("neuron", "mlp_post"), ("block", None)]}
    want["attribute"] = attribute(model, CLEAN, CORRUPTED, metric, points=("resid_pre", "z", "mlp_post"))
    spawn(_check_world_2, 2, directory, want)

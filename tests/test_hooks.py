"""Hook points: the same names on every family, each firing once; built-in hooks checked against by-hand edits."""
import pytest
import torch
from helpers import FAMILY_VARIANTS, hf_family, hf_llama, save_hf, spawn

import zoo
from zoo import hooks

pytest.importorskip("transformers")
VARIANTS = ["llama-gqa", *sorted(FAMILY_VARIANTS)]
TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def build(variant):
    return hf_llama("gqa") if variant == "llama-gqa" else hf_family(variant)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tmp_path_factory):
    directory = save_hf(build(request.param), tmp_path_factory.mktemp(request.param))
    return zoo.load(directory, dtype=torch.float32)


def run(model, tokens=TOKENS, hooks=None, **kwargs):
    with torch.no_grad():
        return model(tokens, hooks=hooks, **kwargs)


def test_every_point_fires_once_with_documented_shape(model):
    fired = []
    run(model, hooks={"*": lambda x, ctx: fired.append((ctx.name, tuple(x.shape)))})
    names = [n for n, _ in fired]
    assert len(names) == len(set(names)) == len(hooks.names(model))  # each exactly once
    assert set(names) == set(hooks.names(model))
    cfg, shapes = model.config, dict(fired)
    b, s, n = 2, 12, cfg.n_layers
    assert shapes["blocks.1.q"] == (b, s, cfg.n_heads, cfg.head_dim)
    assert shapes["blocks.1.k"] == (b, s, cfg.n_kv_heads, cfg.head_dim)
    assert shapes["blocks.0.pattern"] == (b, cfg.n_heads, s, s)
    assert shapes["blocks.0.z"] == (b, s, cfg.n_heads, cfg.head_dim)
    assert shapes["blocks.0.mlp_post"] == (b, s, cfg.hidden_dim)
    assert shapes[f"blocks.{n - 1}.resid_post"] == (b, s, cfg.dim) and shapes["logits"] == (b, s, cfg.vocab_size)
    assert model.hook_points(TOKENS) == shapes


def test_reading_hooks_change_nothing(model):
    """Bit for bit, except that hooking `pattern` writes attention out instead of the fused SDPA kernel."""
    plain = run(model)
    every_but_pattern = {n: lambda x, ctx: None for n in hooks.names(model) if not n.endswith(".pattern")}
    assert torch.equal(run(model, hooks=every_but_pattern), plain)
    assert (run(model, hooks={"*": lambda x, ctx: None}) - plain).abs().max() < 1e-5


def test_zero_ablating_every_head_equals_zero_output_projection(model):
    ablated = run(model, hooks={"blocks.*.z": hooks.ablate(heads=range(model.config.n_heads))})
    saved = [b.attn.wo.weight.clone() for b in model.blocks]
    try:
        for b in model.blocks:
            b.attn.wo.weight.zero_()
        by_weights = run(model)
    finally:
        for b, w in zip(model.blocks, saved):
            b.attn.wo.weight.copy_(w)
    assert (ablated - by_weights).abs().max() < 1e-5
    assert (ablated - run(model)).abs().max() > 0.1


def test_add_at_resid_post_equals_adding_at_next_block_input(model):
    vector = torch.randn(model.config.dim, generator=torch.Generator().manual_seed(1))
    a = run(model, hooks={"blocks.0.resid_post": hooks.add(vector, positions=[3, 4], scale=2.0)})
    by_hand = run(model, hooks={"blocks.1.resid_pre": lambda x, ctx: x + 2.0 * vector * (
        (torch.arange(12) == 3) | (torch.arange(12) == 4))[None, :, None]})
    assert torch.equal(a, by_hand)
    assert (a - run(model)).abs().max() > 1e-3
    assert torch.equal(a[:, :3], run(model)[:, :3])  # causal: earlier positions untouched


def test_collect_then_patch_reproduces_logits(model):
    plain = run(model)
    cache = hooks.collect("blocks.*.resid_post", "blocks.*.z", "ln_final")
    assert torch.equal(run(model, hooks=cache), plain)
    other = torch.randint(0, 320, TOKENS.shape, generator=torch.Generator().manual_seed(9))
    patched = run(model, other, hooks=hooks.patch(cache, "blocks.*.resid_post"))
    assert torch.equal(patched, plain)
    assert torch.equal(run(model, other, hooks=hooks.patch(cache, "ln_final")), plain)
    assert not torch.equal(run(model, other, hooks=hooks.patch(cache, "blocks.0.z")), plain)  # only a part patched


def test_last_resid_post_through_norm_and_unembedding_is_logits(model):
    cache = hooks.collect(f"blocks.{model.config.n_layers - 1}.resid_post")
    logits = run(model, hooks=cache)
    h = cache[f"blocks.{model.config.n_layers - 1}.resid_post"]
    with torch.no_grad():
        h = model.norm(h) if model.norm is not None else h
        h = model.project_out(h) if getattr(model, "project_out", None) is not None else h
        assert (model.output(h).float() - logits).abs().max() < 1e-5


def test_collect_over_generation_equals_full_forward(model):
    prompt = TOKENS[0, :7].tolist()
    starts = []
    cache = hooks.collect("blocks.*.resid_post", "blocks.1.pattern", "blocks.0.v")
    record_start = {"blocks.0.resid_pre": lambda x, ctx: starts.append((ctx.step, ctx.start_pos, x.shape[1]))}
    new = zoo.generate(model, [prompt], max_new_tokens=5, stop_ids=set(), hooks=[cache, record_start])[0]
    assert starts == [(0, 0, 7)] + [(i, 6 + i, 1) for i in range(1, 5)]
    full = hooks.collect("blocks.*.resid_post", "blocks.1.pattern", "blocks.0.v")
    run(model, torch.tensor([prompt + new[:4]]), hooks=full)  # the last token is sampled, never fed back
    for name in ("blocks.1.resid_post", "blocks.1.pattern", "blocks.0.v"):
        assert cache[name].shape == full[name].shape, name
        assert (cache[name] - full[name]).abs().max() < 1e-5, name


def test_editing_keys_reaches_the_kv_cache(model):
    """Double the keys of the first 5 positions in the prefill only: later cached steps must see them."""
    tokens = TOKENS[:1]
    edit = {"blocks.*.k": hooks.replace(lambda x, ctx: 2 * x, positions=range(5))}
    want = run(model, tokens, hooks=edit)
    cache = model.new_cache(1, 12)
    run(model, tokens[:, :8], hooks=edit, cache=cache)
    steps = torch.cat([run(model, tokens[:, i : i + 1], cache=cache) for i in range(8, 12)], dim=1)
    assert (steps - want[:, 8:]).abs().max() < 1e-5
    assert (steps - run(model, tokens)[:, 8:]).abs().max() > 1e-3


def test_unknown_names_suggest_nearest(model):
    with pytest.raises(KeyError, match=r"no hook point matches 'blocks.0.resid_psot'; nearest: blocks.0.resid_post"):
        run(model, hooks={"blocks.0.resid_psot": lambda x, ctx: None})
    with pytest.raises(KeyError, match=r"nearest: .*blocks.1.mlp_post"):
        run(model, hooks={"blocks.9.mlp_post": lambda x, ctx: None})


def test_resid_mid_on_parallel_residual_explains(tmp_path):
    model = zoo.load(save_hf(hf_family("neox-rotary-0.25-parallel"), tmp_path), dtype=torch.float32)
    with pytest.raises(KeyError, match="parallel residual"):
        run(model, hooks={"blocks.0.resid_mid": lambda x, ctx: None})


def test_ablate_neurons_and_mean_mode(model):
    cache = hooks.collect("blocks.0.mlp_pre", "blocks.0.z")
    run(model, hooks=[{"blocks.0.mlp_pre": hooks.ablate(neurons=[0, 5]),  # hooks on one point run in the
                       "blocks.0.z": hooks.ablate(heads=[1], mode="mean")}, cache])  # order given: ablate, then record
    neurons, z = cache["blocks.0.mlp_pre"], cache["blocks.0.z"]
    assert (neurons[..., [0, 5]] == 0).all() and (neurons[..., 1] != 0).any()
    assert torch.allclose(z[:, :, 1], z[:, :, 1].mean(dim=(0, 1), keepdim=True).expand_as(z[:, :, 1]))


def _tp_hooks(rank, directory, want_resid, want_z, want_ablated):
    model = zoo.load(directory, dtype=torch.float32)
    cache = hooks.collect("blocks.1.resid_post", "blocks.0.z", gather=True)
    seen = []
    with torch.no_grad():
        model(TOKENS, hooks=[cache, {"blocks.0.z": lambda x, ctx: seen.append(ctx.shard)}])
        ablated = model(TOKENS, hooks={"blocks.*.z": hooks.ablate(heads=[3])})
    assert seen == [(2, 2 * rank, 2 * rank + 2, 4)]  # 2 of the 4 heads on each rank
    assert (cache["blocks.1.resid_post"] - want_resid).abs().max() < 1e-5
    assert (cache["blocks.0.z"] - want_z).abs().max() < 1e-5
    assert (ablated - want_ablated).abs().max() < 1e-5


def test_hooks_under_tensor_parallelism(tmp_path):
    directory = save_hf(hf_llama("gqa"), tmp_path)
    model = zoo.load(directory, dtype=torch.float32)
    cache = hooks.collect("blocks.1.resid_post", "blocks.0.z")
    run(model, hooks=cache)
    ablated = run(model, hooks={"blocks.*.z": hooks.ablate(heads=[3])})
    spawn(_tp_hooks, 2, directory, cache["blocks.1.resid_post"], cache["blocks.0.z"], ablated)

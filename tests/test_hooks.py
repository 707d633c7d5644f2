"""Hook points: the same names on every family, each firing once; built-in hooks checked against by-hand
edits, and differentially: a left-padded batch equals each row alone, a generation equals one forward of
its final sequence, tensor parallelism equals one process."""
import pytest
import torch
from helpers import FAMILY_VARIANTS, hf_family, hf_llama, save_hf, spawn

import zoo
from zoo import hooks

VARIANTS = ["llama-gqa", *sorted(FAMILY_VARIANTS)]
TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
PROMPTS = [TOKENS[0, :7].tolist(), TOKENS[1, :4].tolist()]  # the second is left-padded by 3 in a batch
NEW = 5


def build(variant):
    return hf_llama("gqa") if variant == "llama-gqa" else hf_family(variant)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tmp_path_factory):
    directory = save_hf(build(request.param), tmp_path_factory.mktemp(request.param))
    return zoo.load(directory, dtype=torch.float32)


def run(model, tokens=TOKENS, hooks=None, **kwargs):
    with torch.no_grad():
        return model(tokens, hooks=hooks, **kwargs)


def sizes(model) -> dict[str, int]:
    """The letters of the documented shapes (hooks.POINTS), from the config."""
    c = model.config
    return {"h": c.n_heads, "kvh": c.n_kv_heads, "d": c.head_dim, "D": c.dim, "F": c.hidden_dim, "V": c.vocab_size,
            "E": getattr(c, "embed_dim", c.dim)}


def test_every_point_fires_once_with_documented_shape(model):
    fired = []
    run(model, hooks={"*": lambda x, ctx: fired.append((ctx.name, tuple(x.shape)))})
    names = [n for n, _ in fired]
    assert len(names) == len(set(names)) == len(hooks.names(model))  # each exactly once
    assert set(names) == set(hooks.names(model))
    letters = {"b": 2, "s": 12, "S": 12, **sizes(model)}
    for name, shape in fired:  # the table's shapes, letter by letter
        documented = hooks.POINTS[name.rsplit(".", 1)[-1]][0].split()
        assert shape == tuple(letters[x] for x in documented), name
    assert model.hook_points(TOKENS) == dict(fired)


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


def test_defaults_act_on_every_position(model):
    """add and replace without positions: every position, as by hand."""
    vector = torch.randn(model.config.dim, generator=torch.Generator().manual_seed(2))
    added = run(model, hooks={"blocks.0.resid_post": hooks.add(vector)})
    assert torch.equal(added, run(model, hooks={"blocks.0.resid_post": lambda x, ctx: x + vector}))
    replaced = run(model, hooks={"blocks.0.resid_post": hooks.replace(vector)})
    assert torch.equal(replaced, run(model, hooks={"blocks.0.resid_post": lambda x, ctx: vector.expand_as(x)}))
    doubled = run(model, hooks={"blocks.1.mlp_out": hooks.replace(lambda x, ctx: 2 * x)})
    assert torch.equal(doubled, run(model, hooks={"blocks.1.mlp_out": lambda x, ctx: 2 * x}))
    assert (added - run(model)).abs().max() > 1e-3 and (replaced - added).abs().max() > 1e-3


def test_positions_slice_and_range(model):
    vector = torch.randn(model.config.dim, generator=torch.Generator().manual_seed(3))
    by_list = run(model, hooks={"blocks.0.attn_out": hooks.add(vector, positions=[2, 5, 8, 11])})
    assert torch.equal(by_list, run(model, hooks={"blocks.0.attn_out": hooks.add(vector, positions=slice(2, None, 3))}))
    assert torch.equal(by_list, run(model, hooks={"blocks.0.attn_out": hooks.add(vector, positions=range(2, 12, 3))}))
    assert torch.equal(by_list, run(model, hooks={"blocks.0.attn_out": hooks.add(vector, positions=torch.tensor([2, 5, 8, 11]))}))
    assert torch.equal(by_list[:, :2], run(model)[:, :2])


def test_collect_then_patch_reproduces_logits(model):
    plain = run(model)
    cache = hooks.collect("blocks.*.resid_post", "blocks.*.z", "ln_final")
    assert torch.equal(run(model, hooks=cache), plain)
    other = torch.randint(0, 320, TOKENS.shape, generator=torch.Generator().manual_seed(9))
    patched = run(model, other, hooks=hooks.patch(cache, "blocks.*.resid_post"))
    assert torch.equal(patched, plain)
    assert torch.equal(run(model, other, hooks=hooks.patch(cache, "ln_final")), plain)
    last = f"blocks.{model.config.n_layers - 1}.resid_post"
    assert torch.equal(run(model, other, hooks={last: hooks.patch(cache)}), plain)  # as the hook of one point
    assert not torch.equal(run(model, other, hooks=hooks.patch(cache, "blocks.0.z")), plain)  # only a part patched
    assert torch.equal(run(model, other, hooks=hooks.patch(cache)), plain)  # every recorded point


def test_last_resid_post_through_norm_and_unembedding_is_logits(model):
    cache = hooks.collect(f"blocks.{model.config.n_layers - 1}.resid_post")
    logits = run(model, hooks=cache)
    h = cache[f"blocks.{model.config.n_layers - 1}.resid_post"]
    with torch.no_grad():
        h = model.norm(h) if model.norm is not None else h
        h = model.project_out(h) if getattr(model, "project_out", None) is not None else h
        assert (model.unembed(h).float() - logits).abs().max() < 1e-5  # (Gemma 2's unembed soft-caps)


def test_collect_over_generation_equals_full_forward(model):
    """Every point, ln_final and logits included: the generation's steps joined equal one forward."""
    prompt = PROMPTS[0]
    seen = []
    cache = hooks.collect("*")
    record = {"blocks.0.resid_pre": lambda x, ctx: seen.append((ctx.step, ctx.start_pos, ctx.positions.tolist()))}
    new = zoo.generate(model, [prompt], max_new_tokens=NEW, stop_ids=set(), hooks=[cache, record])[0]
    assert seen == [(0, 0, [list(range(7))])] + [(i, 6 + i, [[6 + i]]) for i in range(1, NEW)]
    full = hooks.collect("*")
    run(model, torch.tensor([prompt + new[:-1]]), hooks=full)  # the last token is sampled, never fed back
    assert set(cache) == set(full) == set(hooks.names(model))
    for name, want in full.items():
        assert cache[name].shape == want.shape, name
        assert (cache[name] - want).abs().max() < 1e-5, name


def test_collect_over_padded_generation_equals_each_row_alone(model):
    batch = hooks.collect("*")
    zoo.generate(model, PROMPTS, max_new_tokens=NEW, stop_ids=set(), hooks=batch)
    assert batch.left_pad.tolist() == [0, 3]
    for row, prompt in enumerate(PROMPTS):
        alone = hooks.collect("*")
        zoo.generate(model, [prompt], max_new_tokens=NEW, stop_ids=set(), hooks=alone)
        pad = batch.left_pad[row].item()
        for name, want in alone.items():
            got = batch[name][row : row + 1]
            got = got[:, :, pad:, pad:] if name.endswith(".pattern") else got[:, pad:]
            assert (got - want).abs().max() < 1e-5, (row, name)


def test_collect_holds_one_run_and_reads_like_a_dict(tiny_dir):
    """The README's snippet: a forward, then a generation with the same collect."""
    model = zoo.load(tiny_dir, dtype=torch.float32)
    tokens = torch.tensor([model.tokenizer.encode("The for statement", bos=True)])
    cache = hooks.collect("blocks.*.resid_post", "blocks.2.pattern")
    run(model, tokens, hooks=cache)
    assert cache["blocks.2.pattern"].shape[2:] == (tokens.shape[1], tokens.shape[1])
    run(model, tokens, hooks=cache)  # the same forward again: replaced, not appended
    assert cache["blocks.0.resid_post"].shape[1] == tokens.shape[1]
    zoo.generate(model, [tokens[0].tolist()], max_new_tokens=4, stop_ids=set(), hooks=cache)
    seq = tokens.shape[1] + 3
    assert cache["blocks.2.pattern"].shape == (1, model.config.n_heads, seq, seq)
    assert len(cache) == 7 and set(cache.keys()) == {*(f"blocks.{i}.resid_post" for i in range(6)), "blocks.2.pattern"}
    assert [n for n, _ in cache.items()] == list(cache) and all(torch.equal(v, cache[n]) for n, v in zip(cache, cache.values()))
    assert "blocks.1.z" not in cache and cache.get("blocks.1.z") is None
    with pytest.raises(KeyError, match=r"'blocks.1.z' was not recorded; this collect holds blocks.0.resid_post"):
        cache["blocks.1.z"]
    cache.clear()
    assert len(cache) == 0


def test_collect_keeps_references_each_its_own(model):
    """collect keeps the forward's tensors (no copy) yet each record is its own: equal to copy=True's at every point,
    resid_post not sharing memory with the next resid_pre, and an edit of one record changes no other."""
    cache, copies = hooks.collect("*"), hooks.collect("*", copy=True)
    run(model, hooks=[cache, copies])
    assert list(cache) == list(copies) == hooks.names(model)
    assert all(torch.equal(cache[n], copies[n]) for n in cache)
    storages = [cache[n].untyped_storage().data_ptr() for n in cache if cache[n].numel()]
    assert len(storages) == len(set(storages))  # (q, k and v of a fused projection too)
    cache["blocks.0.resid_post"].zero_()
    assert torch.equal(cache["blocks.1.resid_pre"], copies["blocks.1.resid_pre"])


def test_a_hook_that_edits_in_place_after_collect_changes_no_record(model):
    """A user's hook may change its input in place: what collect recorded before it (at that point, or the same
    tensor at another point: resid_post is the next block's resid_pre) is copied first. zoo's own hooks say they
    never do (keeps_input): after them the records stay references."""
    want = hooks.collect("blocks.*.resid_post", "blocks.0.mlp_out", copy=True)  # (no pattern: the same kernels)
    run(model, hooks=want)

    def zero_in_place(x, ctx):
        x.zero_()

    for point in ("blocks.0.mlp_out", "blocks.1.resid_pre"):  # the second is the tensor of blocks.0.resid_post
        cache = hooks.collect("blocks.*.resid_post", "blocks.0.mlp_out")
        edited = run(model, hooks=[cache, {point: zero_in_place}])
        assert (edited - run(model)).abs().max() > 1e-3  # the edit reached the forward
        assert torch.equal(cache["blocks.0.mlp_out"], want["blocks.0.mlp_out"])
        if point == "blocks.1.resid_pre":
            assert torch.equal(cache["blocks.0.resid_post"], want["blocks.0.resid_post"])

    seen = {}

    def reader(x, ctx):
        seen[ctx.name] = x

    reader.keeps_input = True
    cache = hooks.collect("blocks.0.mlp_post")
    run(model, hooks=[cache, {"blocks.0.mlp_post": [hooks.ablate(neurons=[1]), reader]}])
    assert cache["blocks.0.mlp_post"].untyped_storage().data_ptr() != seen["blocks.0.mlp_post"].untyped_storage().data_ptr()
    cache = hooks.collect("blocks.0.mlp_post")
    run(model, hooks=[cache, {"blocks.0.mlp_post": reader}])
    assert cache["blocks.0.mlp_post"].untyped_storage().data_ptr() == seen["blocks.0.mlp_post"].untyped_storage().data_ptr()


def test_editing_keys_reaches_the_kv_cache(model):
    """Double the keys of the first 5 positions in the prefill only: later cached steps must see them. (Qwen3's
    keys go through an RMSNorm after the k point, which undoes a doubling: there the normed keys are doubled.)"""
    tokens = TOKENS[:1]
    point = "k_normed" if "blocks.0.k_normed" in hooks.names(model) else "k"
    edit = {f"blocks.*.{point}": hooks.replace(lambda x, ctx: 2 * x, positions=range(5))}
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


def causal_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """By hand: at each position t, the mean over positions 0..t along `dim`, one row at a time."""
    out = torch.empty_like(x)
    for t in range(x.shape[dim]):
        out.narrow(dim, t, 1).copy_(x.narrow(dim, 0, t + 1).mean(dim=dim, keepdim=True))
    return out


def test_ablate_neurons_and_mean_mode(model):
    points = ("blocks.0.mlp_pre", "blocks.0.z", "blocks.1.pattern")
    clean = hooks.collect(*points)
    run(model, hooks=clean)

    def ablated(name, hook):  # the recording of `name` with `hook` before it (hooks on a point run in order)
        cache = hooks.collect(name)
        run(model, hooks=[{name: hook}, cache])
        return cache[name]

    neurons = ablated("blocks.0.mlp_pre", hooks.ablate(neurons=[0, -1]))
    last = model.config.hidden_dim - 1
    assert (neurons[..., [0, last]] == 0).all() and torch.equal(neurons[..., 1:last], clean["blocks.0.mlp_pre"][..., 1:last])
    z = ablated("blocks.0.z", hooks.ablate(heads=[1], mode="mean"))
    assert (z[:, :, 1] - causal_mean(clean["blocks.0.z"][:, :, 1], dim=1)).abs().max() < 1e-6
    assert torch.equal(z[:, :, 0], clean["blocks.0.z"][:, :, 0])
    assert (z[:, 1:, 1] - z[:, :1, 1]).abs().max() > 1e-3  # a running mean, not one value for the whole row
    pattern = ablated("blocks.1.pattern", hooks.ablate(heads=[-1], mode="mean"))
    want = causal_mean(clean["blocks.1.pattern"][:, -1], dim=1)  # (b, q, S): each row still sums to 1
    assert (pattern[:, -1] - want).abs().max() < 1e-6 and (pattern[:, -1].sum(-1) - 1).abs().max() < 1e-5
    assert torch.equal(pattern[:, :-1], clean["blocks.1.pattern"][:, :-1])


# ---- the differential contract: a left-padded batch during generate equals each row alone ----------------

def builtins(model, clean: hooks.collect):
    """(name, hook set) for every built-in on points of every kind; patch reads `clean`."""
    g = torch.Generator().manual_seed(4)
    c = model.config
    vector = torch.randn(c.dim, generator=g)
    neurons = torch.randn(c.hidden_dim, generator=g)
    head = torch.randn(c.head_dim, generator=g)
    return {
        "add resid_post at positions": {"blocks.0.resid_post": hooks.add(vector, positions=[1, 3, 8])},
        "add attn_in everywhere": {"blocks.1.attn_in": hooks.add(vector, scale=0.5)},
        "replace mlp_post by a value from 2 on": {"blocks.0.mlp_post": hooks.replace(neurons, positions=slice(2, None))},
        # (+ 0.5: Qwen3's RMSNorm after the q point would undo a bare scaling)
        "replace q by fn": {"blocks.0.q": hooks.replace(lambda x, ctx: 2 * x + 0.5, positions=[0, 5, 8])},
        "replace k and v by fn": {"blocks.1.k": hooks.replace(lambda x, ctx: 0.5 * x), "blocks.1.v": hooks.replace(head)},
        "ablate heads zero": {"blocks.0.z": hooks.ablate(heads=[0, -1])},
        "ablate heads mean on z": {"blocks.1.z": hooks.ablate(heads=[1], mode="mean")},
        "ablate heads mean on pattern": {"blocks.0.pattern": hooks.ablate(heads=[2], mode="mean")},
        "ablate neurons mean": {"blocks.1.mlp_pre": hooks.ablate(neurons=range(0, c.hidden_dim, 3), mode="mean")},
        "add ln_final at 6": {"ln_final": hooks.add(vector[: sizes(model)["E"]], positions=[6])},
        "replace logits at 4": {"logits": hooks.replace(lambda x, ctx: x.flip(-1), positions=[4])},
        "patch resid_post and v": hooks.patch(clean, ["blocks.0.resid_post", "blocks.1.v"]),
    }


def generated(model, prompts, spec):
    """Greedy new tokens and the logits at every position of every row (padding stripped)."""
    logits = hooks.collect("logits")
    new = zoo.generate(model, prompts, max_new_tokens=NEW, stop_ids=set(), hooks=[spec, logits])
    pad = logits.left_pad.tolist() if logits.left_pad is not None else [0] * len(prompts)
    return new, [logits["logits"][row, p:] for row, p in enumerate(pad)]


def test_builtins_in_a_padded_generation_equal_each_row_alone(model):
    clean_prompts = [TOKENS[1, :7].tolist(), TOKENS[0, :5].tolist()]  # padded by 2 here, by 3 in PROMPTS
    clean_batch, clean_rows = hooks.collect("*"), [hooks.collect("*") for _ in PROMPTS]
    zoo.generate(model, clean_prompts, max_new_tokens=NEW, stop_ids=set(), hooks=clean_batch)
    for prompt, rec in zip(clean_prompts, clean_rows):
        zoo.generate(model, [prompt], max_new_tokens=NEW, stop_ids=set(), hooks=rec)
    _, plain = generated(model, PROMPTS, {})
    for name, spec in builtins(model, clean_batch).items():
        new, logits = generated(model, PROMPTS, spec)
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(logits, plain)), f"{name} changed nothing"
        for row, prompt in enumerate(PROMPTS):
            alone_spec = builtins(model, clean_rows[row])[name]
            alone_new, alone_logits = generated(model, [prompt], alone_spec)
            assert new[row] == alone_new[0], (name, row)
            assert (logits[row] - alone_logits[0]).abs().max() < 1e-5, (name, row)


def test_generation_equals_one_forward_with_hooks(model):
    """Steering during generate equals one forward of the final sequence with the same hook."""
    vector = torch.randn(model.config.dim, generator=torch.Generator().manual_seed(5))
    spec = {"blocks.0.mlp_out": hooks.add(vector, positions=[2, 8]), "blocks.1.z": hooks.ablate(heads=[1], mode="mean"),
            "logits": hooks.replace(lambda x, ctx: x * 1.5, positions=slice(6, None))}
    new, logits = generated(model, [PROMPTS[0]], spec)
    full = run(model, torch.tensor([PROMPTS[0] + new[0][:-1]]), hooks=spec)
    assert (logits[0] - full[0]).abs().max() < 1e-5


def in_pieces(model, tokens, cuts, hooked, spec, left_pad=None):
    """Logits of `tokens` run through one KV cache in pieces cut at `cuts`: `spec` hooks the pieces whose
    index is in `hooked`, the others run without hooks."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], left_pad=left_pad)
    bounds = [0, *cuts, tokens.shape[1]]
    with torch.no_grad():
        return torch.cat([model(tokens[:, a:b], cache=cache, hooks=spec if i in hooked else None)
                          for i, (a, b) in enumerate(zip(bounds, bounds[1:]))], dim=1)


def test_a_recording_begun_mid_run_patches_by_position(model):
    """Prefill unhooked, then cached steps with collect: the recording knows it holds positions 8..11, and
    patches as the same positions cut from a whole-run recording do (#25: it used to patch 0..3 with them)."""
    points = ("blocks.0.resid_post", "blocks.1.z", "blocks.1.pattern")
    whole, late = hooks.collect(*points), hooks.collect(*points)
    run(model, hooks=whole)
    in_pieces(model, TOKENS, [8, 9, 10, 11], {1, 2, 3, 4}, late)
    for name in points:
        assert late.positions(name).tolist() == [[8, 9, 10, 11]], name
        cut = whole[name][:, :, 8:12] if name.endswith("pattern") else whole[name][:, 8:12]
        assert (late[name] - cut).abs().max() < 1e-5, name
    assert whole.positions("blocks.0.resid_post").tolist() == [list(range(12))]
    other = torch.randint(0, 320, TOKENS.shape, generator=torch.Generator().manual_seed(9))
    for names in points:
        from_late = in_pieces(model, other, [8, 9, 10, 11], {1, 2, 3, 4}, hooks.patch(late, names))
        from_whole = in_pieces(model, other, [8, 9, 10, 11], {1, 2, 3, 4}, hooks.patch(whole, names))
        assert (from_late - from_whole).abs().max() < 1e-5, names
        assert (from_late - run(model, other)).abs()[:, 8:].max() > 1e-3, names  # it patched something
    with pytest.raises(ValueError, match=r"patch at blocks.0.resid_post: this run needs positions 0..7 \(row 0\), "
                                         r"which the recording does not cover \(it covers positions 8..11\)"):
        run(model, other, hooks=hooks.patch(late))
    # left-padded: row 1 starts 3 slots later, so the same slots hold its positions 5..8
    padded = hooks.collect("blocks.0.resid_post")
    in_pieces(model, TOKENS, [8, 9, 10, 11], {1, 2, 3, 4}, padded, left_pad=[0, 3])
    assert padded.positions("blocks.0.resid_post").tolist() == [[8, 9, 10, 11], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match=r"needs positions 0..7 \(row 0\)"):
        run(model, other, hooks=hooks.patch(padded))


def mean_ablations(positions=None):
    return {"blocks.1.z": hooks.ablate(heads=[1], mode="mean", positions=positions),
            "blocks.0.mlp_pre": hooks.ablate(neurons=[0, 3], mode="mean", positions=positions),
            "blocks.1.pattern": hooks.ablate(heads=[0], mode="mean", positions=positions)}


@pytest.mark.parametrize("cuts", [[5], [3, 7], [8, 9, 10, 11], list(range(1, 12))])
def test_mean_ablation_over_any_split_equals_one_forward(model, cuts):
    """Hooked on every piece, a run cut anywhere equals one forward; ablating from position k on
    (positions=) leaves the earlier positions alone and still averages from 0; a piece without the hook
    before a hooked one is an error naming the positions it missed (#25: it averaged from the first
    hooked step); padding alone may go unhooked."""
    pieces = set(range(len(cuts) + 1))
    assert (in_pieces(model, TOKENS, cuts, pieces, mean_ablations()) - run(model, hooks=mean_ablations())).abs().max() < 1e-5
    k = cuts[0]
    from_k = run(model, hooks=mean_ablations(slice(k, None)))
    assert (in_pieces(model, TOKENS, cuts, pieces, mean_ablations(slice(k, None))) - from_k).abs().max() < 1e-5
    assert (from_k[:, :k] - run(model)[:, :k]).abs().max() < 1e-5 and (from_k[:, k:] - run(model)[:, k:]).abs().max() > 1e-3
    missed = "0" if k == 1 else f"0..{k - 1}"
    with pytest.raises(ValueError, match=rf"ablate\(mode='mean'\) at blocks.0.mlp_pre: positions {missed} \(row 0\) "
                                         rf"ran without this hook"):
        in_pieces(model, TOKENS, cuts, pieces - {0}, mean_ablations())
    pad = [3]  # the first 3 slots are padding: they need no hook
    one = in_pieces(model, TOKENS[:1], [3], {1}, mean_ablations(), left_pad=pad)
    assert (one - run(model, TOKENS[:1], hooks=mean_ablations(), left_pad=torch.tensor(pad)))[:, 3:].abs().max() < 1e-5



def test_mean_ablation_refuses_a_rewound_cache(model):
    """A KV cache sought back within a run (zoo/chat.py does so) would average positions twice: an error."""
    cache, spec = model.new_cache(1, 12), {"blocks.0.z": hooks.ablate(heads=[0], mode="mean")}
    with torch.no_grad():
        model(TOKENS[:1, :8], cache=cache, hooks=spec)
        cache.seek(5)
        with pytest.raises(ValueError, match=r"goes back to slot 5 of a run this hook has seen up to slot 7"):
            model(TOKENS[:1, 5:8], cache=cache, hooks=spec)

# ---- errors ------------------------------------------------------------------------------------

def test_bad_hooks_give_errors_that_name_the_point(model):
    with pytest.raises(TypeError, match=r"hook given for 'blocks.0.resid_post' is a Tensor, not a function"):
        run(model, hooks={"blocks.0.resid_post": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"hooks= takes a dict"):
        run(model, hooks="blocks.0.resid_post")
    with pytest.raises(TypeError, match=r"on blocks.0.mlp_out returned torch.int64; return a floating-point"):
        run(model, hooks={"blocks.0.mlp_out": lambda x, ctx: x.long()})
    with pytest.raises(ValueError, match=r"on blocks.0.mlp_out returned shape \(2, 11, 64\), expected \(2, 12, 64\)"):
        run(model, hooks={"blocks.0.mlp_out": lambda x, ctx: x[:, 1:]})
    with pytest.raises(ValueError, match=r"on embed returned a tensor on meta"):
        run(model, hooks={"embed": lambda x, ctx: x.to("meta")})
    with pytest.raises(TypeError, match=r"on logits returned a list"):
        run(model, hooks={"logits": lambda x, ctx: [1]})
    with pytest.raises(ZeroDivisionError) as e:
        run(model, hooks={"blocks.1.v": lambda x, ctx: 1 / 0})
    assert "on blocks.1.v" in "".join(getattr(e.value, "__notes__", []))
    with pytest.raises(ValueError, match=r"replace at blocks.0.z: a value of shape \(7,\) does not broadcast"):
        run(model, hooks={"blocks.0.z": hooks.replace(torch.zeros(7))})


def test_returned_dtype_is_cast_back(model):
    plain = run(model)
    assert run(model, hooks={"logits": lambda x, ctx: x.half()}).dtype == torch.float32
    doubled = run(model, hooks={"blocks.0.mlp_out": lambda x, ctx: x.double()})
    assert doubled.dtype == torch.float32 and (doubled - plain).abs().max() < 1e-5


def test_bad_indices_and_positions(model):
    with pytest.raises(ValueError, match=r"positions \[-1\]: -1 is negative"):
        hooks.add(torch.zeros(4), positions=[-1])
    with pytest.raises(ValueError, match=r"is negative"):
        hooks.replace(0.0, positions=slice(-1, None))
    with pytest.raises(TypeError, match=r"positions \[1.5\]: 1.5 is not an int"):
        hooks.add(torch.zeros(4), positions=[1.5])
    with pytest.raises(TypeError, match=r"ablate\(heads=\['a'\]\): 'a' is not an int"):
        hooks.ablate(heads=["a"])
    n = model.config.n_heads
    with pytest.raises(IndexError, match=rf"head 99 is out of range for blocks.0.z, which has {n} heads \(valid: -{n}..{n - 1}\)"):
        run(model, hooks={"blocks.*.z": hooks.ablate(heads=[99])})
    with pytest.raises(IndexError, match=rf"head -{n + 1} is out of range"):
        run(model, hooks={"blocks.*.z": hooks.ablate(heads=[-n - 1])})
    last = run(model, hooks={"blocks.*.z": hooks.ablate(heads=[-1])})
    assert torch.equal(last, run(model, hooks={"blocks.*.z": hooks.ablate(heads=[n - 1])}))
    with pytest.raises(ValueError, match=r"cannot apply to blocks.0.resid_post; it applies to q, k, v, z, pattern"):
        run(model, hooks={"blocks.0.resid_post": hooks.ablate(heads=[0])})


def test_start_pos_is_refused_when_rows_start_at_different_positions(model):
    with pytest.raises(ValueError, match=r"rows of this left-padded batch start at different positions.*ctx.positions"):
        run(model, hooks={"embed": lambda x, ctx: ctx.start_pos}, left_pad=torch.tensor([0, 2]))
    seen = []
    run(model, hooks={"embed": lambda x, ctx: seen.append(ctx.positions)}, left_pad=torch.tensor([0, 2]))
    assert seen[0].tolist() == [list(range(12)), list(range(-2, 10))]


def test_patch_errors(model):
    cache = hooks.collect("blocks.0.resid_post")
    with pytest.raises(ValueError, match=r"has recorded nothing yet"):
        run(model, hooks=hooks.patch(cache))
    run(model, TOKENS[:, :6], hooks=cache)
    with pytest.raises(ValueError, match=r"'blocks.1.\*' matches no recorded point; recorded: blocks.0.resid_post"):
        run(model, hooks=hooks.patch(cache, "blocks.1.*"))
    with pytest.raises(ValueError, match=r"patch: nothing was recorded at blocks.1.resid_post"):
        run(model, hooks={"blocks.1.resid_post": hooks.patch(cache)})
    with pytest.raises(ValueError, match=r"patch at blocks.0.resid_post: this run needs positions 6..11 \(row 0\), "
                                         r"which the recording does not cover \(it covers positions 0..5\)"):
        run(model, hooks=hooks.patch(cache))
    with pytest.raises(TypeError, match=r"patch takes a zoo.hooks.collect"):
        hooks.patch({"blocks.0.resid_post": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"the recording has shape \(2, 6, 64\), this run \(3, 6, 64\)"):
        run(model, torch.zeros(3, 6, dtype=torch.long), hooks=hooks.patch(cache))


# ---- tensor parallelism ------------------------------------------------------------------------

def _tp_specs(dim, hidden, head_dim):
    g = torch.Generator().manual_seed(6)
    vector, neurons, z = torch.randn(dim, generator=g), torch.randn(hidden, generator=g), torch.randn(4, head_dim, generator=g)
    return {
        "ablate last head": {"blocks.*.z": hooks.ablate(heads=[-1])},
        "ablate last kv head, mean": {"blocks.0.v": hooks.ablate(heads=[-1], mode="mean")},
        "ablate neurons": {"blocks.0.mlp_post": hooks.ablate(neurons=[1, -2], mode="mean")},
        "add full-width neurons": {"blocks.1.mlp_post": hooks.add(neurons, positions=[2, 6])},
        "replace full-width z": {"blocks.0.z": hooks.replace(z, positions=[1])},
        "add resid": {"blocks.0.resid_post": hooks.add(vector)},
        "pattern mean": {"blocks.1.pattern": hooks.ablate(heads=[0, 3], mode="mean")},
    }


def _tp_hooks(rank, directory, want):
    model = zoo.load(directory, dtype=torch.float32)
    c = model.config
    cache = hooks.collect("blocks.1.resid_post", "blocks.0.z", "blocks.1.pattern", "blocks.0.mlp_post", gather=True)
    local = hooks.collect("blocks.0.z")
    seen = []
    with torch.no_grad():
        model(TOKENS, hooks=[cache, local, {"blocks.0.z": lambda x, ctx: seen.append(ctx.shard)}])
        assert seen == [(2, 2 * rank, 2 * rank + 2, 4)]  # 2 of the 4 heads on each rank
        for name in ("blocks.1.resid_post", "blocks.0.z", "blocks.1.pattern", "blocks.0.mlp_post"):
            assert (cache[name] - want["collect"][name]).abs().max() < 1e-5, name
        for name, spec in _tp_specs(c.dim, c.hidden_dim, c.head_dim).items():
            assert (model(TOKENS, hooks=spec) - want[name]).abs().max() < 1e-5, name
        other = torch.randint(0, 320, TOKENS.shape, generator=torch.Generator().manual_seed(9))
        for source in (cache, local):  # patching from gathered and from this rank's recordings
            assert (model(other, hooks=hooks.patch(source, "blocks.0.z")) - want["patch"]).abs().max() < 1e-5
        new = zoo.generate(model, PROMPTS, max_new_tokens=NEW, stop_ids=set(), hooks=_tp_specs(c.dim, c.hidden_dim, c.head_dim)["ablate neurons"])
        assert new == want["generate"]
        for bad in ([99], [-5]):
            with pytest.raises(IndexError) as e:
                model(TOKENS, hooks={"blocks.*.z": hooks.ablate(heads=bad)})
            assert str(e.value) == f"head {bad[0]} is out of range for blocks.0.z, which has 4 heads (valid: -4..3)"


@pytest.mark.parametrize("widths", [{}, dict(vocab_size=321, intermediate_size=171)], ids=["even", "padded"])
def test_hooks_under_tensor_parallelism(tmp_path, widths):
    """As one process; also with a vocabulary and MLP hidden units that 2 does not divide (the last rank's
    hidden units end in padding, which full-width values, neuron indices and gathers must step over)."""
    directory = save_hf(hf_llama("gqa", **widths), tmp_path)
    model = zoo.load(directory, dtype=torch.float32)
    c = model.config
    cache = hooks.collect("blocks.1.resid_post", "blocks.0.z", "blocks.1.pattern", "blocks.0.mlp_post")
    run(model, hooks=cache)
    want = {"collect": dict(cache.items())}
    for name, spec in _tp_specs(c.dim, c.hidden_dim, c.head_dim).items():
        want[name] = run(model, hooks=spec)
        assert (want[name] - run(model)).abs().max() > 1e-3, name
    other = torch.randint(0, 320, TOKENS.shape, generator=torch.Generator().manual_seed(9))
    want["patch"] = run(model, other, hooks=hooks.patch(cache, "blocks.0.z"))
    want["generate"] = zoo.generate(model, PROMPTS, max_new_tokens=NEW, stop_ids=set(),
                                    hooks=_tp_specs(c.dim, c.hidden_dim, c.head_dim)["ablate neurons"])
    spawn(_tp_hooks, 2, directory, want)

"""zoo.analysis's logit lens, residual decomposition and direct logit attribution, on every family: the lens's
rows against the final norm and unembedding written by hand, its last row the model's own prediction; the
components summing to the final residual (float64: to 1e-12; float32 and bfloat16: within the forward's own
rounding, the bound below), each head's part what ablating it removes; the attributions summing to the frozen-
scale logit difference by hand and to the model's logit difference; a left-padded row the row alone; world size 2
equal to one process."""
import pytest
import torch
import torch.nn.functional as F
from helpers import check_outcome, hf_family, hf_llama, save_hf, spawn_checks

import zoo
from zoo import hooks
from zoo.analysis import decompose, logit_attribution, logit_lens
from zoo.norm import RMSNorm

VARIANTS = {
    "llama-gqa": lambda: hf_llama("gqa"),
    "llama-bias-tied": lambda: hf_llama("head-dim-and-bias", tie_word_embeddings=True),
    "opt-pre-ln": lambda: hf_family("opt-pre-ln"),
    "opt-proj-no-final-norm": lambda: hf_family("opt-pre-ln", word_embed_proj_dim=32, _remove_final_layer_norm=True),
    "opt-post-ln-proj": lambda: hf_family("opt-post-ln-proj"),
    "neox-parallel": lambda: hf_family("neox-rotary-0.25-parallel"),
    "neox-sequential": lambda: hf_family("neox-rotary-1.0-sequential"),
    "gpt2": lambda: hf_family("gpt2"),
}
ADDITIVE = [v for v in VARIANTS if v != "opt-post-ln-proj"]  # post-LN OPT's residual is no sum: refused
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}  # unit roundoff: 2^-(significand bits)
TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
ANSWER, WRONG = [5, 17], [9, 9]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lens")
    return {name: save_hf(build(), root / name) for name, build in VARIANTS.items()}


def load(directory, dtype):
    model = zoo.load(directory, dtype=torch.float32)
    return model.to(dtype) if dtype == torch.float64 else zoo.load(directory, dtype=dtype)


def by_hand(model, h: torch.Tensor) -> torch.Tensor:
    """The final norm, project_out and unembedding applied to h in float64 from the model map's weights."""
    W, h = zoo.weights(model), h.double()
    w = W["ln_final.w"].double() if "ln_final.w" in W else None
    b = W["ln_final.b"].double() if "ln_final.b" in W else None
    if isinstance(model.norm, torch.nn.LayerNorm):
        h = F.layer_norm(h, h.shape[-1:], w, b, model.norm.eps)
    elif not isinstance(model.norm, torch.nn.Identity):  # RMSNorm
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.norm.eps) * w
    if "unembed.W_proj" in W:
        h = h @ W["unembed.W_proj"].double()
    return h @ W["unembed.W_U"].double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_lens_reads_each_residual_through_the_unembedding(dirs, variant, dtype):
    model = load(dirs[variant], DTYPES[dtype])
    lens = logit_lens(model, TOKENS, k=4)
    n = len(model.blocks)
    assert lens.names == [f"blocks.{i}.resid_pre" for i in range(n)] + [f"blocks.{n - 1}.resid_post"]
    assert lens.tokens.shape == lens.probs.shape == (n + 1, *TOKENS.shape, 4)
    with torch.no_grad():
        probs, ids = model(TOKENS).softmax(-1).topk(4, dim=-1)
    assert torch.equal(lens.tokens[-1], ids) and torch.allclose(lens.probs[-1], probs, atol=1e-6, rtol=0)
    if dtype != "bf16":  # the norm and unembedding by hand (in bf16 the model rounds where float64 does not)
        cache = hooks.collect(*lens.names)
        with torch.no_grad():
            model(TOKENS, hooks=cache)
        for r, name in enumerate(lens.names):
            want = by_hand(model, cache[name]).softmax(-1)
            assert torch.allclose(lens.probs[r].double(), want.gather(-1, lens.tokens[r]), atol=1e-6, rtol=0), name
            assert (lens.probs[r, ..., -1:].double() >= want.topk(4, dim=-1).values[..., -1:] - 1e-6).all(), name


def rounding_bound(model, tokens, dtype) -> torch.Tensor:
    """How far, elementwise, the components may sum from the final residual: each block's (at most) two additions
    round to the model's dtype, by at most its unit roundoff times what they sum (bounded by |resid_pre| +
    |attn_out| + |mlp_out|), and the heads' parts recomputed in float32 differ from the forward's attn_out by
    its rounding and by the accumulation over n_heads * d_head terms (|z| @ |W_O|) in the dtype they are
    computed in (float64 for a float64 model, else float32)."""
    cache = hooks.collect("blocks.*.resid_pre", "blocks.*.attn_out", "blocks.*.mlp_out", "blocks.*.z", gather=True)
    with torch.no_grad():
        model(tokens, hooks=cache)
    W, bound, c = zoo.weights(model), 0, model.config
    for i in range(len(model.blocks)):
        sums = sum(cache[f"blocks.{i}.{p}"].double().abs() for p in ("resid_pre", "attn_out", "mlp_out"))
        terms = torch.einsum("bshd,hdm->bsm", cache[f"blocks.{i}.z"].double().abs(),
                             W[f"blocks.{i}.attn.W_O"].double().abs())
        computed = UNIT[torch.float64 if dtype == torch.float64 else torch.float32]
        bound = bound + 2 * UNIT[dtype] * sums + computed * c.n_heads * c.head_dim * terms
    return bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ADDITIVE)
def test_the_components_sum_to_the_final_residual(dirs, variant, dtype):
    model = load(dirs[variant], DTYPES[dtype])
    parts = decompose(model, TOKENS)
    c, n = model.config, len(model.blocks)
    heads = [f"blocks.{i}.head.{h}" for i in range(n) for h in range(c.n_heads)]
    assert set(heads) <= set(parts.names) and parts.names[0] == "embed"
    assert ("pos_embed" in parts.names) == variant.startswith(("opt", "gpt2"))  # learned positions
    assert ("blocks.0.attn.b_O" in parts.names) == (variant != "llama-gqa")
    assert parts.parts.shape == (len(parts.names), *TOKENS.shape, c.dim)
    assert parts.parts.dtype == (torch.float64 if dtype == "fp64" else torch.float32)
    error = (parts.parts.sum(0) - parts.resid).abs()
    if dtype == "fp64":
        assert error.max() <= 1e-12 * parts.resid.abs().max()
    else:
        assert (error <= rounding_bound(model, TOKENS, DTYPES[dtype])).all()
    by_layer = decompose(model, TOKENS, heads=False)  # one part per attention layer: attn_out, rounded
    assert not set(heads) & set(by_layer.names)
    tol = {"fp64": 1e-12, "fp32": 1e-5, "bf16": 2 * UNIT[torch.bfloat16]}[dtype]
    for i in range(n):
        summed = sum(parts[f"blocks.{i}.head.{h}"] for h in range(c.n_heads))
        assert torch.allclose(summed, by_layer[f"blocks.{i}.attn"], atol=tol * summed.abs().max(), rtol=0)


@pytest.mark.parametrize("variant", ADDITIVE)
def test_a_heads_part_is_what_ablating_it_in_the_last_layer_removes(dirs, variant):
    """Nothing after the last layer's attention reads its heads but the MLP: with the MLP's input held at its
    recorded value, zero-ablating head h moves the final residual by exactly minus its part (float64)."""
    model = load(dirs[variant], torch.float64)
    parts, last = decompose(model, TOKENS), len(model.blocks) - 1
    kept = hooks.collect(f"blocks.{last}.mlp_in", f"blocks.{last}.resid_post")
    with torch.no_grad():
        model(TOKENS, hooks=kept)
    for h in (0, model.config.n_heads - 1):
        cache = hooks.collect(f"blocks.{last}.resid_post")
        with torch.no_grad():
            model(TOKENS, hooks=[{f"blocks.{last}.z": hooks.ablate(heads=[h]),
                                  f"blocks.{last}.mlp_in": hooks.replace(kept[f"blocks.{last}.mlp_in"])}, cache])
        moved = kept[f"blocks.{last}.resid_post"] - cache[f"blocks.{last}.resid_post"]
        assert (moved - parts[f"blocks.{last}.head.{h}"]).abs().max() <= 1e-12 * parts.resid.abs().max(), h


def frozen_by_hand(model, parts, attr) -> torch.Tensor:
    """The logit difference as the frozen-scale linear map of the summed components, in float64 by hand."""
    W, x = zoo.weights(model), parts.parts.sum(0)[:, attr.position].double()
    scale = attr.scale.double()[:, None]
    if isinstance(model.norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    h = x * scale * (W["ln_final.w"].double() if "ln_final.w" in W else 1)
    h = h + (W["ln_final.b"].double() if "ln_final.b" in W else 0)
    if "unembed.W_proj" in W:
        h = h @ W["unembed.W_proj"].double()
    U = W["unembed.W_U"].double()
    return (h * (U[:, attr.answer] - U[:, attr.wrong]).T).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ADDITIVE)
def test_the_attributions_sum_to_the_logit_difference(dirs, variant, dtype):
    """The shares sum to the frozen-scale map of the summed components (float64: 1e-12; else float32 rounding),
    and to the model's own logit difference within the decomposition's bound carried through the frozen map,
    the rounding of the final norm's output and of the logits (the model's dtype; zoo's RMSNorm takes its
    statistics in float32, so a float64 LLaMA's final norm is float32-precise)."""
    model = load(dirs[variant], DTYPES[dtype])
    attr = logit_attribution(model, TOKENS, ANSWER, WRONG, position=-1)
    parts = decompose(model, TOKENS)
    assert attr.names[:len(parts.names)] == parts.names and attr.shares.shape == (len(attr.names), 2)
    assert attr.position == TOKENS.shape[1] - 1 and torch.equal(attr.total, attr.shares.sum(0))
    frozen = frozen_by_hand(model, parts, attr)
    assert (attr.total.double() - frozen).abs().max() <= (1e-12 if dtype == "fp64" else 1e-5) * frozen.abs().max() + 1e-12
    W = zoo.weights(model)
    U = W["unembed.W_U"].double()
    direction = (U[:, attr.answer] - U[:, attr.wrong]).T  # (batch, E)
    direction_d = direction @ W["unembed.W_proj"].double().T if "unembed.W_proj" in W else direction
    gain = W["ln_final.w"].double().abs() if "ln_final.w" in W else 1
    carried = 2 * attr.scale.double() * (rounding_bound(model, TOKENS, DTYPES[dtype])[:, -1] * gain *
                                         direction_d.abs()).sum(-1)
    cache = hooks.collect("ln_final")
    with torch.no_grad():
        logits = model(TOKENS, hooks=cache)[:, -1].double()
    rows = torch.arange(2)
    u = UNIT[DTYPES[dtype]]
    norm = max(u, UNIT[torch.float32]) if isinstance(model.norm, RMSNorm) else u
    rounded = 2 * norm * (cache["ln_final"][:, -1].double().abs() * direction.abs()).sum(-1) + \
        u * (logits[rows, attr.answer].abs() + logits[rows, attr.wrong].abs())
    assert ((attr.total.double() - attr.logit_diff.double()).abs() <= carried + rounded + 1e-12).all()
    assert torch.allclose(attr.logit_diff.double(), logits[rows, attr.answer] - logits[rows, attr.wrong],
                          atol=1e-5 if dtype != "bf16" else 0.1, rtol=0)
    alone = logit_attribution(model, TOKENS, ANSWER)  # a logit, not a difference
    assert torch.allclose(alone.logit_diff.double(), logits[rows, attr.answer], atol=1e-5 if dtype != "bf16" else 0.1)


def test_post_ln_opt_is_refused_and_bad_arguments_are_named(dirs):
    model = load(dirs["opt-post-ln-proj"], torch.float32)
    with pytest.raises(ValueError, match="post-LN.*no sum of components"):
        decompose(model, TOKENS)
    model = load(dirs["llama-gqa"], torch.float32)
    with pytest.raises(ValueError, match=r"answer 320: token ids are 0..319"):
        logit_attribution(model, TOKENS, 320)
    with pytest.raises(ValueError, match=r"wrong \[1, 2, 3\]: a token id, or a list of 2"):
        logit_attribution(model, TOKENS, 1, [1, 2, 3])
    with pytest.raises(ValueError, match=r"position=12 is not accepted: an int in -12..11"):
        logit_attribution(model, TOKENS, 1, position=12)
    with pytest.raises(ValueError, match=r"k=0 is not accepted: an int in 1..320"):
        logit_lens(model, TOKENS, k=0)


@pytest.mark.parametrize("variant", ["llama-gqa", "opt-pre-ln"])
def test_a_left_padded_row_is_the_row_alone(dirs, variant):
    model = load(dirs[variant], torch.float32)
    short, pad = TOKENS[1:, 3:], torch.tensor([0, 3])
    batch = torch.cat([TOKENS[:1], F.pad(short, (3, 0))])
    lens, alone = logit_lens(model, batch, left_pad=pad), logit_lens(model, short)
    assert torch.equal(lens.tokens[:, 1, 3:], alone.tokens[:, 0])
    parts, alone = decompose(model, batch, left_pad=pad), decompose(model, short)
    assert torch.allclose(parts.parts[:, 1, 3:], alone.parts[:, 0], atol=1e-4, rtol=0)
    attr = logit_attribution(model, batch, ANSWER, WRONG, left_pad=pad)
    alone = logit_attribution(model, short, ANSWER[1], WRONG[1])
    assert torch.allclose(attr.shares[:, 1], alone.shares[:, 0], atol=1e-4, rtol=0)


# ---- world size 2 ---------------------------------------------------------------------------------
TP_VARIANTS = {"llama-gqa": lambda: hf_llama("gqa", vocab_size=321, intermediate_size=171),
               "opt-proj-no-final-norm": VARIANTS["opt-proj-no-final-norm"],
               "neox-parallel": lambda: hf_family("neox-rotary-0.25-parallel", vocab_size=321, intermediate_size=171)}


def results(directory, dtype):
    model = zoo.load(directory, dtype=dtype)
    lens, parts = logit_lens(model, TOKENS), decompose(model, TOKENS)
    attr = logit_attribution(model, TOKENS, ANSWER, WRONG)
    return {"lens tokens": lens.tokens, "lens probs": lens.probs, "names": parts.names, "parts": parts.parts,
            "resid": parts.resid, "shares": attr.shares, "total": attr.total, "logit_diff": attr.logit_diff}


def _check_equal_one_process(rank, dirs, want):
    """fp32: within 1e-5 of one process, the lens's tokens equal. bf16: TP rounds its partial sums where one
    process does not and the next layers carry that on (tests/test_parallel.py's _check_bf16), so TP's error
    against fp32 may be up to 2.5 times one process's, on average and at the worst (measured: at most 1.4 on
    average, 1.8 at the worst, over these keys); a wrong slice or head would be of the size of the values."""
    for (name, dtype), one in want.items():
        got = results(dirs[name], dtype)
        assert got["names"] == one["names"], name
        for key, value in one.items():
            if key == "names" or (key == "lens tokens" and dtype == torch.bfloat16):
                continue
            if dtype == torch.float32:
                assert (got[key] - value).abs().max() <= 1e-5 * max(1.0, value.abs().max()), (name, key)
                continue
            exact = want[name, torch.float32][key]
            ours, bf16_error = (got[key] - exact).abs(), (value - exact).abs()
            assert ours.mean() <= 2.5 * bf16_error.mean() and ours.max() <= 2.5 * bf16_error.max(), (name, key)


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    root = tmp_path_factory.mktemp("lens-tp")
    dirs = {name: save_hf(build(), root / name) for name, build in TP_VARIANTS.items()}
    want = {(name, dtype): results(d, dtype) for name, d in dirs.items() for dtype in (torch.float32, torch.bfloat16)}
    out = tmp_path_factory.mktemp("lens-world-2")
    spawn_checks({"lens-decompose-attribution-equal-one-process": (_check_equal_one_process, (dirs, want))}, 2, out)
    return out


def test_world_2_equals_one_process(world_2):
    check_outcome(world_2, "lens-decompose-attribution-equal-one-process", 2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["llama-gqa", "opt-pre-ln", "neox-parallel"])
def test_a_quantized_models_components_sum_to_its_final_residual(dirs, variant, dtype, scheme):
    """On a quantized model the heads' parts are z_h @ W_O[h] with W_O as the model map reads it (dequantized; int4
    on the CPU: after the forward, its layout's weight read back), and the parts sum to the final residual the
    quantized forward computed, within the float model's rounding bound (fp32: the quantized matmuls compute an
    fp32 x in fp32); in bf16 within twice the float bf16 model's own largest error, as the kernels round their own
    way."""
    model = zoo.load(dirs[variant], dtype=DTYPES[dtype], quant=scheme, group_size=32)
    parts = decompose(model, TOKENS)
    W, c = zoo.weights(model), model.config
    z = hooks.collect("blocks.1.z", gather=True)
    with torch.no_grad():
        model(TOKENS, hooks=z)
    for h in (0, c.n_heads - 1):
        want = z["blocks.1.z"][:, :, h].float() @ W["blocks.1.attn.W_O"][h].float()
        assert torch.allclose(parts[f"blocks.1.head.{h}"], want, atol=1e-5 * want.abs().max(), rtol=0), h
    error = (parts.parts.sum(0) - parts.resid).abs()
    if dtype == "fp32":
        assert (error <= rounding_bound(model, TOKENS, torch.float32)).all()
    else:
        plain = decompose(load(dirs[variant], torch.bfloat16), TOKENS)
        assert error.max() <= 2 * (plain.parts.sum(0) - plain.resid).abs().max()

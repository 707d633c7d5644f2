"""Attribution patching: (clean - corrupted) . grad as written by hand with torch.autograd, and on the bundled
model against real activation patching (patch_sweep): correlated, the same top units."""
import pytest
import torch
from helpers import hf_llama, save_hf

import zoo
from zoo import hooks
from zoo.analysis import attribute, patch_sweep

# A prompt pair on what the bundled model read (Python's help topics): "integer" -> "string" (the last token)
# moves its next-token guess from "." to "of". The residual stream differs only at the last position, so
# resid_pre's real effects live there; heads and MLPs differ at every layer.
CLEAN = "Raise an exception if the argument is not an integer"
CORRUPTED = "Raise an exception if the argument is not an string"


def test_attribution_is_the_first_order_term_by_hand(tmp_path):
    model = zoo.load(save_hf(hf_llama("gqa"), tmp_path), dtype=torch.float32)
    clean = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 5) % 320

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 8]).sum()

    got = attribute(model, clean, corrupted, metric, points=("resid_pre", "attn_out", "z", "mlp_post", "pattern"))
    names = [f"blocks.{i}.{p}" for i in range(2) for p in ("resid_pre", "attn_out", "z", "mlp_post", "pattern")]
    acts = hooks.collect(*names)
    with torch.no_grad():
        model(clean, hooks=acts)
    leaves = {}

    def leaf(x, ctx):  # each point a leaf of its own: the gradient wrt it, with everything after it
        leaves[ctx.name] = x.detach().requires_grad_()
        return leaves[ctx.name]
    for name in names:
        leaves.clear()
        value = metric(model(corrupted, hooks={name: leaf}))
        (g,) = torch.autograd.grad(value, leaves[name])
        terms = (acts[name] - leaves[name].detach()) * g
        layer, point = int(name.split(".")[1]), name.split(".")[2]
        if point in ("z", "pattern"):  # (b, s, h, d) and (b, h, q, k)
            want = terms.sum(dim=(0, 3)) if point == "z" else terms.sum(dim=(0, 3)).T
        else:
            want = terms.sum(dim=0) if point == "mlp_post" else terms.sum(dim=(0, 2))
        assert got[point][layer].shape == want.shape and (got[point][layer] - want).abs().max() < 1e-5, name
    assert got["resid_pre"][:, 0].abs().max() < 1e-6  # position 0 is the same token in both


def test_attribution_tracks_activation_patching_on_the_bundled_model(tiny_dir):
    """The README's figures: the correlation of the estimate with the real patch's effect over every layer and
    position (resid_pre, attn_out, mlp_out) and over every head (z at every position), and the top 5."""
    model = zoo.load(tiny_dir, dtype=torch.float32)
    clean, corrupted = (torch.tensor([model.tokenizer.encode(t, bos=True)]) for t in (CLEAN, CORRUPTED))
    good, bad = model.tokenizer.encode("x.")[-1], model.tokenizer.encode("x of")[-1]  # "." and "of" after a word
    with torch.no_grad():
        assert model(clean)[0, -1].argmax() == good and model(corrupted)[0, -1].argmax() == bad

    def metric(logits):
        return (logits[:, -1, good] - logits[:, -1, bad]).mean()
    with torch.no_grad():
        base = metric(model(corrupted)).item()
    est = attribute(model, clean, corrupted, metric, points=("resid_pre", "attn_out", "mlp_out", "z"))
    real = {p: patch_sweep(model, clean, corrupted, metric, point=p) - base for p in ("resid_pre", "attn_out", "mlp_out")}
    real["z"], est["z"] = patch_sweep(model, clean, corrupted, metric, by="head") - base, est["z"].sum(1)
    for point, floor in [("resid_pre", 0.95), ("attn_out", 0.95), ("mlp_out", 0.95), ("z", 0.95)]:
        r = torch.corrcoef(torch.stack([real[point].flatten(), est[point].flatten()]))[0, 1]
        k = min(5, int((real[point].abs() > 1e-4).sum()))  # units the patch moves at all (ties at 0 say nothing)
        top = [set(t.flatten().abs().topk(k).indices.tolist()) for t in (real[point], est[point])]
        assert r >= floor and len(top[0] & top[1]) >= k - 1, (point, r, k, top)
        # the estimate's largest unit is one of the real patch's largest: patching the whole residual at the one
        # changed position has the same effect in every layer up to where it is read, ties to fp32 rounding
        largest = real[point].flatten().abs()
        assert largest[est[point].flatten().abs().argmax()] >= largest.max() * (1 - 1e-5), point


def test_attribution_errors(tiny_dir):
    model = zoo.load(tiny_dir, dtype=torch.float32)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="points: 'logits' is not a point of every block"):
        attribute(model, tokens, tokens, lambda logits: logits.sum(), points="logits")
    with pytest.raises(ValueError, match="must have the same shape"):
        attribute(model, tokens, tokens[:, :3], lambda logits: logits.sum())

"""Gemma and Gemma 2 beyond tests/test_families.py's parametrized tests (which run both): their options against
Hugging Face's GemmaForCausalLM and Gemma2ForCausalLM, the numerics HF's bf16 has (the (1 + w) norm, the
embedding scale rounded to the dtype), Gemma 2's parts shown to be live, its hook points, its compiled decode."""
import json

import pytest
import torch
import transformers
from helpers import hf_family, save_hf
from test_families import FP32_TOL, matches_hf_prefill_steps_and_save
from test_families_window import greedy

import zoo
from zoo import hooks
from zoo.norm import OffsetRMSNorm

GEMMA2 = "gemma2-window-6-softcaps"


@pytest.mark.parametrize("variant, options", [
    ("gemma-gqa-head-dim-32", dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False)),
    (GEMMA2, dict(attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=32)),
    (GEMMA2, dict(layer_types=["full_attention", "sliding_attention"], hidden_activation="gelu", attention_bias=True)),
    (GEMMA2, dict(layer_types=["full_attention"] * 2, num_key_value_heads=4, tie_word_embeddings=False)),
])
def test_gemma_options_match_hf(variant, options, tmp_path):
    """Gemma with one kv head (Gemma 2B's MQA), biases and an untied output; Gemma 2 without soft-caps and with head_dim's own scale, with
    the windowed layer second and exact GELU, with no windowed layer: one forward, a prefill then cached steps
    (past the window), and the zoo.save round trip, as HF's."""
    matches_hf_prefill_steps_and_save(hf_family(variant, **options), tmp_path, seq=16, cut=9)


def test_gemma_legacy_gelu_means_tanh(tmp_path):
    """The published Gemma files say hidden_act "gelu"; transformers reads it as the tanh approximation."""
    hf = hf_family("gemma-gqa-head-dim-32")
    directory = save_hf(hf, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (zoo.load(directory, dtype=torch.float32)(tokens) - hf(tokens).logits).abs().max() < FP32_TOL
    assert transformers.AutoConfig.from_pretrained(directory).hidden_act == "gelu_pytorch_tanh"


def test_gemma2_soft_caps_post_norms_and_scale_are_live(tmp_path):
    """Each Gemma 2 option changes the logits (so the parity tests see it): the final cap bounds them, and
    zoo's logits with an option turned off are HF's with it off, not the same as with it on."""
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    base = zoo.load(save_hf(hf_family(GEMMA2), tmp_path / "base"), dtype=torch.float32)
    with torch.no_grad():
        logits = base(tokens)
        assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.5  # final_logit_softcapping 3
        for name, off in (("attn cap", dict(attn_logit_softcapping=None)), ("scale", dict(query_pre_attn_scalar=32)),
                          ("final cap", dict(final_logit_softcapping=None))):
            hf = hf_family(GEMMA2, **off)
            other = zoo.load(save_hf(hf, tmp_path / name), dtype=torch.float32)(tokens)
            assert (other - hf(tokens).logits).abs().max() < FP32_TOL, name
            assert (other - logits).abs().max() > 1e-2, name


def test_gemma2_post_norm_hook_points(tmp_path):
    """attn_out_normed and mlp_out_normed fire after attn_out and mlp_out, are what the residual stream adds,
    and replacing one changes the output; Gemma has neither."""
    model = zoo.load(save_hf(hf_family(GEMMA2), tmp_path / "g2"), dtype=torch.float32)
    names = hooks.names(model)
    assert names.index("blocks.0.attn_out") + 1 == names.index("blocks.0.attn_out_normed") == \
        names.index("blocks.0.resid_mid") - 1
    assert names.index("blocks.1.mlp_out") + 1 == names.index("blocks.1.mlp_out_normed") == \
        names.index("blocks.1.resid_post") - 1
    tokens = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(4))
    seen = hooks.collect("blocks.1.*")
    with torch.no_grad():
        plain = model(tokens, hooks=seen)
        zeroed = model(tokens, hooks={"blocks.0.mlp_out_normed": lambda x, ctx: torch.zeros_like(x)})
    assert torch.allclose(seen["blocks.1.resid_mid"], seen["blocks.1.resid_pre"] + seen["blocks.1.attn_out_normed"])
    assert torch.allclose(seen["blocks.1.resid_post"], seen["blocks.1.resid_mid"] + seen["blocks.1.mlp_out_normed"])
    assert not torch.allclose(seen["blocks.1.attn_out"], seen["blocks.1.attn_out_normed"])
    assert (zeroed - plain).abs().max() > 1e-2
    gemma = zoo.load(save_hf(hf_family("gemma-gqa-head-dim-32"), tmp_path / "g1"), dtype=torch.float32)
    assert not [n for n in hooks.names(gemma) if n.endswith("_normed")]


def test_bf16_norm_and_embedding_scale_are_hfs_bit_for_bit(tmp_path):
    """In bf16 the (1 + w) multiply is made in fp32 before the cast back, and the embeddings are scaled by
    sqrt(dim) rounded to bf16 (72: sqrt is 8.485..., 8.5 in bf16), both as HF's Gemma: the same bits."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 72, generator=g).to(torch.bfloat16)
    ours = OffsetRMSNorm(72, 1e-6).to(torch.bfloat16)
    theirs = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(72, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.normal_(0, 0.3, generator=g)
        theirs.weight.copy_(ours.weight)
        assert torch.equal(ours(x), theirs(x))
    hf = hf_family("gemma-gqa-head-dim-32", hidden_size=72)
    model = zoo.load(save_hf(hf, tmp_path), dtype=torch.bfloat16, device="cpu")
    tokens = torch.randint(0, 320, (2, 9), generator=g)
    seen = hooks.collect("embed")
    with torch.no_grad():
        model(tokens, hooks=seen)
        want = hf.to(torch.bfloat16).model.embed_tokens(tokens)
    assert torch.equal(seen["embed"], want)


def test_gemma2_compiled_decode_past_the_window(tmp_path):
    """zoo.compile's static cache and compiled decode step (the soft-capped scores written out, the windowed
    layer's mask over every slot) give the eager logits, 24 steps past a window of 6, left-padded."""
    hf = hf_family(GEMMA2)
    model = zoo.load(save_hf(hf, tmp_path), dtype=torch.float32)
    prompts = [list(range(3, 12)), [5, 6, 7]]
    with torch.no_grad():
        dynamic = greedy(model, model, prompts, 24, static=False)
        for row, prompt in enumerate(prompts):
            final = torch.tensor([prompt + dynamic[row, :-1].argmax(-1).tolist()])
            assert (dynamic[row] - hf(final).logits[0, len(prompt) - 1:]).abs().max() < FP32_TOL
    torch._dynamo.reset()
    zoo.compile(model)
    with torch.inference_mode():
        compiled = greedy(model, lambda t, **kw: (model.compiled.prefill if t.shape[1] > 1
                                                  else model.compiled.decode)(t, **kw), prompts, 24, static=True)
    assert (compiled - dynamic).abs().max() < 1e-5


@pytest.mark.parametrize("variant, options, refused", [
    (GEMMA2, dict(hidden_activation="relu"), "hidden_activation 'relu' is not supported by Gemma 2"),
    ("gemma-gqa-head-dim-32", dict(hidden_act="silu"), "hidden_act 'silu' is not supported by Gemma"),
    (GEMMA2, dict(use_bidirectional_attention=True), "use_bidirectional_attention true"),
    (GEMMA2, dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)), "rope scaling 'linear'"),
    (GEMMA2, dict(attn_logit_softcapping=0), "key 'attn_logit_softcapping'"),
    (GEMMA2, dict(layer_types=["sliding_attention"]), "layer_types .* 2 of full_attention"),
    (GEMMA2, dict(query_pre_attn_scalar="x"), "key 'query_pre_attn_scalar'"),
])
def test_gemma_options_zoo_cannot_run_are_refused(variant, options, refused, tmp_path):
    directory = save_hf(hf_family(variant), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **options}))
    with pytest.raises(zoo.CheckpointError, match=refused):
        zoo.load(directory)


def test_decompose_and_logit_attribution_on_gemma(tmp_path):
    """Gemma's residual stream is the sum of decompose's parts (the embedding scaled by sqrt(dim) among them), and
    logit_attribution's shares, through the (1 + w) final norm, sum to the logit difference; Gemma 2's post-norms
    make the stream no such sum: decompose says so; its logit lens reads through the final soft-cap."""
    from zoo.analysis.lens import decompose, logit_attribution, logit_lens
    tokens = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(6))
    model = zoo.load(save_hf(hf_family("gemma-gqa-head-dim-32"), tmp_path / "g1"), dtype=torch.float32)
    parts = decompose(model, tokens)
    assert (parts.parts.sum(0) - parts.resid).abs().max() < 1e-4
    attr = logit_attribution(model, tokens, answer=5, wrong=7)
    assert (attr.total - attr.logit_diff).abs().max() < 1e-3 * attr.logit_diff.abs().max()
    gemma2 = zoo.load(save_hf(hf_family(GEMMA2), tmp_path / "g2"), dtype=torch.float32)
    with pytest.raises(ValueError, match="Gemma 2 normalizes attention's and the MLP's outputs"):
        decompose(gemma2, tokens)
    lens = logit_lens(gemma2, tokens, k=3)  # its last row: the model's own probabilities, soft-capped logits
    with torch.no_grad():
        want = gemma2(tokens).softmax(-1).topk(3, dim=-1)
    assert torch.equal(lens.tokens[-1], want.indices) and (lens.probs[-1] - want.values).abs().max() < 1e-6

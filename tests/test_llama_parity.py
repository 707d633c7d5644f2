"""Logits and greedy generation of zoo's LLaMA against Hugging Face's LlamaForCausalLM on the same weights."""
import pytest
import torch
from helpers import LLAMA_VARIANTS, hf_llama, save_hf

import zoo

FP32_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(LLAMA_VARIANTS))
def pair(request, tmp_path_factory):
    """(variant, hf model, zoo model) with the same random weights, zoo's loaded from HF's files."""
    hf = hf_llama(request.param)
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, zoo.load(directory, dtype=torch.float32, device="cpu")


def test_logits_match_hf_fp32(pair):
    _, hf, model = pair
    tokens = torch.randint(0, hf.config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    assert got.shape == want.shape == (3, 50, hf.config.vocab_size)
    assert (got - want).abs().max().item() < FP32_TOL
    assert want.std() > 0.5  # the comparison is of meaningful, non-flat logits


def test_kv_cache_matches_full_forward(pair):
    """Prefill 20 tokens, then 2 chunks of 5 and 10 single tokens through the cache: same logits as one pass."""
    _, hf, model = pair
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(tokens).logits
        cache = model.new_cache(2, 40)
        pieces = [model(tokens[:, :20], cache=cache), model(tokens[:, 20:25], cache=cache),
                  model(tokens[:, 25:30], cache=cache)]
        pieces += [model(tokens[:, i : i + 1], cache=cache) for i in range(30, 40)]
    got = torch.cat(pieces, dim=1)
    assert (got - want).abs().max().item() < FP32_TOL


def test_greedy_generation_matches_hf(pair):
    """32 greedy tokens, with zoo's KV cache and without it (a full forward per token), equal HF's generate."""
    _, hf, model = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    got = zoo.generate(model, [prompt[0].tolist()], max_new_tokens=32, temperature=0.0, stop_ids=set())[0]
    tokens = prompt
    with torch.no_grad():
        for _ in range(32):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert len(want) == 32
    assert got == want
    assert tokens[0, 12:].tolist() == want


def test_left_padded_batch_matches_hf_attention_mask(pair):
    _, hf, model = pair
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, hf.config.vocab_size, (3, 16), generator=g)
    left_pad = torch.tensor([0, 5, 11])
    mask = (torch.arange(16)[None] >= left_pad[:, None]).long()
    with torch.no_grad():
        want = hf(tokens, attention_mask=mask).logits
        got = model(tokens, left_pad=left_pad)
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < FP32_TOL


def test_batch_of_different_lengths_equals_one_by_one(pair):
    _, hf, model = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9)]
    batched = zoo.generate(model, prompts, max_new_tokens=16, stop_ids=set())
    alone = [zoo.generate(model, [p], max_new_tokens=16, stop_ids=set())[0] for p in prompts]
    assert batched == alone
    assert all(len(x) == 16 for x in batched)


def test_bf16_close_to_fp32_as_hf_bf16_is(pair, tmp_path):
    """bf16 keeps 8 bits of mantissa, so bf16 logits of two correct implementations differ by rounding.

    The tolerance is HF's own: measured against the fp32 logits of the same weights, zoo's bf16
    error must be no larger than HF's bf16 error (mean within 10%, max within 25%). zoo rotates in
    fp32 like Meta where HF rotates in bf16; on these models both mean errors are about 0.018 for
    logits of std 1.2 (max about 0.15).
    """
    variant, hf, _ = pair
    directory = save_hf(hf, tmp_path / "w")
    model = zoo.load(directory, dtype=torch.bfloat16, device="cpu")
    hf16 = hf_llama(variant).to(torch.bfloat16)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exact = hf(tokens).logits
        ours = (model(tokens).float() - exact).abs()
        theirs = (hf16(tokens).logits.float() - exact).abs()
    assert model.embed.weight.dtype == torch.bfloat16
    assert ours.mean() <= 1.1 * theirs.mean()
    assert ours.max() <= 1.25 * theirs.max()
    assert ours.mean() < 0.03 * exact.std()


def test_rmsnorm_bf16_equals_hf_bit_for_bit():
    """RMSNorm casts the normalised fp32 values back to bf16 before the weight multiplies them, as HF's
    LlamaRMSNorm (and Meta's) do: the same bf16 bits, not merely close ones."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from zoo.norm import RMSNorm
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 9, 64, generator=g) * 3).to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(64, generator=g)).to(torch.bfloat16)
    ours, theirs = RMSNorm(64, eps=1e-5).to(torch.bfloat16), LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_bf16_decode_attention_equals_sdpa_in_fp32(kv_heads, padded):
    """A bf16 decode step on the CPU attends with kernels/attention.one_query_attention (SDPA's kernel is slow
    for one query there): the same as SDPA on the same bf16 values upcast to fp32, then rounded to bf16.
    Grouped heads (8 query heads on 8, 2 or 1 kv heads), with and without a left-padding mask."""
    from zoo.attention import Attention
    from zoo.cache import KVCache
    from zoo.forward import Step, positions_and_mask
    from zoo.rotary import apply_rotary, inv_frequencies, rope_angles
    g = torch.Generator().manual_seed(7)
    attn = Attention(64, 8, kv_heads, 8).to(torch.bfloat16)
    for p in attn.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.3).to(torch.bfloat16)
    left_pad = torch.tensor([0, 3, 9]) if padded else None
    cache = KVCache(1, 3, kv_heads, 8, 32, torch.bfloat16, torch.device("cpu"), left_pad)
    x = torch.randn(3, 13, 64, generator=g).to(torch.bfloat16)
    inv = inv_frequencies(8, 10000.0)
    seen = []
    for start, seq in ((0, 12), (12, 1)):  # a prefill, then one decode step
        tokens = torch.zeros(3, seq, dtype=torch.long)
        positions, mask = positions_and_mask(tokens, cache, None)
        step = Step(cache, None, lambda layer, point, x: x, positions, mask, rope_angles(inv, positions), seq, False)
        seen.append(attn(x[:, start : start + seq], step))
        cache.advance(seq)
    q = apply_rotary(attn.wq(x[:, 12:]).view(3, 1, 8, 8), *rope_angles(inv, positions), interleaved=True)
    q = q.transpose(1, 2)  # (batch, heads, 1, head_dim)
    k, v = cache.keys[0][:, :, :13].float(), cache.values[0][:, :, :13].float()
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, enable_gqa=kv_heads != 8)
    want = attn.wo(want.to(torch.bfloat16).transpose(1, 2).reshape(3, 1, 64))
    assert torch.equal(seen[1], want)
    assert seen[1].float().std() > 0.1


def test_bf16_decode_steps_close_to_fp32_as_hf_bf16_is(pair, tmp_path):
    """A bf16 decode on the CPU (one token at a time through the KV cache: native bf16_linear where the CPU
    has AVX512-BF16, and one_query_attention) errs from the fp32 logits no more than HF's bf16 forward
    of the same tokens does (mean within 10%, max within 25%, as test_bf16_close_to_fp32_as_hf_bf16_is)."""
    variant, hf, _ = pair
    model = zoo.load(save_hf(hf, tmp_path / "w"), dtype=torch.bfloat16, device="cpu")
    hf16 = hf_llama(variant).to(torch.bfloat16)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        exact = hf(tokens).logits[:, 8:]
        cache = model.new_cache(2, 24)
        model(tokens[:, :8], cache=cache)
        steps = torch.cat([model(tokens[:, i : i + 1], cache=cache) for i in range(8, 24)], dim=1)
        ours = (steps.float() - exact).abs()
        theirs = (hf16(tokens).logits[:, 8:].float() - exact).abs()
    assert ours.mean() <= 1.1 * theirs.mean()
    assert ours.max() <= 1.25 * theirs.max()
    assert exact.std() > 0.5

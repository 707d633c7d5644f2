"""Sampling and generation: greedy, temperature, top-k, top-p, seeds, stop tokens, streaming."""
import pytest
import torch
from helpers import hf_llama, save_hf

import zoo
from zoo.sampling import sample



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return zoo.load(save_hf(hf_llama("gqa"), tmp_path_factory.mktemp("m")), dtype=torch.float32)


PROMPT = [5, 17, 42, 99, 3]


def test_sample_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        counts = torch.bincount(sample(logits, temperature, generator=g), minlength=5) / 20000
        assert torch.allclose(counts, torch.softmax(logits[0] / temperature, -1), atol=0.015)
    counts = torch.bincount(sample(logits, 1.0, top_k=2, generator=g), minlength=5) / 20000
    assert torch.allclose(counts, torch.tensor([0.7311, 0.2689, 0, 0, 0]), atol=0.015)
    # top_p 0.8: the two most likely tokens hold 0.51+0.19=0.70 < 0.8, the third brings it over: keep three
    counts = torch.bincount(sample(logits, 1.0, top_p=0.8, generator=g), minlength=5) / 20000
    p = torch.softmax(logits[0], -1)[:3]
    assert torch.allclose(counts, torch.cat([p / p.sum(), torch.zeros(2)]), atol=0.015)


def test_greedy_is_argmax_and_top1_equals_greedy(model):
    greedy = zoo.generate(model, [PROMPT], max_new_tokens=20, stop_ids=set())[0]
    assert zoo.generate(model, [PROMPT], max_new_tokens=20, temperature=1.0, top_k=1, seed=3, stop_ids=set())[0] == greedy
    assert zoo.generate(model, [PROMPT], max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3, stop_ids=set())[0] == greedy
    with torch.no_grad():
        assert greedy[0] == model(torch.tensor([PROMPT]))[0, -1].argmax().item()


def test_seed_makes_sampling_reproducible(model):
    run = lambda seed: zoo.generate(model, [PROMPT, PROMPT], max_new_tokens=24, temperature=1.0, seed=seed,  # noqa: E731
                                    stop_ids=set())
    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # rows draw different samples


def test_stops_at_stop_token_per_row(model):
    greedy = zoo.generate(model, [PROMPT], max_new_tokens=24, stop_ids=set())[0]
    stop = greedy[6]
    first = greedy.index(stop)
    other = [7, 7, 7]
    other_greedy = zoo.generate(model, [other], max_new_tokens=24, stop_ids=set())[0]
    out = zoo.generate(model, [PROMPT, other], max_new_tokens=24, stop_ids={stop})
    assert out[0] == greedy[:first]
    cut = other_greedy.index(stop) if stop in other_greedy else len(other_greedy)
    assert out[1] == other_greedy[:cut]


def test_max_new_tokens_capped_by_context(tmp_path):
    model = zoo.load(save_hf(hf_llama("gqa"), tmp_path), dtype=torch.float32, max_seq_len=16)
    out = zoo.generate(model, [PROMPT], max_new_tokens=100, stop_ids=set())[0]
    assert len(out) == 16 - len(PROMPT)


def test_stream_pieces_join_to_decoded_generation(tiny_dir):
    model = zoo.load(tiny_dir, dtype=torch.float32)
    ids = model.tokenizer.encode("The for statement", bos=True)
    kwargs = dict(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=0, stop_ids=set())
    stats = {}
    pieces = list(zoo.stream(model, ids, stats=stats, **kwargs))
    new = zoo.generate(model, [ids], **kwargs)[0]
    assert len(pieces) > 5
    assert "".join(pieces) == model.tokenizer.decode(ids[-1:] + new)[len(model.tokenizer.decode(ids[-1:])):]
    assert stats["prefill_tokens"] == len(ids) and stats["decode_tokens"] == len(new) - 1
    assert stats["prefill_s"] > 0 and stats["decode_s"] > 0


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="at least one token"):
        zoo.generate(model, [[]], max_new_tokens=4)

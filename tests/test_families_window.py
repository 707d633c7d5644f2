"""Sliding-window attention (Mistral, Qwen's use_sliding_window) against Hugging Face's MistralForCausalLM and
Qwen2ForCausalLM: a query attends to the last `sliding_window` keys, itself included. At the window's edges, in
the plain forward, through the KV cache, in left-padded batches, in the static cache (eager and compiled), and in
zoo.Chat's cache reuse. The parametrized tests of tests/test_families.py run the windowed variants too."""
import json

import pytest
import torch
from helpers import hf_family, save_hf
from test_chat import turn
from test_families import FP32_TOL, matches_hf_prefill_steps_and_save

import zoo
from zoo import models

SEQ = 16


def padded_logits(model, hf, tokens, left_pad):
    """zoo's and HF's logits of a left-padded batch, at the real tokens only."""
    mask = (torch.arange(tokens.shape[1])[None] >= left_pad[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(tokens, attention_mask=mask, position_ids=positions).logits
        got = model(tokens, left_pad=left_pad)
    return got[mask.bool()], want[mask.bool()]


@pytest.mark.parametrize("window", [1, 2, 5, SEQ - 1, SEQ, SEQ + 1])
def test_window_edges_match_hf(window, tmp_path):
    """Windows of 1 key (itself only) to one past the sequence: one forward, a prefill then cached steps, a zoo.save
    round trip, and a left-padded batch, as HF's. The window is live: past it the logits differ from full
    attention's on the same weights, before it they are the same."""
    hf = hf_family("mistral-gqa-window-6", sliding_window=window)
    model = matches_hf_prefill_steps_and_save(hf, tmp_path, seq=SEQ, cut=9)
    tokens = torch.randint(3, 320, (3, SEQ), generator=torch.Generator().manual_seed(2))
    got, want = padded_logits(model, hf, tokens, torch.tensor([0, 4, 11]))
    assert (got - want).abs().max() < FP32_TOL
    full = zoo.load(save_hf(hf_family("mistral-gqa-window-6", sliding_window=None), tmp_path / "full"),
                    dtype=torch.float32)
    with torch.no_grad():
        differs = (model(tokens) - full(tokens)).abs().amax(dim=(0, 2))  # per position
    assert differs[:window].max() < 1e-5
    if window < SEQ:
        assert differs[window:].min() > 1e-3


def test_null_window_is_full_attention(tmp_path):
    model = zoo.load(save_hf(hf_family("mistral-gqa-window-6", sliding_window=None), tmp_path), dtype=torch.float32)
    assert all(block.attn.window is None for block in model.blocks)
    assert zoo.models.family_of(model) == "mistral"


@pytest.mark.parametrize("options", [dict(layer_types=["sliding_attention", "full_attention"]),
                                     dict(max_window_layers=0), dict(use_sliding_window=False)])
def test_qwen_window_layers_match_hf(options, tmp_path):
    """Qwen's windows on the layers layer_types names (or from max_window_layers on), none without
    use_sliding_window; zoo.save writes them back as HF reads them."""
    model = matches_hf_prefill_steps_and_save(hf_family("qwen2-gqa-tied-window-layer-1", **options), tmp_path,
                                              seq=SEQ, cut=9)
    windows = [block.attn.window for block in model.blocks]
    assert windows == {"layer_types": [6, None], "max_window_layers": [6, 6], "use_sliding_window": [None, None]}[
        next(iter(options))]


def greedy(model, forward, prompts, steps: int, static: bool):
    """Logits of the prefill's last position and of each of `steps` greedy decode steps, left-padded prompts."""
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, pad[row]:] = torch.tensor(p)
    cache = model.new_cache(len(prompts), 256 if static else longest + steps, left_pad=pad, static=static)
    out = [forward(tokens, cache=cache, last_only=True)]
    for _ in range(steps):
        out.append(forward(out[-1][:, -1:].argmax(-1), cache=cache))
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    hf = hf_family("mistral-gqa-window-6")
    return hf, zoo.load(save_hf(hf, tmp_path_factory.mktemp("mistral")), dtype=torch.float32)


def test_static_cache_and_compiled_decode_past_the_window(mistral):
    """zoo.compile's static cache (all its slots read through the mask) keeps the window: eager on a static
    cache, then the compiled prefill and decode step, 30 steps past a window of 6 in a left-padded batch, give
    the dynamic cache's logits; each row's are HF's one forward of its final sequence."""
    hf, model = mistral
    prompts = [list(range(3, 12)), [5, 6, 7]]
    with torch.no_grad():
        dynamic = greedy(model, model, prompts, 30, static=False)
        static = greedy(model, model, prompts, 30, static=True)
        assert (static - dynamic).abs().max() < 1e-5
        for row, prompt in enumerate(prompts):
            final = torch.tensor([prompt + dynamic[row, :-1].argmax(-1).tolist()])
            assert (dynamic[row] - hf(final).logits[0, len(prompt) - 1:]).abs().max() < FP32_TOL
    torch._dynamo.reset()
    zoo.compile(model)
    try:
        with torch.inference_mode():
            compiled = greedy(model, lambda t, **kw: (model.compiled.prefill if t.shape[1] > 1
                                                      else model.compiled.decode)(t, **kw), prompts, 30, static=True)
    finally:
        del model.compiled
    assert (compiled - dynamic).abs().max() < 1e-5
    assert torch.equal(compiled.argmax(-1), dynamic.argmax(-1))


def test_chat_cache_reuse_past_the_window(mistral, tmp_path, monkeypatch):
    """zoo.Chat keeps the cache from turn to turn, rewinds it where an edited dialogue changed, and copies it into
    a larger one as the dialogue grows: with a window of 6 keys, every step's logits are one forward's over the
    dialogue (no cache), and each reply is zoo.chat's from scratch. (A LLaMA 3 format, lent to Mistral here, on
    a byte-level tokenizer.json with its special tokens.)"""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as bpe
    hf, _ = mistral
    directory = save_hf(hf, tmp_path)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(bpe.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": specials[0], "eos_token": specials[1]}))
    monkeypatch.setitem(models.FAMILIES, "mistral", models.FAMILIES["mistral"]._replace(chat=("llama3",)))
    model = zoo.load(directory, dtype=torch.float32)
    chat = zoo.Chat(model, max_new_tokens=10)
    for k, text in enumerate(("Hello there.", "And then?", "Thanks.")):
        if k == 2:
            chat.messages[1]["content"] = "Something else entirely."  # the first reply: rewound to before it
        stats, ids, _ = turn(model, chat, text)  # (test_chat's: every step's logits one forward's, the reply zoo.chat's)
        assert len(ids) > 6 and (k == 0 or stats["cached_tokens"] > 6)  # a cache reused past the window


@pytest.mark.parametrize("variant, options, refused", [
    ("mistral-gqa-window-6", dict(sliding_window=0), "key 'sliding_window': 0 is not accepted"),
    ("mistral-gqa-window-6", dict(sliding_window="4096"), "key 'sliding_window'"),
    ("qwen2-gqa-tied-window-layer-1", dict(layer_types=["sliding_attention", "chunked_attention"]),
     "key 'layer_types'.*full_attention or sliding_attention"),
    ("qwen2-gqa-tied-window-layer-1", dict(layer_types=["sliding_attention"]), "layer_types .* 2 of full_attention"),
    ("qwen2-gqa-tied-window-layer-1", dict(max_window_layers=-1), "key 'max_window_layers'"),
])
def test_bad_window_settings_are_refused(variant, options, refused, tmp_path):
    directory = save_hf(hf_family(variant), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    if "max_window_layers" in options:
        config.pop("layer_types")
    (directory / "config.json").write_text(json.dumps({**config, **options}))
    with pytest.raises(zoo.CheckpointError, match=refused):
        zoo.load(directory)

"""Text generation: one prefill over the (left-padded) prompts, then one token per step from the KV cache.

    generate(model, [ids, ids2], max_new_tokens=32)  -> the new tokens of every prompt
    stream(model, ids)                                -> the new text, piece by piece, as it is made
    steps(model, prompts)                             -> the tokens of every row, step by step
"""
import time
from typing import Iterator

import torch

from zoo.checks import integer, is_int, is_number, require, shown, token_ids
from zoo.compile import compiled_for
from zoo.sampling import sample


def steps(model, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
          top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
          stop_ids: set[int] | None = None, hooks=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens, done) per step: the next token of every row (batch,) and which rows had already stopped.

    The first yield comes right after the prefill. Rows are left-padded to the longest prompt, so all
    rows write the KV cache at the same slot; padding is masked out and does not shift positions.
    `stop_ids` default to the tokenizer's (EOS; LLaMA 3 also <|eot_id|>). `hooks` are passed to
    every forward (the prefill is step 0; see zoo/hooks/).
    """
    prompts = checked_prompts(prompts, model.config.vocab_size)
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(f"a prompt of {longest} tokens does not fit the model's context of {context} "
                         f"(at least one position must be left to generate into)")
    stop_ids = checked_stop_ids(stop_ids, model)  # all checked on the call, before the first step is asked for
    return _steps(model, prompts, min(context, longest + max_new_tokens), temperature, top_k, top_p, seed, stop_ids,
                  hooks)


def left_padded(prompts: list[list[int]], device, multiple: int = 1,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, length) tokens, each row's padding (id 0, masked) before its tokens, and left_pad (batch,).

    length: the longest prompt's, rounded up to a multiple of `multiple` but not past `limit` (fewer
    shapes over many batches: zoo/activations.py says why)."""
    longest = max(len(p) for p in prompts)
    rounded = -(-longest // multiple) * multiple
    longest = max(longest, rounded if limit is None else min(rounded, limit))
    left_pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        tokens[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    return tokens, left_pad


@torch.inference_mode()
def _steps(model, prompts, total, temperature, top_k, top_p, seed, stop_ids, hooks, cache=None):
    """steps() after its checks: `total` is the length of the longest row at the end.

    `cache`: a cache to continue (zoo/chat.py: one unpadded row, the prompt written after its `pos`
    positions, room for `total` more; static if the model is compiled); None: a new one.
    """
    longest = max(len(p) for p in prompts)
    if total == longest:  # max_new_tokens=0
        return
    device = next(model.parameters()).device
    batch = len(prompts)

    tokens, left_pad = left_padded(prompts, device)
    compiled = compiled_for(model, hooks)  # None: eager
    prefill, decode = (compiled.prefill, compiled.decode) if compiled else (model, model)
    if cache is None:
        cache = model.new_cache(batch, compiled.cache_len(total, model.config.max_seq_len) if compiled else total,
                                left_pad=left_pad if left_pad.any() else None, static=compiled is not None)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    logits = prefill(tokens, cache=cache, hooks=hooks, last_only=True)[:, -1]  # (batch, vocab)
    for step in range(total - longest):
        next_tokens = sample(logits, temperature, top_k, top_p, generator)
        yield next_tokens, done.clone()
        done |= torch.isin(next_tokens, stop)
        if done.all() or step == total - longest - 1:
            return
        logits = decode(next_tokens[:, None], cache=cache, hooks=hooks)[:, -1]


def checked_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """prompts: a list of prompts, each a non-empty list of token ids."""
    accepted = "a list of prompts, each a list of token ids ([ids] for one prompt"
    require(isinstance(prompts, (list, tuple)) and len(prompts) > 0, "prompts", prompts,
            accepted + ("; tokens.tolist() for a tensor)" if isinstance(prompts, torch.Tensor) else ")"), TypeError)
    if all(is_int(p) for p in prompts):
        raise TypeError(f"prompts={shown(prompts)} is one prompt; pass a list of prompts: [ids]")
    out = [token_ids(f"prompts[{i}]", p, vocab_size) for i, p in enumerate(prompts)]
    for i, p in enumerate(out):
        require(len(p) > 0, f"prompts[{i}]", p, "at least one token (encode with bos=True)")
    return out


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed) -> None:
    """The sampling options: temperature 0 is greedy; top_k None or 0 and top_p None or 1.0 mean no cut-off."""
    integer("max_new_tokens", max_new_tokens, low=0)
    require(is_number(temperature) and temperature >= 0, "temperature", temperature,
            "a number >= 0 (0: greedy, the most likely token)")
    require(top_k is None or (is_int(top_k) and top_k >= 0), "top_k", top_k,
            "None or an int >= 0 (None or 0: no cut-off; k: sample among the k most likely tokens)")
    require(top_p is None or (is_number(top_p) and 0 < top_p <= 1), "top_p", top_p,
            "None or a number in (0, 1] (None or 1.0: no cut-off; p: the most likely tokens up to mass p)")
    require(seed is None or is_int(seed), "seed", seed, "None or an int")


def checked_stop_ids(stop_ids, model) -> set[int]:
    """stop_ids: a set (or list) of token ids; None: the tokenizer's (none without a tokenizer)."""
    if stop_ids is None:
        return set(model.tokenizer.stop_ids) if model.tokenizer is not None else set()
    require(isinstance(stop_ids, (set, frozenset, list, tuple)) and all(is_int(i) for i in stop_ids), "stop_ids",
            stop_ids, "None (the tokenizer's) or a set of token ids, such as {2}", TypeError)
    return set(stop_ids)


def generate(model, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: set[int] | None = None, hooks=None) -> list[list[int]]:
    """The new tokens of every prompt, ending before the first stop token (or after max_new_tokens)."""
    stop_ids = checked_stop_ids(stop_ids, model)
    chain = steps(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, hooks)  # checks the rest
    out = [[] for _ in prompts]
    for tokens, done in chain:
        for row, (t, d) in enumerate(zip(tokens.tolist(), done.tolist())):
            if not d and t not in stop_ids:
                out[row].append(t)
    return out


def stream(model, prompt: list[int], stats: dict | None = None, **kwargs) -> Iterator[str]:
    """The text of the new tokens of one prompt, yielded as soon as it is complete.

    Decoding is done on the whole new sequence behind the last prompt token (SentencePiece drops
    the leading space of a sequence's first piece) and held back while it ends in a partial
    UTF-8 character, so the pieces join up to exactly decode(new tokens). `kwargs` are those of
    `steps`. If `stats` is a dict, it receives prefill/decode token counts and seconds.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("stream decodes text and this model has no tokenizer; use zoo.generate for token ids")
    token_ids("prompt", prompt, model.config.vocab_size)
    stop_ids = checked_stop_ids(kwargs.pop("stop_ids", None), model)
    if stats is not None:
        stats.update(prefill_tokens=0, prefill_s=0.0, decode_tokens=0, decode_s=0.0)
    chain = steps(model, [prompt], stop_ids=stop_ids, **kwargs)  # checks the rest now
    return _pieces(tok, prompt, chain, stop_ids, stats)


def _pieces(tok, prompt: list[int], chain, stop_ids: set[int], stats: dict | None) -> Iterator[str]:
    """stream() after its checks: the text of the tokens `chain` yields."""
    anchor = prompt[-1:]
    base = tok.decode(anchor)
    new, sent = [], 0
    start = time.perf_counter()
    for tokens, _ in chain:
        t = tokens.item()
        if stats is not None:  # the first token comes out of the prefill, each later one out of a decode step
            now = time.perf_counter()
            if not new:
                stats.update(prefill_tokens=len(prompt), prefill_s=now - start, decode_tokens=0, decode_s=0.0)
            else:
                stats.update(decode_tokens=len(new), decode_s=now - start - stats["prefill_s"])
        if t in stop_ids:
            break
        new.append(t)
        text = tok.decode(anchor + new)[len(base):]
        if text.endswith("\ufffd"):
            continue
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)

"""Attention's arithmetic, softmax(q k^T / sqrt(head_dim) + mask) v, by the fastest exact path for each case.

    attend(q, k, v, mask, on_pattern=None, softcap=None)
        q (batch, heads, seq, head_dim); k, v (batch, kv_heads, keys, head_dim), kv_heads dividing heads
        (query head h reads kv head h // (heads / kv_heads)); mask (batch or 1, 1, seq, keys) bool, True
        where a query may attend, or None for plain causal attention -> (batch, heads, seq, head_dim)
        softcap: Gemma 2's scores capped as softcap * tanh(scores / softcap) before the mask

    | case                                              | path                     | why                           |
    | ------------------------------------------------- | ------------------------ | ----------------------------- |
    | the pattern is hooked (on_pattern given)          | attention_with_pattern   | the probabilities must exist  |
    | the scores are soft-capped (Gemma 2)              | attention_with_pattern   | SDPA has no cap               |
    | one query, being compiled (a compiled decode step)| attention_with_pattern   | inductor fuses it into loops  |
    | one query, eager, on the CPU, bf16 or fp16        | one_query_attention      | SDPA's CPU kernel is slow here|
    | anything else                                     | F.scaled_dot_product_attention |                         |

All paths compute in fp32 and give the same result (tests/test_llama_parity.py holds the decode path to
SDPA's bits in fp32); `benchmarks/matmul.py` and the README's Benchmarks have the timings.
"""
import math

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, on_pattern=None,
           softcap: float | None = None) -> torch.Tensor:
    if on_pattern is not None or softcap is not None:
        return attention_with_pattern(q, k, v, mask, on_pattern, softcap)
    one_query = q.shape[2] == 1
    if one_query and torch.compiler.is_compiling():
        return attention_with_pattern(q, k, v, mask)
    if one_query and q.device.type == "cpu" and q.dtype != torch.float32:
        return one_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


def one_query_attention(q, k, v, mask) -> torch.Tensor:
    """One new position per row (q (batch, heads, 1, head_dim)), written out in fp32 as SDPA computes it.

    The query heads that share a kv head are viewed as one (batch, kv_heads, group, head_dim) block,
    so the cache is read once, never repeated per query head.
    """
    batch, heads, _, head_dim = q.shape
    group = heads // k.shape[1]
    q = q.float().view(batch, k.shape[1], group, head_dim)  # head h is kv head h // group's member h % group
    scores = (q @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)  # (batch, kv_heads, group, keys)
    if mask is not None:  # (batch or 1, 1, 1, keys)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()  # (batch, kv_heads, group, head_dim)
    return out.view(batch, heads, 1, head_dim).to(v.dtype)


def attention_with_pattern(q, k, v, mask, on_pattern=None, softcap: float | None = None) -> torch.Tensor:
    """The same attention written out, so that the probabilities (batch, heads, seq, keys) exist and can be
    hooked: on_pattern(pattern) returns the pattern to use. softcap: the scores capped first (attend's)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (batch, heads, keys, head_dim)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (batch, heads, seq, keys)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None and q.shape[2] > 1:  # a prefill from slot 0: plain causal
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    pattern = torch.softmax(scores, dim=-1).to(q.dtype)
    pattern = pattern if on_pattern is None else on_pattern(pattern)
    return pattern @ v  # (batch, heads, seq, head_dim)

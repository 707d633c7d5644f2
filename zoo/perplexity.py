"""Perplexity of a model over a long text, with strided (sliding) windows.

    ids = model.tokenizer.encode(text, bos=True)
    result = zoo.perplexity.evaluate(model, ids, ctx=512, stride=256)
    result.ppl, result.interval(), result.mean, result.stderr, result.tokens

The usual evaluation of a fixed-length model (Hugging Face's "Perplexity of fixed-length models"):
windows of `ctx` tokens start every `stride` tokens, the last one ending at the end of the text, and
each token is scored once, by the first window that holds it with something before it. A window
scores only the tokens the previous one did not, so every token but the first is predicted from
at least ctx - stride tokens of context:

    tokens    0 1 2 3 4 5 6 7 8 9     ctx 4, stride 2
    window 0  [0 1 2 3]               scores 1 2 3  (token 0 has nothing before it)
    window 1      [2 3 4 5]           scores 4 5
    window 2          [4 5 6 7]       scores 6 7
    window 3              [6 7 8 9]   scores 8 9

With stride == ctx the windows do not overlap and the first token of each has no context: it is not
scored (as in that guide). A stride larger than ctx would skip tokens: refused.

The result keeps every scored token's negative log-likelihood (NLL, natural log), so that the
standard error of their mean, and of the mean difference between two models scored on the same
tokens, can be given. Neighbouring tokens are not independent: the standard error is the usual
rough guide, not an exact interval.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from zoo.checks import integer, require, token_ids


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over n tokens: (begin, end, first) for tokens[begin:end], scoring tokens first..end-1."""
    out, scored_to = [], 1  # tokens before scored_to are scored (token 0 never is)
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        first = max(scored_to, begin + 1)
        if first < end:  # (stride == ctx: a last window of one token scores nothing)
            out.append((begin, end, first))
        scored_to = end
        if end == n:
            break
    return out


@dataclass
class Result:
    """The NLL of every scored token, in the text's order, and how long scoring them took."""
    nll: torch.Tensor  # (tokens,) float64
    windows: int
    seconds: float

    @property
    def tokens(self) -> int:
        return self.nll.numel()

    @property
    def mean(self) -> float:
        """Mean NLL per token (nats): the cross-entropy."""
        return self.nll.mean().item()

    @property
    def stderr(self) -> float:
        """Standard error of the mean NLL: the NLLs' standard deviation / sqrt(tokens)."""
        return _stderr(self.nll)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """exp(mean -+ z * stderr): the perplexities at the ends of the mean NLL's interval (95% for z 1.96)."""
        return math.exp(self.mean - z * self.stderr), math.exp(self.mean + z * self.stderr)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.inf

    def difference(self, other: "Result") -> tuple[float, float]:
        """(mean, standard error) of other's NLL minus this one's, token by token (the same tokens scored)."""
        if other.tokens != self.tokens:
            raise ValueError(f"the results scored different tokens ({self.tokens} and {other.tokens}); "
                             f"compare results of the same ids, ctx and stride")
        diff = other.nll - self.nll
        return diff.mean().item(), _stderr(diff)


def _stderr(x: torch.Tensor) -> float:
    return (x.std() / math.sqrt(x.numel())).item() if x.numel() > 1 else math.nan


@torch.inference_mode()
def evaluate(model, ids, ctx: int | None = None, stride: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Result:
    """Score `ids` (a list of token ids, the text's whole) with windows of `ctx` tokens every `stride`.

    ctx: default the model's context (config.max_seq_len). stride: default ctx (no overlap).
    progress(scored, total) is called after each window.
    """
    context = model.config.max_seq_len
    ctx = context if ctx is None else integer("ctx", ctx, low=2)
    require(ctx <= context, "ctx", ctx, f"at most the model's context, {context} tokens")
    stride = ctx if stride is None else integer("stride", stride, low=1)
    require(stride <= ctx, "stride", stride, f"an int in 1..{ctx} (ctx): a stride beyond the window would skip "
                                             f"the tokens between windows")
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    ids = torch.tensor(token_ids("ids", ids, model.config.vocab_size), dtype=torch.long)
    require(len(ids) >= 2, "ids", ids, "at least 2 tokens (the first is never scored: nothing comes before it)")
    device = next(model.parameters()).device
    plan = windows(len(ids), ctx, stride)
    total = sum(end - first for _, end, first in plan)
    model(ids[None, :2].to(device))  # untimed: first-call costs (int4's CPU layout, lazy set-up) are not tokens/s
    parts, done, start = [], 0, time.perf_counter()
    for begin, end, first in plan:
        tokens = ids[begin:end].to(device)
        logits = model(tokens[None])[0]  # (end - begin, vocab) fp32; row i predicts token begin + i + 1
        scored = logits[first - 1 - begin:end - 1 - begin]  # the rows that predict tokens first..end-1
        parts.append(F.cross_entropy(scored, tokens[first - begin:], reduction="none").double().cpu())
        done += end - first
        if progress is not None:
            progress(done, total)
    return Result(torch.cat(parts), len(plan), time.perf_counter() - start)

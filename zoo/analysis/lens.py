"""The logit lens, the residual stream as a sum of its components, and direct logit attribution (TransformerLens's
accumulated_resid + logit lens, decompose_resid and logit_attrs), on zoo's hook points and model map.

    lens = logit_lens(model, tokens, k=5)     # lens.tokens[r, b, s], lens.probs[r, b, s]: top-k of row r (lens.names)
    parts = decompose(model, tokens)          # parts.parts (components, b, s, d_model) sum to parts.resid
    attr = logit_attribution(model, tokens, answer, wrong)   # attr.shares (components, b) sum to attr.total

The final residual stream (blocks.{n-1}.resid_post) of a pre-LN model is a sum: the embedding (OPT: the
token embedding through project_in, and the learned positions), then every block adds its attention output
(one term per head, z_h @ W_O[h], and the bias b_O) and its MLP output (mlp_out - b_out, and b_out), whether
the block adds them one after the other (LLaMA, OPT, sequential NeoX) or both to resid_pre (parallel NeoX).
A post-LN OPT normalizes each sum, so its residual stream is no such sum: decompose refuses it.

How exact. The components are computed from the recorded activations in float64 for a float64 model, else in
float32, and summed in that dtype; the forward added them in the model's dtype, rounding at each addition. So
in float64 they sum to the final residual to ~1e-12; in float32 and bfloat16 to within the forward's own
rounding (tests/test_lens.py states the bounds and measures them).

Direct logit attribution reads the logit (or logit difference) as a linear function of the final residual by
freezing the final norm's scale, as TransformerLens does: the norm's 1/sqrt(var + eps) (RMSNorm:
1/sqrt(mean x^2 + eps)) is taken from the whole residual at that position and applied to every component
alone (LayerNorm's centering, being linear, is applied to each exactly). With that scale the shares, plus the
constant terms (the final norm's bias, the unembedding's bias), sum to the model's logit difference up to the
rounding above. What is approximate is reading one share as what that component does: without it, the scale
would differ.
"""
from dataclasses import dataclass

import torch
from torch import nn

from zoo import hooks
from zoo.checks import integer
from zoo.norm import OffsetRMSNorm, RMSNorm
from zoo.weights import weights


@dataclass
class Lens:
    """logit_lens's result: row r (names[r]: blocks.{i}.resid_pre for each block, then the final
    blocks.{n-1}.resid_post) read through the final norm and the unembedding. tokens and probs are
    (rows, batch, seq, k): the k most likely next tokens at each position, most likely first, and their
    probabilities (softmax over the vocabulary, float32)."""
    names: list[str]
    tokens: torch.Tensor
    probs: torch.Tensor


@dataclass
class Decomposition:
    """decompose's result: parts (components, batch, seq, d_model), one per names[c], which sum to resid (the
    final residual stream, blocks.{n-1}.resid_post, as the forward computed it) up to rounding; in float64 for
    a float64 model, else float32."""
    names: list[str]
    parts: torch.Tensor
    resid: torch.Tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"no component {name!r}; the components are {', '.join(self.names[:6])}, ...")
        return self.parts[self.names.index(name)]


@dataclass
class Attribution:
    """logit_attribution's result at one position of each row: shares (components, batch), one per names[c]
    (decompose's components, then the constant terms ln_final.b and unembed.b_U where the model has them), which
    sum to `total` (batch); `logit_diff` (batch) is the model's own logit (difference) there, which `total`
    equals up to rounding. scale (batch): the final norm's frozen scale (1 without a final norm)."""
    names: list[str]
    shares: torch.Tensor
    total: torch.Tensor
    logit_diff: torch.Tensor
    scale: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor | None
    position: int

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"no component {name!r}; the components are {', '.join(self.names[:6])}, ...")
        return self.shares[self.names.index(name)]


def logit_lens(model: nn.Module, tokens: torch.Tensor, k: int = 5, left_pad: torch.Tensor | None = None) -> Lens:
    """Each block's resid_pre and the final residual through the model's own final norm and unembedding (in the
    model's dtype, so the last row is the model's own prediction): the top-k tokens and their probabilities."""
    n = len(model.blocks)
    integer("k", k, 1, model.config.vocab_size)
    names = [f"blocks.{i}.resid_pre" for i in range(n)] + [f"blocks.{n - 1}.resid_post"]
    cache = hooks.collect(*names)
    top_tokens, top_probs = [], []
    with torch.no_grad():
        model(tokens, hooks=cache, left_pad=left_pad)
        for name in names:  # one row at a time: (batch, seq, vocab) logits, never all rows'
            probs, ids = model.unembed(model.final_norm(cache[name])).float().softmax(-1).topk(k, dim=-1)
            top_tokens.append(ids)
            top_probs.append(probs)
    return Lens(names, torch.stack(top_tokens), torch.stack(top_probs))


def decompose(model: nn.Module, tokens: torch.Tensor, heads: bool = True,
              left_pad: torch.Tensor | None = None) -> Decomposition:
    """The final residual stream as a sum of components (the module docstring): embed (and pos_embed, OPT), then
    per block i: blocks.{i}.head.{h} for each head (heads=False: one blocks.{i}.attn for all), blocks.{i}.attn.b_O
    where attention has a bias, blocks.{i}.mlp and blocks.{i}.mlp.b_out where the MLP has one."""
    return _decompose(model, tokens, heads, left_pad)[0]


def _decompose(model: nn.Module, tokens: torch.Tensor, heads: bool, left_pad: torch.Tensor | None,
               also: tuple[str, ...] = ()) -> tuple[Decomposition, hooks.collect]:
    """decompose, and the collect of its forward (which records the points `also` too)."""
    if not getattr(model.config, "pre_norm", True):
        raise ValueError("decompose: this OPT is post-LN (do_layer_norm_before False): each block normalizes the "
                         "sum of its input and its output, so its residual stream is no sum of components")
    if any(getattr(b, "post_norms", False) for b in model.blocks):
        raise ValueError("decompose: Gemma 2 normalizes attention's and the MLP's outputs before adding them "
                         "(post-norms), so its residual stream is no sum of the heads' and neurons' outputs")
    n = len(model.blocks)
    points = ["embed", "blocks.*.attn_out", "blocks.*.mlp_out", f"blocks.{n - 1}.resid_post"]
    cache = hooks.collect(*points, *(["blocks.*.z"] if heads else []), *also, gather=True)
    W = weights(model)
    with torch.no_grad():
        model(tokens, hooks=cache, left_pad=left_pad)
        resid = cache[f"blocks.{n - 1}.resid_post"]
        dtype = torch.float64 if resid.dtype == torch.float64 else torch.float32
        names, parts = [], []

        def add(name: str, value: torch.Tensor) -> None:
            names.append(name)
            parts.append(value.to(dtype).expand(resid.shape))

        embed = cache["embed"].to(dtype)
        if _has(W, "pos_embed.W_pos"):  # OPT: the token part is what the learned positions leave of embed
            pos = W["pos_embed.W_pos"].to(dtype)[cache.positions("embed").clamp(min=0).to(resid.device)]
            add("embed", embed - pos)
            add("pos_embed", pos)
        else:
            add("embed", embed)
        for i in range(n):
            b_O, b_out = _get(W, f"blocks.{i}.attn.b_O"), _get(W, f"blocks.{i}.mlp.b_out")
            if heads:
                z, W_O = cache[f"blocks.{i}.z"].to(dtype), W[f"blocks.{i}.attn.W_O"].to(dtype)
                for h, part in enumerate(torch.einsum("bshd,hdm->hbsm", z, W_O)):  # head h: z_h @ W_O[h]
                    add(f"blocks.{i}.head.{h}", part)
            else:
                add(f"blocks.{i}.attn", _less(cache[f"blocks.{i}.attn_out"], b_O, dtype))
            if b_O is not None:
                add(f"blocks.{i}.attn.b_O", b_O)
            add(f"blocks.{i}.mlp", _less(cache[f"blocks.{i}.mlp_out"], b_out, dtype))
            if b_out is not None:
                add(f"blocks.{i}.mlp.b_out", b_out)
    return Decomposition(names, torch.stack(parts), resid.to(dtype)), cache


def _has(W, name: str) -> bool:
    return name in W.entries  # (a Mapping's `in` would read the tensor: under TP, a gather)


def _get(W, name: str) -> torch.Tensor | None:
    return W[name] if _has(W, name) else None


def _less(x: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x without its bias (in dtype): a layer's output is its weights' part plus the bias."""
    return x.to(dtype) if bias is None else x.to(dtype) - bias.to(dtype)


def logit_attribution(model: nn.Module, tokens: torch.Tensor, answer, wrong=None, position: int = -1,
                      heads: bool = True, left_pad: torch.Tensor | None = None) -> Attribution:
    """Each component's share of the logit of `answer` (minus that of `wrong`, when given) at `position` of each
    row (an index into tokens' sequence dim; -1, the last, by default), the final norm's scale frozen (the module
    docstring). answer and wrong: a token id for every row, or one per row."""
    batch, seq = tokens.shape if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else (1, 1)
    integer("position", position, -seq, seq - 1)  # an index into each row's tokens, negative from the end
    answer = _token_ids("answer", answer, batch, model.config.vocab_size)
    wrong = None if wrong is None else _token_ids("wrong", wrong, batch, model.config.vocab_size)
    parts, cache = _decompose(model, tokens, heads, left_pad, also=("ln_final",))
    dtype, W = parts.resid.dtype, weights(model)
    with torch.no_grad():
        W_U = W["unembed.W_U"]  # (E, vocab)
        direction = W_U[:, answer].to(dtype) - (0 if wrong is None else W_U[:, wrong].to(dtype))  # (E, batch)
        proj = _get(W, "unembed.W_proj")  # OPT's project_out, (d_model, E)
        direction_d = direction if proj is None else proj.to(dtype) @ direction  # (d_model, batch)
        x = parts.resid[:, position]  # (batch, d_model)
        center, scale = _frozen_norm(model.norm, x)
        gain = _get(W, "ln_final.w")
        gain = torch.ones((), dtype=dtype) if gain is None else gain.to(dtype)
        gain = 1 + gain if isinstance(model.norm, OffsetRMSNorm) else gain  # Gemma's norm scales by 1 + w
        c = parts.parts[:, :, position]  # (components, batch, d_model)
        c = c - c.mean(-1, keepdim=True) if center else c
        shares = scale * torch.einsum("nbd,db->nb", c * gain, direction_d)
        names = list(parts.names)
        if _has(W, "ln_final.b"):
            names.append("ln_final.b")
            shares = torch.cat([shares, (W["ln_final.b"].to(dtype) @ direction_d)[None]])
        if _has(W, "unembed.b_U"):
            b_U = W["unembed.b_U"].to(dtype)
            names.append("unembed.b_U")
            shares = torch.cat([shares, (b_U[answer] - (0 if wrong is None else b_U[wrong]))[None]])
        logits = model.output(cache["ln_final"][:, position]).to(dtype)  # the model's own, in its dtype
        rows = torch.arange(batch)
        diff = logits[rows, answer] - (0 if wrong is None else logits[rows, wrong])
    return Attribution(names, shares, shares.sum(0), diff, scale, answer, wrong, position % seq)


def _frozen_norm(norm: nn.Module, x: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """The final norm at x (batch, d_model) as a linear map: whether it centers, and its scale (batch,)."""
    if isinstance(norm, nn.Identity):
        return False, torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    if isinstance(norm, nn.LayerNorm):
        centered = x - x.mean(-1, keepdim=True)
        return True, torch.rsqrt(centered.pow(2).mean(-1) + norm.eps)
    if isinstance(norm, RMSNorm):
        return False, torch.rsqrt(x.pow(2).mean(-1) + norm.eps)
    raise TypeError(f"logit_attribution: no frozen form of the final norm {type(norm).__name__}")


def _token_ids(what: str, ids, batch: int, vocab: int) -> torch.Tensor:
    """A token id, or one per row, -> (batch,) int64, checked against the vocabulary."""
    t = torch.as_tensor(ids)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1 or (t.dim() == 1 and len(t) != batch):
        raise ValueError(f"{what} {ids!r}: a token id, or a list of {batch} (one per row)")
    if (t < 0).any() or (t >= vocab).any():
        raise ValueError(f"{what} {ids!r}: token ids are 0..{vocab - 1}")
    return t.to(torch.long).expand(batch).clone()


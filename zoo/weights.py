"""The model map: every weight by its role, per head, under one naming on every family (TransformerLens's
names, taker's map), as views of the model's own parameters.

    W = zoo.weights(model)
    W["blocks.3.attn.W_O"]                      # (n_heads, d_head, d_model): head h writes W_O[h]
    W["blocks.3.attn.W_O"][5] = 0               # an in-place edit reaches the model (a view)
    W["blocks.3.mlp.W_out"] = new               # so does an assignment (copied into the parameter)
    W["blocks.*.attn.W_Q"]                      # a glob: {name: tensor} of every match
    ov = W["blocks.3.attn.W_V"][5 // group] @ W["blocks.3.attn.W_O"][5]   # head 5's OV circuit (d_model, d_model)

Names and shapes (d_model, d_head, d_mlp, d_vocab, n_heads, n_kv_heads: `model.config`'s shared names):
  embed.W_E         (d_vocab, d_embed)            the token embedding (d_embed: d_model, or OPT's projection width)
  embed.W_proj      (d_embed, d_model)            OPT-350m's project_in (and unembed.W_proj, (d_model, d_embed))
  pos_embed.W_pos   (n_ctx, d_model)              learned positions (OPT), position 0 first
  unembed.W_U       (d_embed, d_vocab)            the output layer, as x @ W_U; tied: a view of W_E too
  unembed.b_U       (d_vocab,)                    where the output layer has a bias
  blocks.{i}.attn.W_Q (n_heads, d_model, d_head)  queries q_h = x @ W_Q[h] (+ b_Q[h]); W_K, W_V (n_kv_heads, ...):
                                                  query head h reads kv head h // (n_heads / n_kv_heads)
  blocks.{i}.attn.W_O (n_heads, d_head, d_model)  head h's output z_h @ W_O[h], summed over heads (+ b_O)
  blocks.{i}.attn.b_Q, b_K, b_V (heads, d_head), b_O (d_model,)      where the family has biases
  blocks.{i}.mlp.W_in, W_gate (d_model, d_mlp)    W_gate: gated MLPs (LLaMA's SwiGLU: act(x W_gate) * x W_in)
  blocks.{i}.mlp.W_out (d_mlp, d_model)           neuron j writes W_out[j]; b_in, b_gate, b_out where present
  blocks.{i}.ln1.w, .b / ln2.w, .b, ln_final.w, .b  the norms before attention, before the MLP, and final
                                                  (RMSNorm: no .b; OPT without affine norms: none)
The d_head basis of W_Q and W_K is the rotary pairing zoo computes in: LLaMA's (Meta's) pairs (2i, 2i+1),
GPT-NeoX's half split (i, i + rotary_dim/2). `half_split(t)` turns LLaMA's into Hugging Face's. The QK
and OV circuits (W_Q[h] @ W_K[g].T, W_V[g] @ W_O[h]) do not depend on the basis.

Every tensor is a view of a parameter, so edits in place and assignments reach the forward. One process
and floating-point layers only, for now: under tensor parallelism (parameters are shards) and for
quantized layers (no float weight to view) a read is refused with an error saying so.
"""
import difflib
import fnmatch
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from zoo import parallel
from zoo.quant import QuantLinear


def weights(model: nn.Module) -> "Weights":
    """The model map of `model` (any family: zoo/models/__init__.py's protocol)."""
    return Weights(model)


def half_split(t: torch.Tensor) -> torch.Tensor:
    """t (..., d_head) with rotary pairs (2i, 2i + 1) -> the same in Hugging Face's pairing (i, i + d_head/2)."""
    d = t.shape[-1]
    return t[..., torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])]


def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection into heads, weight (heads * d_head, d_model) -> (heads, d_model, d_head)."""
    return weight.view(heads, -1, weight.shape[1]).transpose(1, 2)


class Weights(Mapping):
    """role name -> tensor (a view of the model's parameter); see the module docstring."""

    def __init__(self, model: nn.Module):
        if parallel.world_size() > 1:
            raise NotImplementedError("zoo.weights: the model map under tensor parallelism (each rank holds shards) "
                                      "is not built yet; use it in one process")
        self.model = model
        self.views: dict[str, Callable[[], torch.Tensor]] = {}
        c = model.config
        self._add("embed.W_E", model.embed, "weight", lambda w: w)
        self._add("embed.W_proj", getattr(model, "project_in", None), "weight", lambda w: w.T)
        if hasattr(model, "pos_embed"):
            self._add("pos_embed.W_pos", model.pos_embed, "weight", lambda w: w[model.position_offset:])
        for i, block in enumerate(model.blocks):
            at, mlp = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
            for name, module, heads in (("Q", block.attn.wq, c.n_heads), ("K", block.attn.wk, c.n_kv_heads),
                                        ("V", block.attn.wv, c.n_kv_heads)):
                self._add(at + "W_" + name, module, "weight", lambda w, h=heads: _heads(w, h))
                self._add(at + "b_" + name, module, "bias", lambda b, h=heads: b.view(h, -1))
            self._add(at + "W_O", block.attn.wo, "weight", lambda w: w.view(w.shape[0], c.n_heads, -1).permute(1, 2, 0))
            self._add(at + "b_O", block.attn.wo, "bias", lambda b: b)
            for name in ("in", "gate", "out"):
                layer = getattr(block.mlp, "w_" + name, None)
                self._add(mlp + "W_" + name, layer, "weight", lambda w: w.T)
                self._add(mlp + "b_" + name, layer, "bias", lambda b: b)
            for name, norm in (("ln1", block.attn_norm), ("ln2", block.mlp_norm)):
                self._add(f"blocks.{i}.{name}.w", norm, "weight", lambda w: w)
                self._add(f"blocks.{i}.{name}.b", norm, "bias", lambda b: b)
        self._add("ln_final.w", model.norm, "weight", lambda w: w)
        self._add("ln_final.b", model.norm, "bias", lambda b: b)
        self._add("unembed.W_proj", getattr(model, "project_out", None), "weight", lambda w: w.T)
        self._add("unembed.W_U", model.output, "weight", lambda w: w.T)
        self._add("unembed.b_U", model.output, "bias", lambda b: b)

    def _add(self, name: str, module: nn.Module | None, param: str, layout: Callable) -> None:
        """name -> layout(module.param), where the module has that parameter (a quantized layer: refused on use)."""
        if module is None:
            return
        if param == "weight" and isinstance(module, QuantLinear):  # no float weight to view
            self.views[name] = lambda: self._quantized(name, module)
        elif isinstance(getattr(module, param, None), torch.Tensor):
            self.views[name] = lambda: layout(getattr(module, param))

    def _quantized(self, name: str, module: nn.Module):
        raise NotImplementedError(f"zoo.weights: {name} is a quantized layer ({type(module).__name__}); the model map "
                                  f"of quantized layers (dequantized reads, re-quantized writes) is not built yet: "
                                  f"read it from the floating-point model")

    def __getitem__(self, name: str):
        if any(ch in name for ch in "*?["):
            matched = fnmatch.filter(self.views, name)
            if not matched:
                raise KeyError(self._unknown(name))
            return {n: self.views[n]() for n in matched}
        if name not in self.views:
            raise KeyError(self._unknown(name))
        return self.views[name]()

    def __setitem__(self, name: str, value) -> None:
        """Copy `value` into the parameter behind `name` (the map's shape; cast to the parameter's dtype)."""
        target = self[name]
        if isinstance(target, dict):
            raise KeyError(f"zoo.weights: assign to one name, not to a glob ({name!r})")
        value = torch.as_tensor(value)
        if value.shape != target.shape:
            raise ValueError(f"zoo.weights: {name} has shape {tuple(target.shape)}; the value's is {tuple(value.shape)}")
        with torch.no_grad():
            target.copy_(value)

    def _unknown(self, name: str) -> str:
        near = difflib.get_close_matches(name, list(self.views), n=5, cutoff=0.6) or list(self.views)[:5]
        return f"zoo.weights: no weight {name!r}; nearest: {', '.join(near)} (see .keys())"

    def __iter__(self) -> Iterator[str]:
        return iter(self.views)

    def __len__(self) -> int:
        return len(self.views)

    def __repr__(self) -> str:
        return f"zoo.weights({type(self.model).__name__}: {len(self)} tensors)"

"""The model map: every weight by its role, per head, under one naming on every family (TransformerLens's
names, taker's map), as views of the model's own parameters, or copies that write edits back where no view
can be (tensor parallelism, quantized layers).

    W = zoo.weights(model)
    W["blocks.3.attn.W_O"]                      # (n_heads, d_head, d_model): head h writes W_O[h]
    W["blocks.3.attn.W_O"][5] = 0               # an in-place edit reaches the model (a view, or see below)
    W["blocks.3.mlp.W_out"] = new               # so does an assignment (copied into the model)
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
                                                  (RMSNorm: no .b; OPT without affine norms: none; Gemma's
                                                  norms scale by 1 + w)
  blocks.{i}.ln1_post.w, ln2_post.w (d_model,)    Gemma 2's norms after attention and after the MLP
  blocks.{i}.attn.q_norm.w, k_norm.w (d_head,)    Qwen3's norms of each head's q and k (in the d_head basis below)
The d_head basis of W_Q and W_K is the rotary pairing zoo computes in: LLaMA's (Meta's) pairs (2i, 2i+1),
GPT-NeoX's half split (i, i + rotary_dim/2). `half_split(t)` turns LLaMA's into Hugging Face's. The QK
and OV circuits (W_Q[h] @ W_K[g].T, W_V[g] @ W_O[h]) do not depend on the basis.

In one process the tensors of floating-point layers are views of the parameters: edits in place and
assignments (copied into the parameter) reach the forward. On an embedding tied to the output layer
(`tie_embeddings`: LLaMA's tied variants, OPT) W_E and W_U are one parameter, W_U = W_E.T: an edit of either
is an edit of both.

Under tensor parallelism, and for a quantized layer's weight, there is no one float tensor to view, so a read is
a copy: gathered from the ranks (`parallel.gather_split`, the padding past the model's own sizes cut, so the
shapes are the unsplit model's), or dequantized exactly as zoo/kernels/reference.py defines the format (fp32).
Such a copy is a `WriteThrough`: an edit of it in place (`W_O[5] = 0`, `.mul_`, `.copy_`, through any view of
it) is written back at once, as an assignment is: each rank copies its slice into its shard (`write_split`;
padding rows stay zero), and a quantized layer re-quantizes the rows that changed with its scheme and group
size (`QuantLinear.requantize`; other rows keep their codes), after which the copy holds what the forward
uses. The choice: make such edits work rather than refuse them, so code written for one process runs
unchanged. What a copy is not: a view of another read (re-read after an edit: a W_U read before an edit of a
tied W_E keeps its old values), nor seen through writes from outside torch (`.numpy()`). Under tensor
parallelism reads and writes are collectives: every rank makes the same ones, with the same values (a write
whose value differs between ranks is a ValueError on every rank). A quantized layer whose matmul reads the
weight in another form (int4 on the CPU) lets its stored weight go at its first forward: afterwards a read is
that layout's weight read back (`QuantLinear.dense_weight`, equal to the dequantization to fp32 rounding) and an
edit is an error saying so; edit it before the model runs, or set `keep_stored` first (zoo.prune does).
"""
import difflib
import fnmatch
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

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


class WriteThrough(torch.Tensor):
    """A copy of a model's weight (gathered, or dequantized) whose edits in place go back into the model: after a
    torch operation that changed it, or a view of it, in place, its whole is written back (`Weights._store`). Views
    of it are WriteThrough too; what an operation makes anew (`t @ u`, `t.clone()`, `plain()`) is a plain tensor."""

    @staticmethod
    def of(t: torch.Tensor, whole: torch.Tensor, store: Callable[[], None]) -> "WriteThrough":
        out = t.as_subclass(WriteThrough)
        out._whole, out._store = whole, store
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mine = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, WriteThrough)]
        with torch._C.DisableTorchFunctionSubclass():
            before = [a._version for a in mine]  # an in-place write bumps the version of the tensor written
            out = func(*args, **kwargs)
            changed = {id(a._whole): a for a, v in zip(mine, before) if a._version != v}
            wholes = {a._whole.untyped_storage().data_ptr(): a for a in mine}
            out = pytree.tree_map_only(torch.Tensor, lambda t: _as_view(t, wholes), out)
        for a in changed.values():  # each edited whole once
            a._store()
        return out

    def plain(self) -> torch.Tensor:
        """A plain tensor of the same values, no longer tied to the model (torch.save, copy.deepcopy give one)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).clone()

    def __reduce_ex__(self, protocol):
        return self.plain().__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return self.plain()


def _as_view(t: torch.Tensor, wholes: dict) -> torch.Tensor:
    """t, a WriteThrough where it shares the memory of a copy the operation read (a view of it), else plain."""
    if isinstance(t, WriteThrough) or t.layout != torch.strided:
        return t
    a = wholes.get(t.untyped_storage().data_ptr())
    return t if a is None else WriteThrough.of(t, a._whole, a._store)


def _quantized(module: nn.Module, param: str) -> bool:
    return param == "weight" and isinstance(module, QuantLinear)


def _split(module: nn.Module, param: str) -> tuple[int, int] | None:
    """The dim of the parameter tensor parallelism splits and its size in the unsplit model (a parallel layer's
    `split_dims` and `full_size`), or None (held whole, or one process)."""
    dim = getattr(module, "split_dims", {}).get(param) if parallel.world_size() > 1 else None
    return None if dim is None else (dim, module.full_size)


class Weights(Mapping):
    """role name -> tensor (a view of the model's parameter, or a WriteThrough copy); see the module docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.entries: dict[str, tuple[nn.Module, str, Callable]] = {}  # name -> (module, parameter, layout)
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
            for name in ("q", "k"):  # Qwen3's per-head norms of q and k
                self._add(f"{at}{name}_norm.w", getattr(block.attn, f"{name}_norm", None), "weight", lambda w: w)
            for name, norm in (("ln1", block.attn_norm), ("ln2", block.mlp_norm),
                               ("ln1_post", getattr(block, "attn_out_norm", None)),
                               ("ln2_post", getattr(block, "mlp_out_norm", None))):
                self._add(f"blocks.{i}.{name}.w", norm, "weight", lambda w: w)
                self._add(f"blocks.{i}.{name}.b", norm, "bias", lambda b: b)
        self._add("ln_final.w", model.norm, "weight", lambda w: w)
        self._add("ln_final.b", model.norm, "bias", lambda b: b)
        self._add("unembed.W_proj", getattr(model, "project_out", None), "weight", lambda w: w.T)
        self._add("unembed.W_U", model.output, "weight", lambda w: w.T)
        self._add("unembed.b_U", model.output, "bias", lambda b: b)

    def _add(self, name: str, module: nn.Module | None, param: str, layout: Callable) -> None:
        """name -> layout(module.param), a view of the whole tensor, where the module has that parameter."""
        if module is not None and (_quantized(module, param) or isinstance(getattr(module, param, None), torch.Tensor)):
            self.entries[name] = (module, param, layout)

    def _read(self, name: str) -> torch.Tensor:
        module, param, layout = self.entries[name]
        if parallel.world_size() == 1 and not _quantized(module, param):
            return layout(getattr(module, param))  # a view: edits reach the parameter
        whole = self._whole(name, module, param)
        return WriteThrough.of(layout(whole), whole, lambda: self._store(name, module, param, whole))

    def _whole(self, name: str, module: nn.Module, param: str) -> torch.Tensor:
        """A copy of the model's tensor behind `name`, whole: dequantized (fp32), gathered from the ranks."""
        if _quantized(module, param):  # the stored weight, else (let go) what the matmul's layout holds
            local = module.dequantize() if module.quantized is not None else module.dense_weight()
        else:
            local = getattr(module, param).detach()
        split = _split(module, param)
        return parallel.gather_split(local, *split) if split else local.clone()

    def _store(self, name: str, module: nn.Module, param: str, whole: torch.Tensor) -> None:
        """Write `whole` (an edited copy from `_whole`) back: each rank its slice, re-quantized where quantized."""
        if not parallel.same_on_every_rank(whole):
            raise ValueError(f"zoo.weights: {name} was given different values on different ranks; under tensor "
                             f"parallelism every rank reads and writes the map together, with the same values")
        split = _split(module, param)
        with torch.no_grad():
            try:
                local = module.dequantize() if _quantized(module, param) else getattr(module, param)
            except RuntimeError as e:  # a quantized layer that let its stored weight go
                raise RuntimeError(f"zoo.weights: {name}: {e}") from None
            if split:
                parallel.write_split(local, whole, split[0])
            else:
                local.copy_(whole)
            if _quantized(module, param):
                module.requantize(local)
                whole.copy_(self._whole(name, module, param))  # what the forward now uses

    def __getitem__(self, name: str):
        if any(ch in name for ch in "*?["):
            matched = fnmatch.filter(self.entries, name)
            if not matched:
                raise KeyError(self._unknown(name))
            return {n: self._read(n) for n in matched}
        if name not in self.entries:
            raise KeyError(self._unknown(name))
        return self._read(name)

    def __setitem__(self, name: str, value) -> None:
        """Copy `value` into the tensor behind `name` (the map's shape; cast to its dtype): a view's parameter, or a
        WriteThrough copy, which writes itself back (scattered to the ranks, re-quantized)."""
        target = self[name]
        if isinstance(target, dict):
            raise KeyError(f"zoo.weights: assign to one name, not to a glob ({name!r})")
        value = torch.as_tensor(value)
        if value.shape != target.shape:
            raise ValueError(f"zoo.weights: {name} has shape {tuple(target.shape)}; the value's is {tuple(value.shape)}")
        with torch.no_grad():
            target.copy_(value)

    def _unknown(self, name: str) -> str:
        near = difflib.get_close_matches(name, list(self.entries), n=5, cutoff=0.6) or list(self.entries)[:5]
        return f"zoo.weights: no weight {name!r}; nearest: {', '.join(near)} (see .keys())"

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"zoo.weights({type(self.model).__name__}: {len(self)} tensors)"

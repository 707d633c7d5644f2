"""Weight-only int8 / int4 quantization of the linear layers, for smaller and faster decoding.

    model = zoo.load("tiny-llama", quant="int8")                  # quantized layer by layer while loading
    model = zoo.load("tiny-llama", quant="int4", group_size=64)
    zoo.quant.quantize(model, "int4", group_size=128)              # or afterwards
    zoo.load("tiny-llama", quant="int4", refine=True)              # slower; less error (refine_int4)

Formats (zoo/kernels/reference.py holds the exact definitions):
  int8  symmetric, per output channel: w[n, k] = q[n, k] * scale[n], q in -127..127.
  int4  per group of `group_size` inputs (32, 64, 128 or 256), asymmetric by default:
        w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], q in 0..15, g = k // group_size, with
        scale = (max - min) / 15 and zero = -min / scale over the group (symmetric: zero = 8,
        scale = max|w| / 7). Two q per byte, column 2j in the low nibble.
The linear layers inside the blocks are quantized (attention wq/wk/wv/wo, the MLP's), and the
output layer unless it is tied to the embedding; the embedding, the norms and every bias stay in
floating point. Hooks sit outside the matmuls, so they see the same kind of activations as in the
unquantized model.

Widths. int8 takes a layer of any width. int4 takes a layer whose inputs K split into whole groups
(K % group_size == 0; under tensor parallelism the K of this rank's shard); any other layer stays
in floating point, and loading says which on one line of stderr (`plan`). The same rule holds
when quantizing at load, for `quantize`, in a saved checkpoint (such a layer is stored as
`L.weight`) and when a saved checkpoint is loaded under tensor parallelism (a stored int4 layer
whose groups would straddle two ranks is dequantized to floating point there: the same weights).

    zoo.quant.save(model, "llama-int4")                           # a quantized checkpoint...
    model = zoo.load("llama-int4")                                 # ...that loads as any other

A quantized checkpoint is one `model.safetensors` under zoo's own parameter names (a quantized
layer `L` stores `L.qweight` + `L.scales`, or `L.packed` + `L.scales` + `L.zeros`, and `L.bias`),
whose metadata records the format and its version, the scheme, the group size, the layout and the
model's config; the tokenizer files are copied beside it. Nothing is guessed from file names, and
kernel-specific layouts (torch's int4 CPU packing) are made on the first forward, never stored: on
the CPU that frees zoo's int4 copy (so the weight is held once), and a model that has run can no
longer be saved.

Under tensor parallelism each rank quantizes its own shard as it is read (an int4 group never
straddles two ranks: see Widths). A quantized checkpoint loads under tensor parallelism too, each
rank reading its slice of the stored tensors; saving is single-process. `save` never writes into
a checkpoint it could damage (`check_output`) and writes into a temporary directory beside the
output, renamed into place at the end: an interrupted save leaves no half-written checkpoint.
"""
import dataclasses
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

from zoo.checkpoint import release_freed_memory
from zoo.kernels import INT4_GROUP_SIZES, Int4Weight, Int8Weight, int4_linear, int8_linear, pack_int4
from zoo.parallel import (ColumnParallelLinear, RowParallelLinear, gather_from_parallel, rank, reduce_from_parallel,
                          scatter_to_parallel, world_size)

SCHEMES = ("int8", "int4")
FORMAT, VERSION = "zoo-quantized", "1"
LAYOUTS = {
    "int8": "L.qweight int8 [N, K], L.scales fp32 [N]: w = qweight * scales[:, None]",
    "int4": "L.packed uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high), L.scales and L.zeros "
            "fp32 [N, K/group_size]: w = (q - zeros) * scales, per group",
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "dict.txt", "gpt2-vocab.json", "gpt2-merges.txt")


WEIGHTS_AT_A_TIME = 1 << 20  # quantized at a time (whole rows): the fp32 temporaries stay a few 4 MB blocks


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w [N, K] -> int8 [N, K] and fp32 scales [N]: each row scaled so that its largest |w| maps to 127."""
    return Int8Weight(*_by_rows(w, _int8_rows))


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, refine: bool = False) -> Int4Weight:
    """w [N, K] -> packed uint8 [N, K/2] and fp32 scales, zeros [N, K/group_size] (min/max per group).

    refine (asymmetric only): then improve each group's scale and zero by alternating least squares
    (`refine_int4`): about 13% less squared weight error, at some seconds per billion weights.
    """
    k = w.shape[1]
    _check_group_size(group_size)
    if k % group_size:
        raise ValueError(f"K = {k} input features are not a multiple of the group size {group_size}")
    if refine and symmetric:
        raise ValueError("refine fits a scale and a zero per group: it applies to asymmetric int4 only")
    packed, scales, zeros = _by_rows(w, lambda rows: _int4_rows(rows, group_size, symmetric, refine))
    return Int4Weight(packed, scales, zeros, group_size)


def _check_group_size(group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of {INT4_GROUP_SIZES}")


def _int4_rows(w: torch.Tensor, group_size: int, symmetric: bool, refine: bool):
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)  # (N, groups, group_size)
    if symmetric:
        scales = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        zeros = -lo / scales
        if refine:
            scales, zeros = refine_int4(groups, scales, zeros)
    q = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales, zeros


def _by_rows(w: torch.Tensor, quantize_rows) -> list[torch.Tensor]:
    """quantize_rows over blocks of rows of w (every row is quantized on its own), the pieces joined:
    an output layer of 32000 x 2048 would otherwise make several 262 MB fp32 temporaries."""
    if w.shape[0] == 0:
        return list(quantize_rows(w))
    step, out = max(1, WEIGHTS_AT_A_TIME // max(1, w.shape[1])), None
    for a in range(0, w.shape[0], step):
        piece = quantize_rows(w[a : a + step])
        if out is None:  # the whole results, filled block by block
            out = [torch.empty((w.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device) for t in piece]
        for whole, t in zip(out, piece):
            whole[a : a + len(t)] = t
    return out


def refine_int4(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, iters: int = 8):
    """Better scales and zeros for groups [N, G, group_size] than min/max, with no calibration data.

    Alternates two exact steps, each of which can only lower the squared error sum((w - (q - z) s)^2):
    the codes q = clamp(round(w / s + z), 0, 15) for fixed s, z; then s, z for fixed q, a least-squares
    line w = s q - s z through the group's points. A group keeps its best (s, z) (constant groups
    have no line to fit). Converges in about 6 rounds.
    """
    def error(s, z):
        q = torch.round(groups / s[..., None] + z[..., None]).clamp(0, 15)
        return q, ((q - z[..., None]) * s[..., None] - groups).pow(2).sum(-1)

    q, best = error(scales, zeros)
    for _ in range(iters):
        q_mean, w_mean = q.mean(-1, keepdim=True), groups.mean(-1, keepdim=True)
        var = (q - q_mean).pow(2).mean(-1)
        slope = ((q - q_mean) * (groups - w_mean)).mean(-1) / var.clamp(min=1e-20)
        s = slope.clamp(min=1e-12)
        z = (q_mean.squeeze(-1) * s - w_mean.squeeze(-1)) / s  # intercept -s z = mean(w) - s mean(q)
        q_new, err = error(s, z)
        better = (err < best) & (var > 0)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
        best = torch.where(better, err, best)
        q = torch.where(better[..., None], q_new, q)
    return scales, zeros


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as int8 or int4; the matmul is zoo.kernels' (Triton on CUDA, torch's ops on CPU).

    Under tensor parallelism it stands in for a Column- or RowParallelLinear, holding this rank's
    shard (quantized on its own) and doing the same collectives (zoo/parallel/layers.py).
    """

    def __init__(self, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None = None, parallel: str | None = None,
                 gather_output: bool = False, input_is_parallel: bool = True):
        super().__init__()
        self.qweight = weight
        self.prepared = False  # laid out for its device on the first forward (see forward)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.matmul = int8_linear if isinstance(weight, Int8Weight) else int4_linear
        self.parallel, self.gather_output, self.input_is_parallel = parallel, gather_output, input_is_parallel
        self.split_dims = {"bias": 0} if parallel == "column" else {}  # for the loader, as the parallel layers'
        stored = weight.qweight if isinstance(weight, Int8Weight) else weight.packed
        self.out_features, self.in_features = stored.shape[0], (stored.shape[1] if isinstance(weight, Int8Weight)
                                                                  else 2 * stored.shape[1])

    @classmethod
    def replacing(cls, linear: nn.Module, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None) -> "QuantLinear":
        """The QuantLinear to put in `linear`'s place: the same tensor-parallel split and collectives."""
        if isinstance(linear, ColumnParallelLinear):
            return cls(weight, bias, "column", gather_output=linear.gather_output)
        if isinstance(linear, RowParallelLinear):
            return cls(weight, bias, "row", input_is_parallel=linear.input_is_parallel)
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepared:  # on CPU, int4 moves to torch's operator layout, and zoo's packed copy is freed
            self.qweight.prepare(drop_packed=True)
            self.prepared = True
            if getattr(self.qweight, "cpu", None) is not None:
                release_freed_memory()  # and so are the repacking's temporaries (glibc would keep them)
        if self.parallel == "row" and not self.input_is_parallel:
            x = scatter_to_parallel(x)
        y = self.matmul(x, self.qweight)
        if self.parallel == "row":
            y = reduce_from_parallel(y)  # partial sums over this rank's inputs
        if self.bias is not None:
            y = y + self.bias
        if self.parallel == "column" and self.gather_output:
            y = gather_from_parallel(y)
        return y

    def extra_repr(self) -> str:
        kind = "int8" if isinstance(self.qweight, Int8Weight) else f"int4, group {self.qweight.group_size}"
        split = f", {self.parallel}-parallel" if self.parallel else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}{split}"


LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


def quantize_linear(linear: nn.Module, scheme: str, group_size: int = 128, symmetric: bool = False,
                    name: str = "", refine: bool = False) -> QuantLinear:
    """A QuantLinear holding `linear`'s weight (this rank's shard under TP) quantized; errors name the layer."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if refine and scheme != "int4":
        raise ValueError(f"refine applies to int4 only, not {scheme}")
    try:
        weight = quantize_int8(linear.weight) if scheme == "int8" else \
            quantize_int4(linear.weight, group_size, symmetric, refine)
    except ValueError as e:
        raise ValueError(f"{name or 'linear layer'}: {e}") from None
    return QuantLinear.replacing(linear, weight, None if linear.bias is None else linear.bias.detach())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `name` ("blocks.3.attn.wq") is; nn.Module.set_submodule is missing from older torch."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def candidate_layers(model: nn.Module) -> list[str]:
    """The linear layers zoo quantizes when their width allows (`plan`): those inside the blocks, and
    the output layer unless it is tied to the embedding (read a row at a time, it stays in floating point)."""
    tied = getattr(model.config, "tie_embeddings", False)
    return [name for name, m in model.named_modules()
            if isinstance(m, LINEARS) and (name.startswith("blocks.") or (name == "output" and not tied))]


def int4_misfit(module: nn.Module, group_size: int) -> str | None:
    """Why int4 with this group size cannot take the linear layer's inputs, or None if it can.

    K must split into whole groups; under tensor parallelism it is this rank's K (a row-parallel
    layer's share), as a group may not straddle two ranks. Reads only shapes (meta tensors do)."""
    k = module.weight.shape[1]
    if k % group_size == 0:
        return None
    share = (f" per rank ({k * world_size()} over world size {world_size()})"
             if isinstance(module, RowParallelLinear) and world_size() > 1 else "")
    return f"K = {k}{share} inputs do not split into int4 groups of {group_size}"


def int4_misfits(model: nn.Module, group_size: int) -> dict[str, str]:
    """The candidate layers int4 leaves in floating point at this group size: name -> why (`int4_misfit`)."""
    reasons = {name: int4_misfit(model.get_submodule(name), group_size) for name in candidate_layers(model)}
    return {name: why for name, why in reasons.items() if why}


def plan(model: nn.Module, scheme: str, group_size: int = 128, announce: bool = True) -> list[str]:
    """The names of the linear layers to quantize, decided from shapes alone before any weight is read.

    int8 takes every candidate layer; int4 those whose inputs split into groups (`int4_misfit`), the
    others stay in floating point and, with `announce`, one line on stderr says which and why (rank 0
    only under tensor parallelism). A model where int4 fits no layer at all is an error, not a silent
    float model.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        _check_group_size(group_size)
    names = candidate_layers(model)
    misfits = int4_misfits(model, group_size) if scheme == "int4" else {}
    if names and len(misfits) == len(names):
        widths = sorted({model.get_submodule(n).weight.shape[1] for n in names})
        fitting = [g for g in INT4_GROUP_SIZES if any(k % g == 0 for k in widths)]
        raise ValueError(f"int4 with group size {group_size} fits none of the model's linear layers (inputs K = "
                         f"{', '.join(map(str, widths))}{' per rank' if world_size() > 1 else ''}): "
                         + (f"use group size {' or '.join(map(str, fitting))}, or int8" if fitting else "use int8"))
    if misfits and announce and rank() == 0:
        print(f"zoo: int4 group {group_size} leaves in floating point: {describe_layers(misfits, model)}",
              file=sys.stderr)
    return [name for name in names if name not in misfits]


def describe_layers(reasons: dict[str, str], model: nn.Module) -> str:
    """{layer name: reason} in one line, a layer of every block written once as blocks.*.<name>."""
    n_blocks = len(getattr(model, "blocks", ()))
    by_pattern: dict[str, list[str]] = {}
    for name in reasons:
        by_pattern.setdefault(re.sub(r"^blocks\.\d+\.", "blocks.*.", name), []).append(name)
    parts = []
    for pattern, names in by_pattern.items():
        if pattern.startswith("blocks.*.") and len(names) == n_blocks and len({reasons[n] for n in names}) == 1:
            parts.append(f"{pattern} ({reasons[names[0]]})")
        else:
            parts += [f"{name} ({reasons[name]})" for name in names]
    return "; ".join(parts)


def quantize(model: nn.Module, scheme: str, group_size: int = 128, symmetric: bool = False,
             refine: bool = False) -> nn.Module:
    """Replace the linear layers of the blocks (and the untied output) by QuantLinear, in place (`plan`)."""
    for name in plan(model, scheme, group_size):
        replace_module(model, name, quantize_linear(model.get_submodule(name), scheme, group_size, symmetric, name,
                                                    refine))
    return model


def check_output(directory: str | Path, source: str | Path | None = None, force: bool = False) -> Path:
    """The output directory of a quantized checkpoint, resolved; refuses one where writing could lose data.

    Refused, with a ValueError naming the path, whatever `force`: the source checkpoint directory, a
    directory inside it (a second checkpoint beside the first, which loading would not pick), one
    that contains it, a file. Refused unless `force`: a directory that already holds a checkpoint
    (it is then replaced whole). Always refused: a non-empty directory holding no checkpoint (it is
    not ours to replace). Reads nothing but directory listings.
    """
    out = Path(directory).expanduser().resolve()
    if source is not None:
        src = Path(source).expanduser().resolve()
        if out == src:
            raise ValueError(f"{out}: the output is the source checkpoint; write the quantized copy to a new directory")
        if src in out.parents:
            raise ValueError(f"{out}: the output lies inside the source checkpoint {src}; write it outside")
        if out in src.parents:
            raise ValueError(f"{out}: the output contains the source checkpoint {src}; write it elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; the output is a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not _holds_checkpoint(out):
        raise ValueError(f"{out}: not empty and holds no checkpoint ({', '.join(held[:5])}"
                         f"{', ...' if len(held) > 5 else ''}); choose a new or empty directory")
    if held and not force:
        raise ValueError(f"{out}: already holds a checkpoint ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                         f"choose a new directory, or pass --force (force=True) to replace it")
    return out


CHECKPOINT_FILES = ("*.safetensors", "*.pth", "*.pt", "*.bin", "params.json", "config.json")


def _holds_checkpoint(directory: Path) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in CHECKPOINT_FILES)


def save(model: nn.Module, directory: str | Path, force: bool = False) -> Path:
    """Write a quantized model loaded by zoo.load (see the module docstring); returns the directory.

    The directory is checked first (`check_output`: never the model's own checkpoint; an existing
    checkpoint only with force=True, replaced whole), written as a temporary sibling and renamed
    into place when complete. Layers that stayed in floating point are stored as `L.weight`."""
    if world_size() > 1:
        raise NotImplementedError("saving a quantized model under tensor parallelism is not supported")
    source = getattr(model, "checkpoint_dir", None)
    directory = check_output(directory, source, force)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers: zoo.quant.quantize(model, ...) or zoo.load(..., quant=...)")
    kinds = {"int8" if isinstance(m.qweight, Int8Weight) else ("int4", m.qweight.group_size) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(map(str, kinds))}: one scheme per checkpoint")
    kind = kinds.pop()
    scheme, group_size = (kind, 0) if kind == "int8" else kind
    tensors = {}
    for name, m in layers.items():
        w = m.qweight
        if scheme == "int4" and w.packed is None:
            raise ValueError(f"{name}: this int4 weight was repacked for torch's CPU kernel when the model first ran "
                             f"and zoo's format was freed: save before running the model (python -m zoo quantize)")
        stored = {"qweight": w.qweight, "scales": w.scales} if scheme == "int8" else \
            {"packed": w.packed, "scales": w.scales, "zeros": w.zeros}
        tensors.update({f"{name}.{k}": v for k, v in stored.items()})
    tensors.update({name: p for name, p in model.named_parameters()})  # floats, quantized layers' biases; tied once
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "extra"}
    tokenizer = getattr(model, "tokenizer", None)
    special = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None)}
    metadata = {"format": FORMAT, "version": VERSION, "scheme": scheme, "group_size": str(group_size),
                "layout": LAYOUTS[scheme], "model_type": model.model_type, "config": json.dumps(config),
                "tokenizer": json.dumps(special)}  # the ids a config.json would give (it is not copied)
    from safetensors.torch import save_file
    files = {file: Path(source) / file for file in TOKENIZER_FILES if source is not None}
    files.update(getattr(tokenizer, "files", {}))  # ones found elsewhere (gpt-neox's config names its own)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"  # renamed when complete
    partial.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial / "model.safetensors",
                  metadata=metadata)
        for name, path in files.items():
            if path.exists():
                shutil.copyfile(path, partial / name)
        _replace_directory(partial, directory)
    except BaseException:  # interrupted or failed: no half-written checkpoint stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def _replace_directory(new: Path, directory: Path) -> None:
    """Rename `new` to `directory`; an existing one (empty, or a checkpoint check_output let through) is
    moved aside first and removed only once `new` is in its place."""
    if directory.is_dir() and any(directory.iterdir()):
        old = directory.parent / f".{directory.name}.replaced-{uuid.uuid4().hex[:8]}"
        directory.rename(old)
        new.rename(directory)
        shutil.rmtree(old)
    else:
        os.replace(new, directory)  # onto an empty directory, or a new name


def stored_weight(name: str, scheme: str, group_size: int, read, split_dim: int | None = None) -> Int8Weight | Int4Weight:
    """The quantized weight of layer `name` from a quantized checkpoint; read(key, dim) gives a stored tensor,
    this rank's slice of it along `dim` under tensor parallelism (None: whole).

    split_dim is the float weight's (0: column-parallel, 1: row-parallel). Every stored tensor is
    [N, ...] so a column split cuts them all on dim 0; a row split cuts the inputs: int8's qweight
    on dim 1 (its per-row scales are whole), int4's packed bytes and its per-group scales and zeros
    on dim 1, which needs a whole number of groups per rank.
    """
    if scheme == "int8":
        return Int8Weight(read(f"{name}.qweight", split_dim), read(f"{name}.scales", 0 if split_dim == 0 else None))
    return Int4Weight(read(f"{name}.packed", split_dim), read(f"{name}.scales", split_dim),
                      read(f"{name}.zeros", split_dim), group_size)

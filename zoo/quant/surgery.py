"""Which linear layers of a model are quantized (`plan`), putting QuantLinear in their place, and which kernel
each kind of linear layer runs (`layer_paths`)."""
import re
import sys

import torch
from torch import nn

from zoo.formats.files import CheckpointError, Shard
from zoo.formats.lazy import Checkpoint, read_split
from zoo.kernels import dense_path, quantized_path
from zoo.parallel import ColumnParallelLinear, RowParallelLinear, rank, world_size
from zoo.quant import SCHEMES, scheme_named
from zoo.quant.linear import QuantLinear
from zoo.quant.scheme import Scheme


LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


def quantize_linear(linear: nn.Module, scheme: str, group_size: int = 128, symmetric: bool = False,
                    name: str = "", refine: bool = False) -> QuantLinear:
    """A QuantLinear holding `linear`'s weight (this rank's shard under TP) quantized; errors name the layer."""
    scheme = scheme_named(scheme)
    scheme.check(group_size, symmetric, refine)
    try:
        weight = scheme.quantize(linear.weight, group_size, symmetric, refine)
    except ValueError as e:
        raise ValueError(f"{name or 'linear layer'}: {e}") from None
    return QuantLinear.replacing(linear, scheme, weight, None if linear.bias is None else linear.bias.detach())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `name` ("blocks.3.attn.wq") is; nn.Module.set_submodule is missing from older torch."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def layer_paths(model: nn.Module, rows: int) -> dict[str, str]:
    """The kernel each kind of linear layer runs for x of `rows` rows (the batch for a decode step, batch x
    length for a prefill), by its name without "blocks.{i}.": {"attn.wq": "int4 cpu-native", "output": "dense
    cpu-native-bf16", ...} (zoo.kernels' quantized_path and dense_path; the first layer of each kind). A
    quantized layer that has not run yet makes its layout here, as its first forward would."""
    dtype, paths = model.embed.weight.dtype, {}
    for name, m in model.named_modules():
        kind = re.sub(r"^blocks\.\d+\.", "", name)
        if kind in paths or not isinstance(m, (QuantLinear, *LINEARS)):
            continue
        if isinstance(m, QuantLinear):
            if m.prepared is None:
                m.prepare(dtype)
            x = torch.empty(rows, m.in_features, dtype=dtype, device=m.prepared.device)
            paths[kind] = f"{m.scheme.name} {quantized_path(x, m.prepared)}"
        else:
            x = torch.empty(rows, m.weight.shape[1], dtype=dtype, device=m.weight.device)
            paths[kind] = f"dense {dense_path(x, m.weight)}"
    return paths


def candidate_layers(model: nn.Module) -> list[str]:
    """The linear layers zoo quantizes when their width allows (`plan`): those inside the blocks, and
    the output layer unless it is tied to the embedding (read a row at a time, it stays in floating point)."""
    tied = getattr(model.config, "tie_embeddings", False)
    return [name for name, m in model.named_modules()
            if isinstance(m, LINEARS) and (name.startswith("blocks.") or (name == "output" and not tied))]


def misfits(model: nn.Module, scheme: Scheme, group_size: int) -> dict[str, str]:
    """The candidate layers `scheme` leaves in floating point at this group size: name -> why (its `misfit`)."""
    reasons = {name: scheme.misfit(model.get_submodule(name), group_size) for name in candidate_layers(model)}
    return {name: why for name, why in reasons.items() if why}


def plan(model: nn.Module, scheme: str, group_size: int = 128, announce: bool = True) -> list[str]:
    """The names of the linear layers to quantize, decided from shapes alone before any weight is read.

    A scheme takes every candidate layer it fits (its `misfit`: int4's inputs must split into groups);
    the others stay in floating point and, with `announce`, one line on stderr says which and why (rank
    0 only under tensor parallelism). A model the scheme fits no layer of is an error, not a silent
    float model.
    """
    scheme = scheme_named(scheme)
    scheme.check(group_size)
    names = candidate_layers(model)
    left = misfits(model, scheme, group_size)
    if names and len(left) == len(names):
        widths = sorted({model.get_submodule(n).weight.shape[1] for n in names})
        fitting = [str(g) for g in scheme.group_sizes if len(misfits(model, scheme, g)) < len(names)]
        others = " or ".join(s.name for s in SCHEMES.values() if s is not scheme and not misfits(model, s, group_size))
        advice = ", or ".join(([f"group size {' or '.join(fitting)}"] if fitting else []) + ([others] if others else []))
        raise ValueError(f"{scheme.label(group_size, '{name} with group size {group_size}')} fits none of the "
                         f"model's linear layers (inputs K = {', '.join(map(str, widths))}"
                         f"{' per rank' if world_size() > 1 else ''})" + (f": use {advice}" if advice else ""))
    if left and announce and rank() == 0:
        print(f"zoo: {scheme.label(group_size)} leaves in floating point: {describe_layers(left, model)}",
              file=sys.stderr)
    return [name for name in names if name not in left]


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


class Dequantized:
    """A stored quantized weight as a lazy float tensor (whole groups, cut after dequantizing)."""

    def __init__(self, where: str, scheme: Scheme, weight):
        self.where, self.scheme, self.weight = where, scheme, weight
        self.shape, self.dtype = weight.shape, torch.float32  # the scheme's dequantize gives fp32

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.scheme.dequantize(self.weight)
        t = t if shard is None else t.chunk(shard.parts, shard.dim)[shard.index]
        return t.to(dtype or self.dtype).contiguous()


def place_layers(model: nn.Module, checkpoint: Checkpoint, device: torch.device) -> dict:
    """Put the stored quantized layers into `model` (built on the meta device), this rank's slice of each, and
    return the lazy tensors left for the loader to fill: the float parameters, and under TP a layer the
    scheme cannot split there (an int4 layer whose groups would straddle two ranks), dequantized (said
    once on stderr).

    A layer is quantized where the file stores it so; others (a tied output, an int4 layer whose inputs did
    not split into groups, the output of files older than its quantization) are stored as float L.weight.
    """
    path, tensors, meta = checkpoint.config_file, dict(checkpoint.tensors), checkpoint.quantized
    scheme = SCHEMES.get(meta.get("scheme"))
    try:
        group_size = int(meta.get("group_size", 0))
    except ValueError:
        group_size = None
    if scheme is None or group_size is None:
        raise CheckpointError(f"{path}: metadata names scheme {meta.get('scheme')!r} with group size "
                              f"{meta.get('group_size')!r}; supported: {', '.join(SCHEMES)}")
    world = world_size()

    def read(key: str, dim: int | None) -> torch.Tensor:  # this rank's slice along dim (None: whole)
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key!r}, which the {scheme.name} layout needs "
                                  f"({scheme.layout})")
        return (tensors[key].read() if dim is None else read_split(tensors[key], dim, rank(), world)).to(device)

    def stored(name: str, split_dim: int | None):
        try:
            return scheme.read(read, name, split_dim, group_size)
        except ValueError as e:  # tensors of other shapes or dtypes than the layout's
            raise CheckpointError(f"{path}: {name}: {e}") from None

    used, floating = set(), {}
    for name, module in list(model.named_modules()):
        parts = [f"{name}.{k}" for k in scheme.tensors]
        if not (isinstance(module, LINEARS) and parts[0] in tensors):
            continue
        why = scheme.misfit(module, group_size)
        if why:  # under TP, a layer this rank's share of cannot hold: its slice of the dequantized weight
            floating[name] = why
            tensors[f"{name}.weight"] = Dequantized(f"{path}: {parts[0]}", scheme, stored(name, None))
        else:
            weight = stored(name, getattr(module, "split_dims", {}).get("weight"))
            bias = torch.empty(module.weight.shape[0], device="meta") if module.bias is not None else None
            replace_module(model, name, QuantLinear.replacing(module, scheme, weight, bias))
        used.update(parts)
    if floating and rank() == 0:
        print(f"zoo: {path}: at world size {world} these {scheme.name} layers run in floating point (their "
              f"weights dequantized): {describe_layers(floating, model)}", file=sys.stderr)
    return {k: t for k, t in tensors.items() if k not in used}

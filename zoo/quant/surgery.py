"""Which linear layers of a model are quantized (`plan`), and putting QuantLinear in their place."""
import re
import sys

import torch
from torch import nn

from zoo.formats.files import CheckpointError
from zoo.formats.lazy import Checkpoint, read_split
from zoo.formats.quantized import LAYOUTS, Dequantized, stored_weight

from zoo.kernels import INT4_GROUP_SIZES
from zoo.parallel import ColumnParallelLinear, RowParallelLinear, rank, world_size
from zoo.quant.linear import QuantLinear
from zoo.quant.quantizers import SCHEMES, check_group_size, quantize_int4, quantize_int8


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
        check_group_size(group_size)
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


def place_layers(model: nn.Module, checkpoint: Checkpoint, device: torch.device) -> dict:
    """Put the stored quantized layers into `model` (built on the meta device), this rank's slice of each, and
    return the lazy tensors left for the loader to fill: the float parameters, and under TP an int4 layer
    whose groups would straddle two ranks, dequantized (said once on stderr).

    A layer is quantized where the file stores it so; others (a tied output, an int4 layer whose inputs did
    not split into groups, the output of files older than its quantization) are stored as float L.weight.
    """
    path, tensors = checkpoint.config_file, dict(checkpoint.tensors)
    scheme, group_size = checkpoint.quantized["scheme"], int(checkpoint.quantized.get("group_size", 0))
    world = world_size()

    def read(key: str, dim: int | None) -> torch.Tensor:  # this rank's slice along dim (None: whole)
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key!r}, which the {scheme} layout needs "
                                  f"({LAYOUTS[scheme]})")
        return (tensors[key].read() if dim is None else read_split(tensors[key], dim, rank(), world)).to(device)

    used, floating = set(), {}
    for name, module in list(model.named_modules()):
        parts = [f"{name}.{k}" for k in (("qweight", "scales") if scheme == "int8" else ("packed", "scales", "zeros"))]
        if not (isinstance(module, LINEARS) and parts[0] in tensors):
            continue
        why = int4_misfit(module, group_size) if scheme == "int4" else None
        if why:  # under TP, groups that would straddle two ranks: this rank's slice of the dequantized weight
            floating[name] = why
            tensors[f"{name}.weight"] = Dequantized(f"{path}: {name}.packed", stored_weight(name, scheme, group_size,
                                                                                            read))
        else:
            split_dim = getattr(module, "split_dims", {}).get("weight")
            weight = stored_weight(name, scheme, group_size, read, split_dim)
            bias = torch.empty(module.weight.shape[0], device="meta") if module.bias is not None else None
            replace_module(model, name, QuantLinear.replacing(module, weight, bias))
        used.update(parts)
    if floating and rank() == 0:
        print(f"zoo: {path}: at world size {world} these int4 layers run in floating point (their weights "
              f"dequantized): {describe_layers(floating, model)}", file=sys.stderr)
    return {k: t for k, t in tensors.items() if k not in used}

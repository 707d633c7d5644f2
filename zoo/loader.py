"""zoo.load: a checkpoint directory in, a model with its tokenizer out.

    checkpoint = formats.open(directory)   the format told from the files (zoo/formats/): the config, the
                                           tokenizer, every tensor as a lazy tensor under zoo's names
    model = build(...)                     on the meta device: no memory
    fill(model, checkpoint.tensors, ...)   each parameter read (this rank's slice, in the target dtype) and
                                           put in place, one at a time; with quant=, each linear layer is
                                           quantized as soon as its parameters are in

Peak memory stays near the size of the finished model.
"""
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from zoo import checks, formats, parallel
from zoo import quant as quantization
from zoo.formats import quantized
from zoo.formats.files import CheckpointError
from zoo.formats.lazy import Checkpoint, read_split
from zoo.memory import release_freed_memory
from zoo.models import FAMILIES


def find_checkpoint(ckpt: str | os.PathLike) -> Path:
    """A directory as given, else a bare name under ./checkpoints, zoo's own checkpoints/, $ZOO_CHECKPOINTS."""
    path = Path(ckpt)
    if path.is_dir():
        return path
    tried = [path]
    if not path.is_absolute() and len(path.parts) == 1:
        roots = [Path.cwd() / "checkpoints", Path(__file__).resolve().parent.parent / "checkpoints"]
        if os.environ.get("ZOO_CHECKPOINTS"):
            roots.append(Path(os.environ["ZOO_CHECKPOINTS"]))
        for root in roots:
            if (root / path).is_dir():
                return root / path
            tried.append(root / path)
    raise FileNotFoundError(f"checkpoint {str(ckpt)!r} not found; looked at: {', '.join(map(str, tried))}")


def load(ckpt: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
         max_seq_len: int | None = None, progress: bool | None = None, quant: str | None = None,
         group_size: int = 128, refine: bool = False) -> nn.Module:
    """Load a checkpoint directory (or a bare name, see `find_checkpoint`): Meta, Hugging Face, gpt-neox,
    metaseq or zoo-quantized.

    dtype: what the floating-point weights are cast to while loading. device: default CUDA if
    present, else CPU. max_seq_len: the longest sequence the model will be asked to hold
    (default: the checkpoint's context length). progress: a bar on stderr (default: when stderr
    is a terminal and the checkpoint is over 256 MB). quant: a scheme of zoo.quant.SCHEMES ("int8",
    "int4") quantizes each linear layer of the blocks, and the untied output layer, as soon as it is
    read (zoo/quant), never holding the whole model in `dtype`;
    group_size: the scheme's, where it has groups (int4: 32, 64, 128, 256); refine: fitted scales and
    zeros rather than min/max, where the scheme takes it (int4: zoo.quant.refine_int4: less error,
    slower to load). Parameters come back frozen
    (requires_grad=False): zoo is for inference; call `requires_grad_()` to train. `model.source` is
    the directory read (zoo.quant.save refuses to write over it or inside it).
    """
    dtype = checks.floating_dtype("dtype", dtype, quant=tuple(quantization.SCHEMES))
    device = checks.device("device", device)
    directory = find_checkpoint(ckpt)
    scheme = quantization.scheme_named(quant) if quant is not None else None
    if refine and not (scheme and scheme.refines):
        refining = " or ".join(f"quant={s.name!r}" for s in quantization.SCHEMES.values() if s.refines)
        raise ValueError(f"refine=True applies to {refining} only (quant={quant!r})")
    fmt = formats.format_of(directory)
    if fmt is quantized and quant is not None:
        raise ValueError(f"{directory} is already quantized; load it without quant=")
    checkpoint = fmt.open(directory)
    _set_context(checkpoint.config, max_seq_len)
    model = build(checkpoint.family, checkpoint.config, checkpoint.config_file, checkpoint.tokenizer)
    tensors = quantization.place_layers(model, checkpoint, device) if checkpoint.quantized else checkpoint.tensors
    finished = _quantizer(model, quant, group_size, refine) if quant is not None else None
    fill(model, tensors, checkpoint, directory, dtype, device, progress, finished)
    model.source = directory.resolve()  # where it came from: zoo.quant.save never writes over it
    return model.to(device).eval()


def build_empty(ckpt: str | os.PathLike) -> nn.Module:
    """The model a checkpoint describes, from its config alone (params.json, config.json, a YAML or a
    stored cfg, a zoo-quantized file's metadata): parameters on the meta device, no weights read (for
    counting parameters and bytes: `python -m zoo inspect`)."""
    family, cfg, config_file = formats.config(find_checkpoint(ckpt))
    return build(family, cfg, config_file)


def _set_context(cfg, max_seq_len: int | None) -> None:
    """zoo.load(max_seq_len=...): any length for rotary models, at most the learned positions for OPT."""
    if max_seq_len is None:
        return
    checks.integer("max_seq_len", max_seq_len, low=1)
    learned = getattr(cfg, "positions", None)
    if learned is not None and max_seq_len > learned:
        raise ValueError(f"max_seq_len={max_seq_len} is not accepted: this model learned {learned} positions; "
                         f"choose at most {learned}")
    cfg.max_seq_len = max_seq_len


class _NoInit(TorchFunctionMode):
    """While building on the meta device: nn.init's random initialisation does nothing (the weights are
    about to be read, and the first normal_ on a meta tensor costs a one-time import of about 1 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build(family: str, cfg, config_file: Path, tokenizer=None) -> nn.Module:
    """The family's model with parameters on the meta device (no memory), for `fill` to put real tensors in."""
    try:
        with torch.device("meta"), _NoInit():
            return FAMILIES[family].model(cfg, tokenizer)
    except ValueError as e:  # a config the model cannot be built from (at this world size)
        raise CheckpointError(f"{config_file}: {e}") from None


def _split(model: nn.Module, name: str) -> tuple[int, int] | None:
    """Which dimension of a parameter tensor parallelism splits, and its size in the checkpoint (a parallel
    layer's `split_dims` and `full_size`), if any."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    dim = getattr(module, "split_dims", {}).get(attr)
    return None if dim is None else (dim, module.full_size)


def full_shapes(model: nn.Module) -> dict[str, tuple]:
    """Every parameter's shape in the checkpoint: this rank's shape, but the full size on its split dim."""
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shape, split = list(p.shape), _split(model, name)
        if split is not None:
            shape[split[0]] = split[1]
        shapes[name] = tuple(shape)
    return shapes


def fill(model: nn.Module, tensors: dict, checkpoint: Checkpoint, directory: Path, dtype: torch.dtype,
         device: torch.device, progress: bool | None = None, finished: Callable[[str], None] | None = None) -> None:
    """Put every parameter in place from its lazy tensor, checking that none is missing, extra or misshapen.

    Parameters tied together (output and embedding) are one group: either name may provide it. A
    parallel layer's `split_dims` say which dimension of a parameter is split: only this rank's slice
    is read (lazy.read_split). `finished(module name)` is told of each
    module whose parameters are all in.
    """
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    full = full_shapes(model)
    for name, t in tensors.items():
        if name not in full:
            raise CheckpointError(f"{t.path}: unexpected tensor {t.key!r} (no such parameter in the "
                                  f"{type(model).__name__} model {checkpoint.config_file.name} describes)")
    if getattr(model.config, "tie_embeddings", False) and "output.weight" not in tensors and "embed.weight" in tensors:
        tensors = {**tensors, "output.weight": tensors["embed.weight"]}
    chosen = {}  # group's first name -> the name whose tensor fills it
    for names in groups.values():
        chosen[names[0]] = next((n for n in names if n in tensors), None)
        if chosen[names[0]] is None:
            raise CheckpointError(f"{directory}: missing tensor {checkpoint.where(names[0])!r} "
                                  f"(zoo's {names[0]}, shape {full[names[0]]})")
    bar = _Progress(directory, sum(math.prod(tensors[n].shape) for n in chosen.values()), progress)
    world, rank = parallel.world_size(), parallel.rank()
    for names in groups.values():
        t, want = tensors[chosen[names[0]]], full[names[0]]
        if tuple(t.shape) != want:
            raise CheckpointError((checkpoint.short and checkpoint.short(names[0], tuple(t.shape), want))
                                  or f"{t.where}: shape {tuple(t.shape)} does not match the config, which gives "
                                     f"{want} for zoo's {names[0]}")
        split = _split(model, names[0])  # the whole tensor is in the file; this rank reads a slice
        data = t.read(None, dtype) if split is None else read_split(t, split[0], rank, world, dtype)
        param = nn.Parameter(data.to(device), requires_grad=False)
        for name in names:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, param)
        if finished is not None:
            finished(names[0].rpartition(".")[0])
        bar.update(math.prod(t.shape))
    bar.close()
    release_freed_memory()


def _quantizer(model: nn.Module, scheme: str, group_size: int, refine: bool) -> Callable[[str], None]:
    """What `fill` tells of each finished module: a layer `quant.plan` chose (from shapes alone, before any
    weight is read) is quantized as soon as all its parameters are in."""
    chosen = set(quantization.plan(model, scheme, group_size))

    def finished(module_name: str) -> None:
        module = model.get_submodule(module_name)
        if module_name in chosen and not any(p.is_meta for p in module.parameters()):
            layer = quantization.quantize_linear(module, scheme, group_size, name=module_name, refine=refine)
            quantization.replace_module(model, module_name, layer)
            release_freed_memory()  # the layer's float weight and the quantizer's temporaries
    return finished


class _Progress:
    """`loading <dir>:  42% (1.3/3.1 G params)` on stderr, redrawn in place; silent when not a terminal."""

    def __init__(self, directory: Path, total: int, enabled: bool | None):
        self.total, self.done, self.label = total, 0, directory.name
        self.enabled = enabled if enabled is not None else (sys.stderr.isatty() and total > 128_000_000)

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            print(f"\rloading {self.label}: {100 * self.done // max(self.total, 1):3d}% "
                  f"({self.done / 1e9:.2f}/{self.total / 1e9:.2f} G params)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)

"""Reading tensors out of checkpoint files one at a time, with errors that name the file.

This is the file entry of zoo/formats/lazy.py's protocol: a `StoredTensor` is one tensor in one
file, read by `read(shard, dtype)`. Two file types: safetensors (read here directly from its documented layout, so that a tensor is
read with one `readinto` and a truncated file is caught before any read), and PyTorch's
zip-based `.pth`/`.bin` (opened with `torch.load(mmap=True, weights_only=True)`). Either way a
`StoredTensor` knows its shape and dtype up front and reads its data only when asked, so the
loader holds at most one source tensor beside the model it is filling.
"""
import collections
import ctypes
import json
import math
import mmap
import pickle
import struct
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from zoo.checks import CheckpointError, is_int, json_kind, shown
from zoo.memory import LIBC


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class Shard(NamedTuple):
    """What one tensor-parallel rank holds of a tensor: part `index` of `parts` equal parts along `dim`."""
    dim: int
    index: int
    parts: int


@dataclass
class StoredTensor:
    """One tensor in a file: shape and dtype known now, data read by `read()`."""
    path: Path
    key: str
    shape: tuple
    dtype: torch.dtype
    offset: int = 0  # safetensors: byte offset of the data in the file
    mapped: torch.Tensor | None = None  # .pth: the tensor as mmap'd by torch.load

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    @property
    def where(self) -> str:
        return f"{self.path}: {self.key}"

    def read(self, shard: Shard | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, or one shard of it, as a CPU tensor owning its memory.

        Floating-point data is converted to `dtype` (default: as stored) a chunk of rows at a time,
        so at most CHUNK bytes of the stored dtype sit beside the result. A slice along dim 0 reads
        only its own bytes; a slice along another dim reads blocks of whole rows and keeps its share.
        """
        dim, index, parts = shard or (None, 0, 1)
        if dim is not None and self.shape[dim] % parts:
            raise CheckpointError(f"{self.path}: {self.key!r} of shape {self.shape} does not split into "
                                  f"{parts} equal parts along dim {dim}")
        dtype = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        if self.mapped is not None:
            src = self.mapped if dim is None else self.mapped.chunk(parts, dim)[index]
            out = torch.empty(src.shape, dtype=dtype)
            if src.dim() == 0:
                out.copy_(src)
            else:  # chunk by chunk, giving back each chunk's file pages once copied
                step = _rows_per_chunk(src.shape, src.dtype)
                for a in range(0, len(src), step):
                    out[a : a + step].copy_(src[a : a + step])
                    if src.is_contiguous():
                        _drop_pages(src[a : a + step])
            _drop_pages(self.mapped)
            return out
        if dim not in (None, 0):  # a block of whole rows at a time, keeping this part's share of each row
            shape = list(self.shape)
            shape[dim] //= parts
            out, row, step = torch.empty(shape, dtype=dtype), math.prod(self.shape[1:]), _rows_per_chunk(self.shape,
                                                                                                         self.dtype)
            buf = torch.empty(min(step, self.shape[0]) * row, dtype=self.dtype)
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                for a in range(0, self.shape[0], step):
                    n = min(step, self.shape[0] - a)
                    self._read_exact(f, buf[: n * row].view(torch.uint8))
                    out[a : a + n].copy_(buf[: n * row].view(n, *self.shape[1:]).chunk(parts, dim)[index])
            return out
        shape = self.shape if dim is None else (self.shape[0] // parts, *self.shape[1:])
        out = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset + index * self.dtype.itemsize * math.prod(shape))
            if dtype == self.dtype or out.dim() == 0:  # straight into the result
                self._read_exact(f, out.reshape(-1).view(torch.uint8))
                return out
            step = _rows_per_chunk(shape, self.dtype)
            row = math.prod(shape[1:])
            buf = torch.empty(step * row, dtype=self.dtype)
            for a in range(0, shape[0], step):
                n = min(step, shape[0] - a)
                self._read_exact(f, buf[: n * row].view(torch.uint8))
                out[a : a + n].copy_(buf[: n * row].view(n, *shape[1:]))
        return out

    def _read_exact(self, f, into: torch.Tensor) -> None:
        if f.readinto(memoryview(into.numpy())) != into.numel():
            raise CheckpointError(f"{self.path}: truncated while reading {self.key!r}")


CHUNK = 64 << 20  # bytes of stored data converted at a time


def _rows_per_chunk(shape: tuple, dtype: torch.dtype) -> int:
    return max(1, CHUNK // max(1, dtype.itemsize * math.prod(shape[1:])))


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file (an 8-byte little-endian size, then a JSON object) and its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupt or truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        what = f"its __metadata__ is {json_kind(metadata)}" if metadata is not None else f"it is {json_kind(header)}"
        raise CheckpointError(f"{path}: corrupt safetensors header: {what}, not an object (of strings)")
    return header, n


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form `__metadata__` strings of a .safetensors file."""
    return _safetensors_header(path)[0].get("__metadata__", {})


def safetensors_tensors(path: Path) -> dict[str, StoredTensor]:
    """Index a .safetensors file: an 8-byte little-endian header size, a JSON header, then the data."""
    size = path.stat().st_size
    header, n = _safetensors_header(path)
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: tensor {key!r} is described by {json_kind(info)}, not an object with "
                                  f"dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {shown(info.get('dtype'))}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shown(shape)}: expected a list of sizes "
                                  f"(ints >= 0)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {shown(offsets)}: expected [start, end], "
                                  f"0 <= start <= end")
        start, end = offsets
        t = StoredTensor(path, key, tuple(shape), dtype, offset=8 + n + start)
        if end - start != t.nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - start} bytes for shape {t.shape} {dtype}")
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {8 + n + end}, "
                                  f"the file has {size}")
        out[key] = t
    return out


def pth_tensors(path: Path) -> dict[str, StoredTensor]:
    """Index a torch.save'd state dict (Meta's consolidated.NN.pth, HF's pytorch_model*.bin)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError...: name the file
        raise _unreadable(path, e) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return stored_tensors(path, state)


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    """One line: torch's reason (for weights_only's refusal, the unpickler's line, less its advice to allowlist)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
    return CheckpointError(f"{path}: cannot read as a PyTorch checkpoint (corrupt or truncated?): "
                           f"{reason.split(' Please use')[0]}")


def stored_tensors(path: Path, state: dict) -> dict[str, StoredTensor]:
    """StoredTensors for the tensors of a state dict (mmap'd by torch.load)."""
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
        out[key] = StoredTensor(path, key, tuple(t.shape), t.dtype, mapped=t)
    return out


def load_training_checkpoint(path: Path) -> object:
    """A checkpoint saved by training code (DeepSpeed, metaseq), mmap'd: tensors, containers and stand-ins.

    Such files pickle more than tensors: argparse.Namespace and omegaconf configs, numpy RNG
    states, optimizer classes. `torch.load(weights_only=True)` refuses them, and unpickling them
    for real would import (and run) whatever code they name. So they are read with an unpickler
    that rebuilds tensors and plain containers and turns every other class into an inert
    `StandIn` holding the arguments and state it was given (see `plain`): nothing is imported.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        if not (isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e)):
            raise _unreadable(path, e) from None
    try:  # it names classes weights_only refuses
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_stand_in_pickle)
    except Exception as e:
        raise _unreadable(path, e) from None


class StandIn(dict):
    """What an unpickled object of a class we do not import becomes: its constructor arguments in
    `args`, its pickled state in `state`, dict items as items, list items in `self["__items__"]`."""
    args: tuple = ()
    state: object = None

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.setdefault("__items__", []).append(item)

    def extend(self, items):
        self.setdefault("__items__", []).extend(items)


def plain(obj: object) -> object:
    """Stand-ins of config objects (argparse.Namespace, omegaconf DictConfig and its value nodes, enums)
    turned into plain dicts and values, recursively."""
    if isinstance(obj, StandIn):
        state = obj.state
        if isinstance(state, tuple):  # (__dict__, slots): both halves
            state = {k: v for half in state if isinstance(half, dict) for k, v in half.items()}
        state = state if isinstance(state, dict) else {}
        if "_content" in state:  # omegaconf DictConfig / ListConfig
            return plain(state["_content"])
        if "_val" in state:  # omegaconf value node
            return plain(state["_val"])
        if not state and not obj and len(obj.args) == 1:  # an enum member: Enum(value)
            return plain(obj.args[0])
        return {k: plain(v) for k, v in {**state, **obj}.items() if not str(k).startswith("_")}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _call_only(fn):
    """fn behind a new function object, so that a pickle's BUILD can only change the wrapper, never torch's fn."""
    return lambda *args, **kwargs: fn(*args, **kwargs)


class _StandInUnpickler(pickle.Unpickler):
    """Tensors rebuilt by torch's functions (reached through wrappers), containers as they are, dtypes
    from torch's namespace without importing anything; every other global becomes a StandIn class."""
    REBUILD = {("torch._utils", name): _call_only(getattr(torch._utils, name))
               for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")}
    TYPES = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size}  # C types:
    # their attributes cannot be set
    DTYPES = {("torch", name): t for name, t in vars(torch).items() if isinstance(t, torch.dtype)}

    def find_class(self, module, name):  # torch's wrapper answers for the storage types before asking us
        key = (module, name)
        found = self.REBUILD.get(key) or self.TYPES.get(key) or self.DTYPES.get(key)
        return found if found is not None else type(name, (StandIn,), {"__module__": f"stand_in.{module}"})


_stand_in_pickle = types.SimpleNamespace(__name__="zoo_stand_in_pickle", Unpickler=_StandInUnpickler,
                                         load=lambda f, **kwargs: _StandInUnpickler(f, **kwargs).load())


def open_tensors(path: Path) -> dict[str, StoredTensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    return safetensors_tensors(path) if path.suffix == ".safetensors" else pth_tensors(path)


# ---- giving back the pages of an mmap'd file ----------------------------------------------------
# Pages of a file that torch.load mapped count in our RSS once touched. After copying a tensor out
# we tell the kernel we no longer need them (MADV_DONTNEED: on a private, unwritten file mapping
# the pages are simply re-read from disk if touched again), so RSS stays at the model's size.
_MADV_DONTNEED = 4


def _drop_pages(t: torch.Tensor) -> None:
    if LIBC is None or t.numel() == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)

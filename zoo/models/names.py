"""Hugging Face tensor names <-> zoo's, two ways. `PartNames` renames each dotted part of a key (LLaMA's, Gemma's:
"model.layers.3.self_attn.q_proj.weight" <-> "blocks.3.attn.wq.weight"). `Names` is for a family whose keys are
a prefix, a layer list and module tables (OPT, GPT-NeoX, GPT-2). GPT-2's, for example:

    NAMES = Names(prefix="transformer.", layers="h", top={"wte": "embed", "lm_head": "output", ...},
                  layer={"ln_1": "attn_norm", ...}, fused={"attn.c_attn": ("attn.wq", "attn.wk", "attn.wv")},
                  unprefixed=("lm_head",), ignored=r"^h\\.\\d+\\.attn\\.(bias|masked_bias)$")
    NAMES.to_zoo("transformer.h.3.attn.c_attn.weight")  # ["blocks.3.attn.wq.weight", ...wk..., ...wv...]
    NAMES.to_hf("blocks.3.attn.wk.weight")              # "transformer.h.3.attn.c_attn.weight"

A key is read with any leading part of `prefix` or none ("model.decoder.", "decoder." or nothing for OPT),
and written with all of it, except the top modules in `unprefixed` (an untied output layer, outside the
base model). `ignored` matches (re.search) the keys without their prefix that hold no weight: buffers
older files saved. A module in no table keeps its name.
"""
import re


class Names:
    def __init__(self, prefix: str, layers: str, top: dict[str, str], layer: dict[str, str],
                 fused: dict[str, tuple[str, ...]] | None = None, unprefixed: tuple[str, ...] = (),
                 ignored: str | None = None):
        self.prefix, self.layers, self.top, self.layer = prefix, layers, top, layer
        self.fused, self.unprefixed = fused or {}, unprefixed
        self.ignored = re.compile(ignored) if ignored else None
        self._top_hf = {v: k for k, v in top.items()}
        self._layer_hf = {v: k for k, v in layer.items()} | {part: k for k, v in self.fused.items() for part in v}
        self._layer_key = re.compile(rf"{re.escape(layers)}\.(\d+)\.(.+)\.(weight|bias)")

    def to_zoo(self, key: str) -> list[str]:
        """zoo's name(s) for a Hugging Face key: [] for a key to skip, several for a fused tensor."""
        for part in self.prefix.split(".")[:-1]:
            key = key.removeprefix(part + ".")
        if self.ignored and self.ignored.search(key):
            return []
        layer = self._layer_key.fullmatch(key)
        if layer:
            i, module, param = layer.groups()
            return [f"blocks.{i}.{m}.{param}" for m in self.fused.get(module, (self.layer.get(module, module),))]
        module, _, param = key.rpartition(".")
        return [f"{self.top.get(module, module)}.{param}"]

    def to_hf(self, name: str) -> str:
        """The Hugging Face key of zoo's tensor `name` (of a fused tensor: the key that holds it)."""
        layer = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if layer:
            i, module, param = layer.groups()
            return f"{self.prefix}{self.layers}.{i}.{self._layer_hf.get(module, module)}.{param}"
        module, _, param = name.rpartition(".")
        key = self._top_hf.get(module, module)
        return f"{key}.{param}" if key in self.unprefixed else f"{self.prefix}{key}.{param}"


class PartNames:
    """Each dotted part of a key renamed by `parts` (Hugging Face's part -> zoo's), under `prefix` but for the top
    modules in `unprefixed` (the untied output layer); `ignored` as Names'."""

    def __init__(self, parts: dict[str, str], prefix: str = "model.", unprefixed: tuple[str, ...] = ("lm_head",),
                 ignored: str | None = None):
        self.parts, self.prefix, self.unprefixed = parts, prefix, unprefixed
        self._hf = {v: k for k, v in parts.items()}
        self.ignored = re.compile(ignored) if ignored else None

    def to_zoo(self, key: str) -> list[str]:
        """zoo's name for a Hugging Face key ([] for a key to skip)."""
        if self.ignored and self.ignored.search(key):
            return []
        return [".".join(self.parts.get(part, part) for part in key.removeprefix(self.prefix).split("."))]

    def to_hf(self, name: str) -> str:
        """The Hugging Face key of zoo's tensor `name`."""
        key = ".".join(self._hf.get(part, part) for part in name.split("."))
        return key if key.split(".")[0] in self.unprefixed else self.prefix + key

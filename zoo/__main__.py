"""Command line: `python -m zoo inspect <ckpt> [--prompt TEXT]`, `python -m zoo quantize <ckpt> <outdir> --quant int4`.

quantize loads a checkpoint quantized layer by layer and writes it as a zoo-quantized checkpoint
(zoo/quant), which zoo.load and run.py then take like any other. Before reading anything it refuses
an output that is the source, lies inside it or contains it, is a file, or already holds a checkpoint
(unless --force); it writes into a temporary directory beside the output, renamed into place at the
end, and never opens the source for writing (zoo.quant.check_output, zoo.quant.save).

inspect prints a checkpoint's config, its module tree with parameter counts (from the config alone:
no weights are read), the memory the weights need per dtype and per weight-only quantization, the
layers int4 would leave in floating point (or, for a quantized checkpoint, its scheme and the
layers it stores in floating point), and, with --prompt, every hook point with its shape for that
prompt.
"""
import argparse
import dataclasses
import sys

import torch
from torch import nn

import zoo
import zoo.quant
from zoo.formats.files import safetensors_metadata, safetensors_tensors
from zoo.loader import build_empty

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters once


def tree(module: nn.Module, name: str = "", depth: int = 0, max_depth: int = 3, out=None) -> list[str]:
    """One line per module down to max_depth: name, class, parameters. Repeated blocks are shown once."""
    out = [] if out is None else out
    out.append(f"{'  ' * depth}{name or type(module).__name__:<24} {type(module).__name__:<22} {count(module):>15,}")
    if depth >= max_depth:
        return out
    children = list(module.named_children())
    if isinstance(module, nn.ModuleList) and len(children) > 1:
        tree(children[0][1], "0", depth + 1, max_depth, out)
        out.append(f"{'  ' * (depth + 1)}1..{len(children) - 1}{'':<20} (the same as 0)")
        return out
    for child_name, child in children:
        tree(child, child_name, depth + 1, max_depth, out)
    return out


def weight_bytes(model: nn.Module, group_size: int = 128) -> dict[str, int]:
    """Bytes of the weights stored as each dtype, and with the linear layers zoo quantizes in int8 / int4.

    int8: 1 byte per weight + an fp32 scale per output row. int4: half a byte per weight + a bf16
    scale and zero per group of `group_size` inputs (torch's CPU layout), for the layers whose inputs
    split into groups (the others stay bf16). Embeddings, norms and biases stay in bf16.
    """
    layers = [model.get_submodule(name) for name in zoo.quant.candidate_layers(model)]
    linear = sum(m.weight.numel() for m in layers)
    rows = sum(m.weight.shape[0] for m in layers)
    linear4 = sum(m.weight.numel() for m in layers if zoo.quant.int4_misfit(m, group_size) is None)
    total = count(model)
    out = {dtype: total * size for dtype, size in DTYPE_BYTES.items()}
    out["int8"] = linear + 4 * rows + 2 * (total - linear)
    out[f"int4 (group {group_size})"] = linear4 // 2 + 4 * (linear4 // group_size) + 2 * (total - linear4)
    return out


def int4_floating_layers(model: nn.Module) -> list[str]:
    """One line per int4 group size that leaves some linear layer in floating point (zoo.quant.plan's rule)."""
    lines, names, none = [], zoo.quant.candidate_layers(model), []
    for group_size in zoo.quant.INT4_GROUP_SIZES:
        misfits = zoo.quant.int4_misfits(model, group_size)
        if misfits and len(misfits) == len(names):
            none.append(str(group_size))
        elif misfits:
            lines.append(f"int4 group {group_size} leaves in floating point: {zoo.quant.describe_layers(misfits, model)}")
    if none:
        lines.append(f"int4 group {', '.join(none)} fits no linear layer: zoo.load refuses it")
    return lines


def stored_quantization(directory, model: nn.Module) -> list[str]:
    """For a zoo-quantized checkpoint: its scheme, and the layers it stores in floating point."""
    path = directory / "model.safetensors"
    if not path.exists() or safetensors_metadata(path).get("format") != zoo.quant.FORMAT:
        return []
    meta, keys = safetensors_metadata(path), safetensors_tensors(path).keys()
    scheme = meta.get("scheme", "?") + (f", group {meta.get('group_size')}" if meta.get("scheme") == "int4" else "")
    floating = {n: "stored so" for n in zoo.quant.candidate_layers(model) if f"{n}.weight" in keys}
    if meta.get("scheme") == "int4":
        floating = {n: zoo.quant.int4_misfit(model.get_submodule(n), int(meta["group_size"])) or why
                    for n, why in floating.items()}
    lines = [f"quantized: {scheme}"]
    if floating:
        lines.append(f"in floating point: {zoo.quant.describe_layers(floating, model)}")
    return lines


def inspect(args) -> int:
    model = build_empty(args.ckpt)
    cfg = model.config
    directory = zoo.find_checkpoint(args.ckpt)
    print(f"checkpoint: {directory}\n\n{type(cfg).__name__}:")
    for field in dataclasses.fields(cfg):
        if field.name != "extra":
            print(f"  {field.name:<20} {getattr(cfg, field.name)}")
    print(f"\n{'module':<24} {'class':<22} {'parameters':>15}")
    print("\n".join(tree(model, max_depth=args.depth)))
    print(f"\ntotal parameters: {count(model):,}\n\nweights in memory:")
    for kind, size in weight_bytes(model).items():
        print(f"  {kind:<18} {size / 2**30:8.2f} GiB")
    for line in stored_quantization(directory, model) or int4_floating_layers(model):
        print(f"  {line}")
    if args.prompt is not None:
        loaded = zoo.load(args.ckpt, dtype=torch.float32, device="cpu")
        tokens = torch.tensor([loaded.tokenizer.encode(args.prompt, bos=True)])
        print(f"\nhook points for {tokens.shape[1]} tokens:")
        for name, shape in loaded.hook_points(tokens).items():
            print(f"  {name:<28} {shape}")
    return 0


def quantize(args) -> int:
    zoo.quant.check_output(args.outdir, zoo.find_checkpoint(args.ckpt), args.force)  # before reading anything
    model = zoo.load(args.ckpt, dtype=torch.bfloat16, device="cpu", quant=args.quant, group_size=args.group_size,
                     refine=args.refine)
    out = zoo.quant.save(model, args.outdir, force=args.force)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out / 'model.safetensors'} ({size / 2**20:.1f} MiB, {args.quant}"
          f"{f', group {args.group_size}' if args.quant == 'int4' else ''})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="config, module tree, parameter counts, memory, hook points")
    i.add_argument("ckpt")
    i.add_argument("--prompt", help="also list every hook point with its shape for this prompt (loads the weights)")
    i.add_argument("--depth", type=int, default=3, help="module tree depth (default: %(default)s)")
    q = sub.add_parser("quantize", help="write a weight-only quantized copy of a checkpoint")
    q.add_argument("ckpt")
    q.add_argument("outdir")
    q.add_argument("--quant", choices=["int8", "int4"], required=True)
    q.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128, 256 (default: %(default)s)")
    q.add_argument("--refine", action="store_true", help="int4: least-squares scales and zeros (less error, slower)")
    q.add_argument("--force", action="store_true", help="replace an output directory that already holds a checkpoint")
    args = p.parse_args(argv)
    try:
        return inspect(args) if args.command == "inspect" else quantize(args)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError; OSError: a path we cannot read or write
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

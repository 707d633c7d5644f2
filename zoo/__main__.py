"""Command line: `python -m zoo inspect <ckpt> [--prompt TEXT]`, `python -m zoo quantize <ckpt> <outdir> --quant int4`,
`python -m zoo perplexity <ckpt> <file> [--quant none int8 int4] [--compare <ckpt2>]`,
`python -m zoo collect <ckpt> --points "blocks.*.resid_post" --prompts prompts.jsonl --out <dir>`,
`python -m zoo save <ckpt> <outdir> [--format hf|zoo]`, `python -m zoo convert <ckpt> <outdir>`,
`python -m zoo show <ckpt> --prompt TEXT --out report.html`.

quantize loads a checkpoint quantized layer by layer and writes it as a zoo-quantized checkpoint
(zoo/quant), which zoo.load and run.py then take like any other. Before reading anything it refuses
an output that is the source, lies inside it or contains it, is a file, holds a file zoo did not write,
or holds a checkpoint zoo wrote (unless --force, which replaces only its files); it writes into a
temporary directory beside the output, renamed into place at the
end, and never opens the source for writing (zoo.quant.check_output, zoo.quant.save).

inspect prints a checkpoint's config, its module tree with parameter counts (from the config alone:
no weights are read), the memory the weights need per dtype and per weight-only quantization, the
layers int4 would leave in floating point (or, for a quantized checkpoint, its scheme and the
layers it stores in floating point), and, with --prompt, every hook point with its shape for that
prompt.

perplexity scores a text file with strided windows (zoo/perplexity.py) and prints, per model, the
perplexity with the standard error of the mean NLL and its interval, and tokens/s; several --quant
values and --compare checkpoints are scored on the same tokens and windows, in one table, each
row's mean NLL difference from the first with its standard error. A progress line is redrawn on
stderr. Under torchrun every rank computes and rank 0 prints.

collect writes an activation dataset (zoo/activations.py): the activations of the chosen hook points
at the chosen positions of every prompt of a JSON-lines file, in safetensors shards with an index,
resumable after an interruption (the same command again). Under torchrun rank 0 writes.

save (and convert, which is save --format hf) loads a checkpoint of any layout zoo reads and writes it as a
Hugging Face checkpoint (zoo.save): config.json, safetensors shards with an index, the tokenizer's files. The
output is checked first, as for quantize. The weights keep the dtype the checkpoint stores its embedding in
(--dtype to change it); under torchrun each rank loads its shards and rank 0 writes.

show writes one self-contained HTML page of a prompt (zoo/analysis/show.py): its tokens, every head's attention
pattern, the logit lens and direct logit attribution, each figure exportable as PNG.

User errors (a bad argument, a missing file) are one line on stderr and exit status 2.
"""
import dataclasses
import sys

import torch
from torch import nn

import zoo
import zoo.activations
import zoo.perplexity
import zoo.quant
from zoo import formats, parallel, prune, stats
from zoo.analysis.show import add_arguments as show_arguments, command as show_command
from zoo.checks import DTYPES, Parser, integer, read_text, require
from zoo.console import Progress, say
from zoo.formats.files import safetensors_metadata, safetensors_tensors
from zoo.loader import build_empty
from zoo.save import FORMATS, QUANTIZED, shard_size

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
    """Bytes of the weights stored as each dtype, and with the linear layers zoo quantizes in each scheme.

    A scheme's bytes (its weight_bytes: int8 a byte per weight and an fp32 scale per row, int4 half a
    byte and a bf16 scale and zero per group of `group_size` inputs, torch's CPU layout) for the layers
    it fits; the others, the embeddings, norms and biases in bf16.
    """
    layers = [model.get_submodule(name) for name in zoo.quant.candidate_layers(model)]
    total = count(model)
    out = {dtype: total * size for dtype, size in DTYPE_BYTES.items()}
    for scheme in zoo.quant.SCHEMES.values():
        fitting = [m.weight.shape for m in layers if scheme.misfit(m, group_size) is None]
        quantized = sum(n * k for n, k in fitting)
        out[scheme.label(group_size, "{name} (group {group_size})")] = (
            sum(scheme.weight_bytes(n, k, group_size) for n, k in fitting) + 2 * (total - quantized))
    return out


def floating_layers(model: nn.Module) -> list[str]:
    """One line per scheme and group size that leaves some linear layer in floating point (zoo.quant.plan's rule)."""
    lines, names = [], zoo.quant.candidate_layers(model)
    for scheme in zoo.quant.SCHEMES.values():
        none = []
        for group_size in scheme.group_sizes or (0,):
            misfits = zoo.quant.misfits(model, scheme, group_size)
            if misfits and len(misfits) == len(names):
                none.append(str(group_size))
            elif misfits:
                lines.append(f"{scheme.label(group_size)} leaves in floating point: "
                             f"{zoo.quant.describe_layers(misfits, model)}")
        if none:
            lines.append(f"{scheme.label(', '.join(none))} fits no linear layer: zoo.load refuses it")
    return lines


def stored_quantization(directory, model: nn.Module) -> list[str]:
    """For a zoo-quantized checkpoint: its scheme, and the layers it stores in floating point."""
    path = directory / "model.safetensors"
    if not path.exists() or safetensors_metadata(path).get("format") != zoo.quant.FORMAT:
        return []
    meta, keys = safetensors_metadata(path), safetensors_tensors(path).keys()
    scheme, group_size = zoo.quant.SCHEMES.get(meta.get("scheme")), meta.get("group_size", "0")
    floating = {n: "stored so" for n in zoo.quant.candidate_layers(model) if f"{n}.weight" in keys}
    if scheme is None or not group_size.isdigit():
        return [f"quantized: {meta.get('scheme', '?')} (not a scheme this zoo reads)"]
    floating = {n: scheme.misfit(model.get_submodule(n), int(group_size)) or why for n, why in floating.items()}
    lines = [f"quantized: {scheme.label(group_size, '{name}, group {group_size}')}"]
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
    for line in stored_quantization(directory, model) or floating_layers(model):
        print(f"  {line}")
    if args.prompt is not None:
        loaded = zoo.load(args.ckpt, dtype=torch.float32, device="cpu")
        if loaded.tokenizer is None:
            raise ValueError(f"{directory}: no tokenizer ({NO_TOKENIZER}) to read --prompt with")
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
    label = zoo.quant.SCHEMES[args.quant].label(args.group_size, "{name}, group {group_size}")
    print(f"wrote {out / 'model.safetensors'} ({size / 2**20:.1f} MiB, {label})")
    return 0


def save(args) -> int:
    source = zoo.find_checkpoint(args.ckpt)
    zoo.quant.check_output(args.outdir, source, args.force)  # before reading anything
    shard_size(args.max_shard_size)
    checkpoint = formats.open(source)  # headers only: is it quantized, and its stored dtype
    if args.format == "hf" and checkpoint.quantized:
        raise ValueError(f"{source} is a zoo-quantized checkpoint: {QUANTIZED}")
    if args.format == "zoo" and not checkpoint.quantized:
        raise ValueError(f"{source} is not quantized: zoo's format holds quantized checkpoints (python -m zoo quantize "
                         f"writes one); --format hf writes this one as Hugging Face's")
    if args.format == "zoo" and parallel.world_size() > 1:
        raise ValueError("--format zoo is written by one process (zoo.quant.save): run without torchrun")
    embed = checkpoint.tensors.get("embed.weight")  # missing: zoo.load names it
    dtype = DTYPES[args.dtype] if args.dtype else embed.dtype if embed is not None else torch.float32
    device = args.device or ("cuda" if parallel.world_size() > 1 and torch.cuda.is_available() else "cpu")
    model = zoo.load(source, dtype=dtype, device=device)
    out = zoo.save(model, args.outdir, format=args.format, force=args.force, max_shard_size=args.max_shard_size)
    files = list(out.iterdir()) if parallel.rank() == 0 else []
    say(f"wrote {out}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB ({args.format}, "
        f"{str(dtype).removeprefix('torch.')})")
    return 0


def perplexity(args) -> int:
    for flag, value, low in (("--ctx", args.ctx, 2), ("--stride", args.stride, 1), ("--max-tokens", args.max_tokens, 2)):
        if value is not None:
            integer(flag, value, low=low)
    text = read_text(args.file, "score")
    checkpoints = [args.ckpt] + (args.compare or [])
    opened = {ckpt: formats.open(zoo.find_checkpoint(ckpt)) for ckpt in checkpoints}  # no weights read
    ids = tokens_of(opened, text, args.file)[: args.max_tokens]  # checked for every checkpoint before loading any
    ctx = args.ctx or opened[args.ckpt].config.max_seq_len  # default: the first model's context, for every row
    require((args.stride or ctx) <= ctx, "--stride", args.stride,
            f"at most --ctx ({ctx}{'' if args.ctx else ', the context of ' + args.ckpt}): a stride beyond the window "
            f"would skip the tokens between windows")
    for ckpt in args.compare or []:  # before any model is scored (the first model's own: by evaluate, first)
        context = opened[ckpt].config.max_seq_len
        require(ctx <= context, "--ctx" if args.ctx else "--compare", args.ctx or ckpt,
                f"windows of at most {ckpt}'s context, {context} tokens" +
                ("" if args.ctx else f" (the windows default to {args.ckpt}'s context, {ctx}: pass --ctx {context})"))
    rows = []
    for ckpt in checkpoints:
        for quant in args.quant:
            quant = None if quant == "none" else quant
            scheme = zoo.quant.SCHEMES.get(quant)
            label = ckpt if scheme is None else f"{ckpt} {scheme.label(args.group_size, '{name} g{group_size}')}"
            model = zoo.load(ckpt, dtype=DTYPES[args.dtype], device=args.device, quant=quant,
                             group_size=args.group_size)
            result = zoo.perplexity.evaluate(model, ids, ctx, args.stride or ctx, Progress(label, "tokens"))
            rows.append((label, result))
            del model
    say(f"{args.file}: {len(ids):,} tokens, windows of {ctx} every {args.stride or ctx}, "
        f"{rows[0][1].tokens:,} scored in {rows[0][1].windows:,} windows")
    say(perplexity_table(rows))
    return 0


NO_TOKENIZER = "tokenizer.model, tokenizer.json, or vocab.json + merges.txt"


def tokens_of(checkpoints: dict, text: str, path: str) -> list[int]:
    """The text's token ids (BOS first), the same for every checkpoint's tokenizer, else an error naming two that
    differ. checkpoints: name -> formats.open's Checkpoint."""
    first = None
    for ckpt, checkpoint in checkpoints.items():
        if checkpoint.tokenizer is None:
            raise ValueError(f"{ckpt}: no tokenizer ({NO_TOKENIZER}) to read {path} with")
        ids = checkpoint.tokenizer.encode(text, bos=True)
        if first is not None and ids != first[1]:
            raise ValueError(f"{ckpt}'s tokenizer splits {path} into other tokens than {first[0]}'s "
                             f"({len(ids):,} and {len(first[1]):,} tokens): perplexities over different tokens "
                             f"do not compare")
        first = first or (ckpt, ids)
    return first[1]


def perplexity_table(rows: list[tuple[str, "zoo.perplexity.Result"]]) -> str:
    """One row per model: perplexity, its 95% interval, mean NLL +- stderr, difference from the first row, tokens/s."""
    base = rows[0][1]
    header = ("model", "ppl", "95% interval", "NLL/token", "+- se", "vs first", "+- se", "tokens/s")
    table = [header]
    for label, r in rows:
        low, high = r.interval()
        diff, diff_se = base.difference(r)
        table.append((label, f"{r.ppl:.3f}", f"{low:.3f}..{high:.3f}", f"{r.mean:.4f}", f"{r.stderr:.4f}",
                      "" if r is base else f"{diff:+.4f}", "" if r is base else f"{diff_se:.4f}",
                      f"{r.tokens_per_s:,.0f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def collect(args) -> int:
    shard_size = zoo.activations.parse_size(args.shard_size)  # the cheap checks before loading
    zoo.activations.position_rule(args.positions)
    integer("--batch", args.batch, low=1)
    model = zoo.load(args.ckpt, dtype=DTYPES[args.dtype], device=args.device)
    out = zoo.activations.write(model, args.prompts, args.out, args.points, positions=args.positions,
                                batch=args.batch, dtype=DTYPES[args.dtype], shard_size=shard_size, force=args.force,
                                checkpoint=str(zoo.find_checkpoint(args.ckpt).resolve()),
                                progress=Progress("collect", "prompts"))
    index = zoo.activations.read_index(out) if parallel.rank() == 0 else None
    if index is not None:
        rows = sum(s["rows"] for s in index["shards"])
        say(f"wrote {out}: {len(index['prompts']):,} prompts, {rows:,} rows of {len(index['points'])} points "
            f"({index['dtype']}) in {len(index['shards'])} shards")
    return 0


def main(argv=None) -> int:
    p = Parser(prog="python -m zoo")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    i = sub.add_parser("inspect", help="config, module tree, parameter counts, memory, hook points")
    i.add_argument("ckpt")
    i.add_argument("--prompt", help="also list every hook point with its shape for this prompt (loads the weights)")
    i.add_argument("--depth", type=int, default=3, help="module tree depth (default: %(default)s)")
    q = sub.add_parser("quantize", help="write a weight-only quantized copy of a checkpoint")
    q.add_argument("ckpt")
    q.add_argument("outdir")
    q.add_argument("--quant", choices=list(zoo.quant.SCHEMES), required=True)
    q.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128, 256 (default: %(default)s)")
    q.add_argument("--refine", action="store_true", help="int4: least-squares scales and zeros (less error, slower)")
    q.add_argument("--force", action="store_true", help="replace a checkpoint zoo wrote in the output directory (never other files)")
    r = sub.add_parser("perplexity", help="perplexity of a text file, strided windows (--quant/--compare side by side)")
    r.add_argument("ckpt")
    r.add_argument("file", help="a UTF-8 text file, scored as one text (BOS first)")
    r.add_argument("--quant", nargs="+", choices=["none", *zoo.quant.SCHEMES], default=["none"],
                   help="one row per value, e.g. --quant none int8 int4 (default: none)")
    r.add_argument("--group-size", type=int, default=128, help="int4 group size (default: %(default)s)")
    r.add_argument("--compare", nargs="+", metavar="CKPT", help="more checkpoints scored on the same tokens")
    r.add_argument("--ctx", type=int, help="window length in tokens (default: the first model's context)")
    r.add_argument("--stride", type=int, help="tokens between window starts, at most --ctx (default: --ctx)")
    r.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    r.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    c = sub.add_parser("collect", help="write an activation dataset: hook points' activations over prompts, sharded")
    c.add_argument("ckpt")
    c.add_argument("--points", nargs="+", required=True, help="hook point names or globs, e.g. 'blocks.*.resid_post'")
    c.add_argument("--prompts", required=True, help="JSON lines: {\"text\": ..., \"id\": ...} per line (id optional)")
    c.add_argument("--out", required=True, help="the dataset's directory (resumed when unfinished)")
    c.add_argument("--positions", default="last", help="last, all, or START:STOP[:STEP] of each prompt's tokens "
                                                       "(default: %(default)s)")
    c.add_argument("--batch", type=int, default=8, help="prompts per forward, left-padded (default: %(default)s)")
    c.add_argument("--shard-size", default="512M", help="bytes per shard, e.g. 64M, 1G (default: %(default)s)")
    c.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="the model's and the stored dtype")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    c.add_argument("--force", action="store_true", help="replace a finished dataset, or start an unfinished one over")
    for name, text in (("save", "write a checkpoint as Hugging Face's (or a quantized one as zoo's), from any layout"),
                       ("convert", "write a checkpoint of any layout zoo reads as Hugging Face's (save --format hf)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("ckpt")
        s.add_argument("outdir")
        if name == "save":
            s.add_argument("--format", choices=list(FORMATS), default="hf",
                           help="hf: config.json + safetensors + tokenizer files; zoo: zoo's quantized format "
                                "(a quantized checkpoint) (default: %(default)s)")
        s.add_argument("--max-shard-size", default="50GB", help="bytes per safetensors file, e.g. 5GB, 500MB, 2GiB "
                                                                 "(default: %(default)s)")
        s.add_argument("--dtype", choices=sorted(DTYPES), help="the weights' dtype (default: the checkpoint's own, "
                                                               "that of its embedding)")
        s.add_argument("--device", default=None, help="where to load it (default: cpu; under torchrun, cuda if "
                                                      "available)")
        s.add_argument("--force", action="store_true", help="replace a checkpoint zoo wrote in the output directory "
                                                            "(never other files)")
    show_arguments(sub.add_parser("show", help="one HTML page of a prompt: tokens, attention, logit lens, attribution"))
    stats.add_arguments(sub.add_parser("stats", help="per-neuron and per-head-dimension activation statistics of texts"))
    prune.add_arguments(sub.add_parser("prune", help="prune the units a cripple text set uses more than a focus set"))
    args = p.parse_args(argv)
    if args.command == "convert":
        args.format = "hf"
    command = {"inspect": inspect, "quantize": quantize, "perplexity": perplexity, "collect": collect, "save": save,
               "convert": save, "show": show_command, "stats": stats.command, "prune": prune.command}[args.command]
    try:
        parallel.setup()
        return command(args)
    except (OSError, TypeError, ValueError) as e:  # CheckpointError is a ValueError; OSError: a path we cannot read or write
        say(f"error: {e}", file=sys.stderr)  # every rank meets the same error and exits: no rank hangs
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

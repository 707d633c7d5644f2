"""Generate text from a checkpoint, streaming it as it is produced.

    python run.py                                      # the bundled tiny model, a demo prompt
    python run.py --ckpt llama-2-7b --prompt "The capital of France is"
    echo "Once upon a time" | python run.py --ckpt path/to/hf-dir --temperature 0
    python run.py --interactive                        # prompt after prompt
    python run.py --ckpt llama-2-7b-chat --chat --system "Be brief."   # a chat, one message per line
    torchrun --nproc_per_node 2 run.py --ckpt llama-2-7b   # tensor-parallel over 2 processes

Prints prefill and decode speed (tokens/s) at the end, on stderr. Under torchrun every rank holds a
slice of the model and computes the same tokens; only rank 0 reads the prompt and prints.
"""
import sys
import time

import torch.distributed as dist

import zoo
from zoo import parallel
from zoo.checks import DTYPES, Parser

DEMO_CHECKPOINT = "tiny-llama"
DEMO_PROMPT = "The for statement"


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], see="--help")
    p.add_argument("--ckpt", default=DEMO_CHECKPOINT,
                   help="checkpoint directory, or a name under checkpoints/ or $ZOO_CHECKPOINTS (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt (default: text piped to stdin, else a demo prompt)")
    p.add_argument("--interactive", "-i", action="store_true", help="ask for prompts at a '> ' prompt until EOF")
    p.add_argument("--chat", action="store_true",
                   help="chat in the checkpoint's chat template, else the family's format (LLaMA 2 [INST], LLaMA 3 "
                        "headers): a message per line at a '> ' prompt until EOF, each reply streamed; earlier turns "
                        "stay in the KV cache")
    p.add_argument("--system", help="with --chat: the system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s, reproducible)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quant", choices=list(zoo.quant.SCHEMES),
                   help="weight-only quantization of the linear layers (blocks and untied output)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default: %(default)s)")
    p.add_argument("--refine", action="store_true", help="int4: least-squares scales and zeros (less error, slower load)")
    p.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune"],
                   help="torch.compile the prefill and the decode step (zoo.compile); the compile time is printed")
    args = p.parse_args(argv)
    if args.chat and args.prompt is not None:
        p.error("--prompt is not accepted with --chat: the user's messages are read from stdin, one per line")
    if args.system is not None and not args.chat:
        p.error("--system is a chat's system message: it needs --chat")
    return args


def say(*args, **kwargs) -> None:
    if parallel.rank() == 0:
        print(*args, **kwargs)


def sampling(args) -> dict:
    """The generation flags, as zoo.stream and zoo.Chat take them."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def complete(model, text: str, args, first: bool = False) -> None:
    """Stream the model's continuation of `text` to stdout; report speed on stderr."""
    ids = model.tokenizer.encode(text, bos=True)
    stats = {}
    pieces = zoo.stream(model, ids, stats=stats, **sampling(args))  # checks all, the length too, before the echo
    say(text, end="", flush=True)
    show(pieces, stats, model if first else None)


def converse(model, args) -> None:
    """--chat: the reply to each line read, streamed; the dialogue's KV cache is kept from turn to turn."""
    chat = zoo.Chat(model, [{"role": "system", "content": args.system}] if args.system is not None else [],
                    **sampling(args))  # a tokenizer with no chat format is refused here
    first = True
    while (text := read_prompt(args, interactive=True)) is not None:
        if text.strip():  # an empty line is no message
            stats = {}
            show(chat.stream(text, stats=stats), stats, model if first else None)
            first = False


def show(pieces, stats: dict, model=None) -> None:
    """Print the pieces of text as they come, then the speed on stderr (and the positions a chat had cached), and
    with `model` (after the first reply) which kernel each kind of linear layer runs."""
    for piece in pieces:
        say(piece, end="", flush=True)
    say(flush=True)
    rate = lambda n, s: f"{n / s:.1f} tokens/s" if s > 0 else "-"  # noqa: E731
    cached = f" (+{stats['cached_tokens']} cached)" if "cached_tokens" in stats else ""
    say(f"[prefill {stats['prefill_tokens']} tokens{cached}: {rate(stats['prefill_tokens'], stats['prefill_s'])}, "
        f"decode {stats['decode_tokens']} tokens: {rate(stats['decode_tokens'], stats['decode_s'])}]",
        file=sys.stderr)
    if model is not None:
        say(f"[kernels, {kernels(model)}]", file=sys.stderr)


def kernels(model, prefill: int = 128) -> str:
    """Which kernel each kind of linear layer runs (zoo.quant.layer_paths), for a decode step and a prefill."""
    said = []
    for rows, step in ((1, "decode step"), (prefill, f"{prefill}-token prefill")):
        by_path = {}
        for kind, path in zoo.quant.layer_paths(model, rows).items():
            by_path.setdefault(path, []).append(kind)
        said.append(f"{step}: " + "; ".join(f"{path} ({', '.join(kinds)})" for path, kinds in by_path.items()))
    return ", ".join(said)


def read_prompt(args, interactive: bool) -> str | None:
    """Rank 0 reads the prompt (None at the end of input) and every rank gets it."""
    text = None
    if parallel.rank() == 0:
        if interactive:
            try:
                text = input("> ")
            except EOFError:
                text = None
        elif args.prompt is not None:
            text = args.prompt
        else:  # piped text, else (a terminal, or nothing piped) the demo prompt
            text = (sys.stdin.read() if not sys.stdin.isatty() else "") or DEMO_PROMPT
    if parallel.world_size() > 1:
        box = [text]
        dist.broadcast_object_list(box, src=0)
        text = box[0]
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        parallel.setup()
        model = zoo.load(args.ckpt, dtype=DTYPES[args.dtype], device=args.device, quant=args.quant,
                         group_size=args.group_size, refine=args.refine)
        if model.tokenizer is None:
            raise zoo.CheckpointError(f"{zoo.find_checkpoint(args.ckpt)}: no tokenizer (tokenizer.model, "
                                      f"tokenizer.json, or vocab.json + merges.txt)")
        if args.compile:  # compile now, not while timing the first prompt (inductor caches on disk: faster next time)
            start = time.perf_counter()
            zoo.generate(zoo.compile(model, mode=args.compile), [model.tokenizer.encode(DEMO_PROMPT, bos=True)],
                         max_new_tokens=2)
            say(f"[compiled in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
        if args.chat:
            converse(model, args)
        else:
            first = True
            while (text := read_prompt(args, args.interactive)) is not None:
                complete(model, text, args, first)
                first = False
                if not args.interactive:
                    break
    except (OSError, RuntimeError, TypeError, ValueError) as e:  # CheckpointError is a ValueError; OSError: a file
        say(f"error: {e}", file=sys.stderr)  # every rank meets the same error and exits: no rank hangs
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

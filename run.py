"""Generate text from a checkpoint, streaming it as it is produced.

    python run.py                                      # the bundled tiny model, a demo prompt
    python run.py --ckpt llama-2-7b --prompt "The capital of France is"
    echo "Once upon a time" | python run.py --ckpt path/to/hf-dir --temperature 0
    python run.py --interactive                        # prompt after prompt
    torchrun --nproc_per_node 2 run.py --ckpt llama-2-7b   # tensor-parallel (see the parallel issue)

Prints prefill and decode speed (tokens/s) at the end, on stderr.
"""
import argparse
import sys

import torch

import zoo

DEMO_CHECKPOINT = "tiny-llama"
DEMO_PROMPT = "The for statement"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=DEMO_CHECKPOINT,
                   help="checkpoint directory, or a name under checkpoints/ or $ZOO_CHECKPOINTS (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt (default: read stdin if it is piped, else a demo prompt)")
    p.add_argument("--interactive", "-i", action="store_true", help="ask for prompts at a '> ' prompt until EOF")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s, reproducible)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p.parse_args(argv)


def complete(model, text: str, args) -> None:
    """Stream the model's continuation of `text` to stdout; report speed on stderr."""
    ids = model.tokenizer.encode(text, bos=True)
    print(text, end="", flush=True)
    stats = {}
    for piece in zoo.stream(model, ids, stats=stats, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        print(piece, end="", flush=True)
    print(flush=True)
    rate = lambda n, s: f"{n / s:.1f} tokens/s" if s > 0 else "-"  # noqa: E731
    print(f"[prefill {stats['prefill_tokens']} tokens: {rate(stats['prefill_tokens'], stats['prefill_s'])}, "
          f"decode {stats['decode_tokens']} tokens: {rate(stats['decode_tokens'], stats['decode_s'])}]",
          file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = zoo.load(args.ckpt, dtype=DTYPES[args.dtype], device=args.device)
    except (FileNotFoundError, zoo.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print(f"error: no tokenizer (tokenizer.model or tokenizer.json) in {zoo.find_checkpoint(args.ckpt)}",
              file=sys.stderr)
        return 2
    if args.interactive:
        while True:
            try:
                text = input("> ")
            except EOFError:
                return 0
            complete(model, text, args)
    text = args.prompt if args.prompt is not None else (sys.stdin.read() if not sys.stdin.isatty() else DEMO_PROMPT)
    try:
        complete(model, text, args)
    except ValueError as e:  # a prompt longer than the context, ...
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode and prefill as a user measures them, with zoo's public API only:  python benchmarks/decode.py

    python benchmarks/decode.py                          # the random 1.1B LLaMA: bf16, int8, int4
    python benchmarks/decode.py --formats int4 --rounds 3
    python benchmarks/decode.py --quick                  # the bundled tiny model, 1 round: seconds

What a newcomer writes, and nothing else: `model = zoo.load(hf_dir, dtype=torch.bfloat16, quant=q)`
(q None, "int8" or "int4"), one warm-up `zoo.generate`, then per round
  prefill  zoo.generate(model, [prompt], max_new_tokens=1): --prompt tokens / its time
  decode   zoo.generate(model, [prompt], max_new_tokens=--new + 1, stop_ids=set()): --new tokens / (its
           time - that round's prefill time)
at batch 1, greedy, --threads (torch.set_num_threads). The prompt is the same ids as benchmarks/compile.py's
worker (which benchmarks/peers.py times through zoo.steps). Each format runs in its own process; reported:
the median over rounds. benchmarks/peers.py runs this script too (its `zoo-api` rows), so that both ways of
timing zoo are printed in one run beside llama.cpp. Writes benchmarks/results/decode.json. No assertions.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUANT = {"bf16": None, "int8": "int8", "int4": "int4"}


def measure(ckpt: str, fmt: str, prompt_len: int, new: int, rounds: int, threads: int) -> dict:
    """This process: the format loaded as a user loads it, timed by zoo.generate alone."""
    import torch

    import zoo
    torch.set_num_threads(threads)
    model = zoo.load(ckpt, dtype=torch.bfloat16, quant=QUANT[fmt])
    prompt = [1 + (7 * i) % 1000 for i in range(prompt_len)]
    zoo.generate(model, [prompt], max_new_tokens=4, stop_ids=set())  # warm-up
    prefill, decode = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        zoo.generate(model, [prompt], max_new_tokens=1, stop_ids=set())
        first = time.perf_counter() - start
        start = time.perf_counter()
        tokens = zoo.generate(model, [prompt], max_new_tokens=new + 1, stop_ids=set())[0]
        whole = time.perf_counter() - start
        prefill.append(prompt_len / first)
        decode.append(new / max(whole - first, 1e-9))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "rounds": rounds, "tokens": tokens}


def spawn(ckpt: str, fmt: str, prompt_len: int, new: int, rounds: int, threads: int) -> dict:
    """measure() in a fresh process (one format's memory and threads alone); {"error": ...} if it fails."""
    r = subprocess.run([sys.executable, __file__, "--worker", ckpt, "--formats", fmt, "--prompt", str(prompt_len),
                        "--new", str(new), "--rounds", str(rounds), "--threads", str(threads)],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,int8,int4", help="comma-separated, of: " + ", ".join(QUANT))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the bundled tiny model, 16-token prompt, 8 new, 1 round")
    p.add_argument("--worker", metavar="CKPT", help=argparse.SUPPRESS)  # spawn()'s: measure one format here
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode.json")
    args = p.parse_args(argv)
    formats = args.formats.split(",")
    if bad := [f for f in formats if f not in QUANT]:
        print(f"decode.py: --formats {','.join(bad)}: not one of {', '.join(QUANT)}", file=sys.stderr)
        sys.exit(2)
    if args.worker:
        print(json.dumps(measure(args.worker, formats[0], args.prompt, args.new, args.rounds, args.threads)))
        return {}
    if args.quick:
        ckpt = str(REPO / "checkpoints" / "tiny-llama")
        args.prompt, args.new, args.rounds = 16, 8, 1
    else:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from generate import make_1b_checkpoint
        ckpt = str(make_1b_checkpoint())
    rows = {fmt: spawn(ckpt, fmt, args.prompt, args.new, args.rounds, args.threads) for fmt in formats}
    print(f"\n{Path(ckpt).name}: zoo.load + zoo.generate, {args.threads} threads, batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens, median of {args.rounds} round(s)")
    print(f"{'format':<8} {'prefill tok/s':>13} {'decode tok/s':>12}")
    for fmt, row in rows.items():
        if "error" in row:
            print(f"{fmt:<8} error: {row['error']}")
        else:
            print(f"{fmt:<8} {row['prefill_tok_s']:>13.1f} {row['decode_tok_s']:>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()

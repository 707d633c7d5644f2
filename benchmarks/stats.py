"""Activation statistics against a plain forward of the same tokens:  python benchmarks/stats.py [--quick]

    python benchmarks/stats.py                     # the random 1.1B LLaMA (benchmarks/generate.py's), bf16, 1e5 tokens
    python benchmarks/stats.py --tokens 8192       # fewer tokens (the ratio is per token: it does not need many)
    python benchmarks/stats.py --quick             # the bundled tiny model, 512 tokens, one round: seconds
    python benchmarks/stats.py --paired --rounds 1 # plain and both batch by batch: steadier on a shared machine

The same windows of random token ids (--ctx long, --batch a forward) are run, in alternating rounds, as
  plain      model(tokens) under torch.inference_mode: the forward alone
  mlp_post   zoo.stats.collect_stats(points=("mlp_post",)): every neuron's statistics
  z          collect_stats(points=("z",)): every head dimension's
  both       collect_stats(points=("mlp_post", "z")): what `python -m zoo stats` collects by default
each round timing the whole set of windows once (one untimed window first). Reported per case: the best
round's tokens/s (the steadier figure on a shared machine) and the median's, and the ratio of its time to
plain's (the target for `both`: at most 1.3). With --paired only plain and both run, alternating batch by
batch (the order flipped each batch) into one accumulator over all the tokens, so that a slow minute of a
shared machine weighs on both alike; a round's time for each is the sum of its batches (`both`'s includes
the final `result()`). Prints a table and writes benchmarks/results/stats.json.
No assertions.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import zoo
from zoo import stats as zs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CASES = {"plain": None, "mlp_post": ("mlp_post",), "z": ("z",), "both": ("mlp_post", "z")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the bundled tiny model, 512 tokens, 1 round")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens per round (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=512, help="window length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every case, alternated (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--paired", action="store_true", help="plain and both only, alternating batch by batch")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of the 1.1B (or tiny, with --quick)")
    p.add_argument("--out", default=str(RESULTS / "stats.json"), help="JSON results path")
    return p.parse_args(argv)


def load(args):
    if args.ckpt is None and not args.quick:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from generate import make_1b_checkpoint  # the random TinyLlama-1.1B-shaped LLaMA, made once
        args.ckpt = str(make_1b_checkpoint())
    return zoo.load(args.ckpt or "tiny-llama", dtype=args.dtype, device="cpu")


def run(model, case, windows, batch) -> float:
    """Seconds for one pass of `case` over the windows."""
    start = time.perf_counter()
    if CASES[case] is None:
        with torch.inference_mode():
            for tokens, left_pad in zs.batches(windows, batch, "cpu"):
                model(tokens, left_pad=left_pad)
    else:
        zs.collect_stats(model, windows, CASES[case], batch)
    return time.perf_counter() - start


@torch.inference_mode()
def run_paired(model, windows, batch) -> tuple[float, float]:
    """(plain's seconds, both's seconds) over the windows, the two alternating batch by batch."""
    acc, times = zs.Accumulator(CASES["both"]), [0.0, 0.0]
    for i, (tokens, left_pad) in enumerate(zs.batches(windows, batch, "cpu")):
        for case in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            model(tokens, left_pad=left_pad, hooks=acc if case else None)
            times[case] += time.perf_counter() - start
    start = time.perf_counter()
    acc.result()
    return times[0], times[1] + time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.tokens, args.rounds, args.ctx = min(args.tokens, 512), 1, min(args.ctx, 128)
    torch.set_num_threads(args.threads)
    model = load(args)
    ctx = min(args.ctx, model.config.max_seq_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.tokens,), generator=g).tolist()
    windows = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    for case in CASES:  # untimed, one window: first-call costs
        run(model, case, windows[:1], args.batch)
    times = {case: [] for case in (("plain", "both") if args.paired else CASES)}
    for r in range(args.rounds):
        if args.paired:
            for case, t in zip(times, run_paired(model, windows, args.batch)):
                times[case].append(t)
                print(f"round {r + 1}: {case:<8} {args.tokens / t:,.0f} tokens/s", flush=True)
            continue
        for case in CASES if r % 2 == 0 else reversed(CASES):
            times[case].append(run(model, case, windows, args.batch))
            print(f"round {r + 1}: {case:<8} {args.tokens / times[case][-1]:,.0f} tokens/s", flush=True)
    rows = {}
    for case, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        rows[case] = {"seconds": ts, "tokens_per_s_best": args.tokens / best, "tokens_per_s_median": args.tokens / median,
                      "ratio_best": best / min(times["plain"]), "ratio_median": median / statistics.median(times["plain"])}
    c = model.config
    print(f"\n{Path(args.ckpt or 'tiny-llama').name} ({c.n_layers} layers, d_mlp {c.d_mlp}, {c.n_heads} heads of "
          f"{c.d_head}), {args.dtype}, {args.tokens:,} tokens in windows of {ctx}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} rounds{', paired batch by batch' if args.paired else ''}")
    print(f"{'case':<10}{'tokens/s best':>15}{'median':>10}{'x plain best':>14}{'median':>9}")
    for case, r in rows.items():
        print(f"{case:<10}{r['tokens_per_s_best']:>15,.0f}{r['tokens_per_s_median']:>10,.0f}{r['ratio_best']:>14.3f}"
              f"{r['ratio_median']:>9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"settings": settings, "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "load_avg": os.getloadavg(), "cases": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()

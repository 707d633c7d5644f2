"""Activation datasets: peak memory of `python -m zoo collect` for 100 and 1,000 prompts on the bundled tiny model.

    python benchmarks/activations_memory.py                 # the five cases below
    python benchmarks/activations_memory.py --prompts 100,1000 --shard-size 16M --dtypes float32

Each case runs `python -m zoo collect checkpoints/tiny-llama --points "blocks.*.resid_post"
--positions all --batch 8 --dtype D` in a fresh subprocess, which reports:
  base MB     resident size (VmRSS) after importing torch and zoo, before the command;
  peak MB     the process's peak resident size (VmHWM) when the command has returned;
  data MB     the dataset's size on disk (its shards);
  shards      how many shards were written;
  s           wall time of the command.
The prompts are paragraphs of Python's own help texts (pydoc_data.topics, in the standard library),
cut to at most 600 characters, the same first N for every case. With shards of --shard-size (16M)
the peak should not grow with the number of prompts, while the dataset does; a case of 1,000 prompts
in one shard (--shard-size 1G) holds the whole dataset in memory until it is written: the
difference the streaming makes. Each dtype of --dtypes (float32, bfloat16) runs the streamed cases;
the one-shard case runs in the first. (In bf16 on the CPU, torch 2.13's forward itself keeps memory
for every new (batch, length) shape it meets, prompts or not: the bf16 rows show that growth, the
fp32 rows the dataset's.) Output: a table and benchmarks/results/activations_memory.json.
No assertions: the numbers are for reading.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CHECKPOINT = REPO / "checkpoints" / "tiny-llama"
sys.path.insert(0, str(REPO / "benchmarks"))
from load_memory import status_mb  # noqa: E402  (/proc/self/status fields in MB)
ARGS = ["--points", "blocks.*.resid_post", "--positions", "all", "--batch", "8"]  # and --dtype, --shard-size


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default="100,1000", help="comma-separated prompt counts (default: %(default)s)")
    p.add_argument("--shard-size", default="16M", help="shard size of the streamed cases (default: %(default)s)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="model and stored dtypes (default: %(default)s)")
    p.add_argument("--one-shard", type=int, default=1000,
                   help="also N prompts in one shard (--shard-size 1G), for contrast; 0: skip (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--out", default=str(RESULTS / "activations_memory.json"), help="JSON results path")
    p.add_argument("--worker", nargs=4, metavar=("PROMPTS", "OUT", "SHARD_SIZE", "DTYPE"), help=argparse.SUPPRESS)
    return p.parse_args()


def paragraphs(n: int) -> list[str]:
    """n paragraphs of Python's help topics, each at most 600 characters (fewer: an error)."""
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        for part in topics[key].split("\n\n"):
            part = part.strip()
            if len(part) >= 40:
                out.append(part[:600])
    if len(out) < n:
        raise SystemExit(f"pydoc_data.topics has {len(out)} paragraphs, fewer than {n}")
    return out[:n]


def worker(prompts: str, out: str, shard_size: str, dtype: str, threads: int) -> dict:
    import torch

    from zoo.__main__ import main
    torch.set_num_threads(threads)
    base = status_mb("VmRSS")["VmRSS"]
    start = time.perf_counter()
    status = main(["collect", str(CHECKPOINT), "--prompts", prompts, "--out", out, "--shard-size", shard_size,
                   "--dtype", dtype, *ARGS])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(status)
    shards = sorted(Path(out).glob("shard-*.safetensors"))
    index = json.loads((Path(out) / "index.json").read_text())
    return {"base_mb": base, "peak_mb": status_mb("VmHWM")["VmHWM"], "seconds": seconds, "shards": len(shards),
            "data_mb": sum(f.stat().st_size for f in shards) / 2**20,
            "rows": sum(s["rows"] for s in index["shards"]),
            "tokens": sum(p["tokens"] for p in index["prompts"])}


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads)))
        return
    dtypes = args.dtypes.split(",")
    cases = [(int(n), args.shard_size, dtypes[0]) for n in args.prompts.split(",")]
    if args.one_shard:
        cases.append((args.one_shard, "1G", dtypes[0]))
    cases += [(int(n), args.shard_size, dtype) for dtype in dtypes[1:] for n in args.prompts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-activations-") as tmp:
        for n, shard_size, dtype in cases:
            prompts = Path(tmp) / f"prompts-{n}.jsonl"
            prompts.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(paragraphs(n))))
            out = Path(tmp) / f"acts-{n}-{shard_size}-{dtype}"
            proc = subprocess.run([sys.executable, __file__, "--worker", str(prompts), str(out), shard_size, dtype,
                                   "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"the case of {n} prompts failed (exit {proc.returncode})")
            row = {"prompts": n, "shard_size": shard_size, "dtype": dtype,
                   **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(f"{dtype}, {n} prompts, shards of {shard_size}: peak {row['peak_mb']:,.0f} MB (base {row['base_mb']:,.0f}), "
                  f"{row['data_mb']:,.1f} MB of activations in {row['shards']} shards, {row['seconds']:.1f} s",
                  flush=True)
            rows.append(row)
            shutil.rmtree(out)

    header = ("dtype", "prompts", "tokens", "rows", "shard size", "shards", "data MB", "base MB", "peak MB",
              "peak - base", "s")
    table = [header] + [(r["dtype"], f"{r['prompts']:,}", f"{r['tokens']:,}", f"{r['rows']:,}", r["shard_size"], str(r["shards"]),
                         f"{r['data_mb']:,.1f}", f"{r['base_mb']:,.0f}", f"{r['peak_mb']:,.0f}",
                         f"{r['peak_mb'] - r['base_mb']:,.0f}", f"{r['seconds']:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    import torch
    machine = {"cpu": platform.processor() or platform.machine(), "cpus_available": len(os.sched_getaffinity(0)),
               "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
               "load_average_at_start": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "command": ["python", "-m", "zoo", "collect", "tiny-llama", *ARGS],
                               "settings": {k: v for k, v in vars(args).items() if k != "worker"},
                               "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

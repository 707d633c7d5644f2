"""Memory under varied shapes: peak RSS of bf16 forwards and of `collect` over prompts of random lengths.

    python benchmarks/memory_shapes.py            # 1,000 forwards, a 10,000-prompt collect, the speed check
    python benchmarks/memory_shapes.py --quick    # 250 short forwards and a 250-prompt collect: seconds
    python benchmarks/memory_shapes.py --prompts 2000 --speed-rounds 0

The bundled tiny model in bf16 on the CPU, each case in a fresh subprocess, under the settings of
--settings (zoo.kernels' docstring says why):
  zoo     zoo's own: zoo.kernels sets oneDNN's primitive cache and ideep's cache to ONEDNN_CACHE_CAPACITY
          kernels, and linear() gives glibc's freed memory back every TRIM_EVERY CPU GEMMs;
  caches  zoo's cache capacity only (ZOO_TRIM_EVERY=10**12: no trims);
  unpadded  zoo's, but collect's batches not padded to a multiple of zoo.activations.PAD_MULTIPLE tokens;
  torch   what torch does without zoo: ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024 (oneDNN's
          and ideep's defaults; zoo keeps a value set before it is imported), no trims, batches unpadded.
Cases:
  forwards  N plain forwards (no hooks, no cache), each of a random batch (1..--max-batch) and length
            (1..--max-len) of random tokens;
  collect   `python -m zoo collect` (in the subprocess, zoo.__main__.main) over a .jsonl of N prompts of
            random lengths (1..--max-words words of Python's help texts), --points "blocks.*.resid_post"
            --positions last --batch 8 --shard-size 1M: the dataset (a few MB) is streamed out, so what
            grows is the forward's memory, not the dataset's.
Per case: VmHWM (peak RSS) once the first --first (100) forwards or prompts are done, and at the end, and
their ratio; the target is a ratio within 1.10 (at most 10% growth after the first 100).
The speed check (--speed-rounds, default 3; not in --quick) times, per setting, in alternating fresh
subprocesses: a plain forward of batch 1 x 128 and of batch 8 x 128 tokens (median of 20), and a
decode (ms per token of a 128-token greedy generation from a 32-token prompt), with zoo's native
kernels (ZOO_NATIVE=1: the decode's linears are native.cpp's bf16_linear on an AVX512-BF16 CPU) and
without (ZOO_NATIVE=0: every linear is oneDNN's). The shapes repeat, so a cache of either size keeps
them: the ratios should be 1 within the noise.
Output: tables and benchmarks/results/memory_shapes.json. No assertions (tests/test_memory_shapes.py
checks --quick's).
"""
import argparse
import json
import os
import platform
import random
import statistics
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

CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
NO_TRIMS = {"ZOO_TRIM_EVERY": str(10**12)}
UNPADDED = {"BENCH_PAD_MULTIPLE": "1"}  # read by run_collect below: zoo.activations.PAD_MULTIPLE
SETTINGS = {"zoo": {}, "caches": NO_TRIMS, "unpadded": UNPADDED,  # the environment of each setting's subprocess
            "torch": {**{name: "1024" for name in CACHES}, **NO_TRIMS, **UNPADDED}}
COLLECT = ["--points", "blocks.*.resid_post", "--positions", "last", "--batch", "8", "--shard-size", "1M",
           "--dtype", "bfloat16"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="250 forwards of batch <= 4, length <= 64; 250 prompts of "
                   "<= 30 words; no speed check")
    p.add_argument("--forwards", type=int, help="forwards of the forwards case (default 1000; --quick 250)")
    p.add_argument("--prompts", type=int, help="prompts of the collect case (default 10000; --quick 250)")
    p.add_argument("--first", type=int, default=100, help="the peak is read after this many (default: %(default)s)")
    p.add_argument("--max-batch", type=int, help="forwards' largest batch (default 8; --quick 4)")
    p.add_argument("--max-len", type=int, help="forwards' longest sequence (default 256; --quick 64)")
    p.add_argument("--max-words", type=int, help="collect's longest prompt in words (default 150; --quick 30)")
    p.add_argument("--settings", default="zoo,caches,unpadded,torch",
                   help="comma-separated, of: zoo, caches, unpadded, torch (default: %(default)s)")
    p.add_argument("--cases", default="forwards,collect", help="comma-separated (default: %(default)s)")
    p.add_argument("--speed-rounds", type=int, help="rounds of the speed check (default 3; --quick 0)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "memory_shapes.json"), help="JSON results path")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON object: what to run in this subprocess
    args = p.parse_args()
    defaults = dict(forwards=(1000, 250), prompts=(10000, 250), max_batch=(8, 4), max_len=(256, 64),
                    max_words=(150, 30), speed_rounds=(3, 0))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def load_model(threads: int):
    import torch

    import zoo
    torch.set_num_threads(threads)
    return zoo.load(str(CHECKPOINT), dtype=torch.bfloat16)


def in_effect() -> dict:
    import zoo.kernels
    import zoo.activations
    return {**{name: os.environ.get(name) for name in CACHES}, "trim_every": zoo.kernels.TRIM_EVERY,
            "pad_multiple": zoo.activations.PAD_MULTIPLE}


def run_forwards(job: dict) -> dict:
    import torch
    model = load_model(job["threads"])
    rng = random.Random(job["seed"])
    start, first = time.perf_counter(), None
    with torch.inference_mode():
        for i in range(job["n"]):
            shape = (rng.randint(1, job["max_batch"]), rng.randint(1, job["max_len"]))
            model(torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(i)))
            if i + 1 == job["first"]:
                first = status_mb("VmHWM")["VmHWM"]
    return {"first_mb": first, "peak_mb": status_mb("VmHWM")["VmHWM"], "seconds": time.perf_counter() - start}


def prompts_file(path: Path, n: int, max_words: int, seed: int) -> None:
    """n prompts of 1..max_words words drawn from Python's help texts (pydoc_data.topics, standard library)."""
    from pydoc_data.topics import topics
    words = sorted({w for text in topics.values() for w in text.split() if w.isalpha()})
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, max_words))), "id": i}) + "\n")


def run_collect(job: dict) -> dict:
    import torch

    from zoo.__main__ import main
    import zoo.activations
    torch.set_num_threads(job["threads"])
    seen = {}
    write = zoo.activations.write

    def write_noting_peak(*args, progress=None, **kwargs):  # VmHWM once the first prompts are done
        def note(done, total, text):
            if done >= job["first"] and "first_mb" not in seen:
                seen["first_mb"] = status_mb("VmHWM")["VmHWM"]
            if done // 1000 > seen.get("thousands", 0) and "first_mb" in seen:  # the trend, should a long run stop
                seen["thousands"], peak = done // 1000, status_mb("VmHWM")["VmHWM"]
                print(f"after {done:,} prompts: peak {peak:,.0f} MB, {peak / seen['first_mb']:.3f}x the first "
                      f"{job['first']}'s", file=sys.stderr, flush=True)
            if progress is not None:
                progress(done, total, text)
        return write(*args, progress=note, **kwargs)

    zoo.activations.write = write_noting_peak
    zoo.activations.PAD_MULTIPLE = int(os.environ.get("BENCH_PAD_MULTIPLE", zoo.activations.PAD_MULTIPLE))
    with tempfile.TemporaryDirectory(prefix="zoo-memory-shapes-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts_file(prompts, job["n"], job["max_words"], job["seed"])
        start = time.perf_counter()
        status = main(["collect", str(CHECKPOINT), "--prompts", str(prompts), "--out", str(Path(tmp) / "acts"),
                       *COLLECT])
        seconds = time.perf_counter() - start
        index = json.loads((Path(tmp) / "acts" / "index.json").read_text())
    if status != 0:
        raise SystemExit(status)
    return {"first_mb": seen.get("first_mb"), "peak_mb": status_mb("VmHWM")["VmHWM"], "seconds": seconds,
            "tokens": sum(p["tokens"] for p in index["prompts"])}


def run_speed(job: dict) -> dict:
    import torch

    import zoo
    model = load_model(job["threads"])
    out = {}
    with torch.inference_mode():
        for batch in (1, 8):
            tokens = torch.randint(0, model.config.vocab_size, (batch, 128), generator=torch.Generator().manual_seed(0))
            model(tokens)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                model(tokens)
                times.append(time.perf_counter() - start)
            out[f"forward_b{batch}_ms"] = statistics.median(times) * 1000
        prompt = list(range(1, 33))
        zoo.generate(model, [prompt], max_new_tokens=8, stop_ids=set())
        start = time.perf_counter()
        zoo.generate(model, [prompt], max_new_tokens=128, stop_ids=set())
        out["decode_ms_per_token"] = (time.perf_counter() - start) / 128 * 1000
    return out


def subprocess_run(job: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], stdout=subprocess.PIPE, text=True,
                          cwd=REPO, env={**os.environ, **env})
    if proc.returncode != 0:
        raise SystemExit(f"the case {job} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(header, rows):
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main():
    args = parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = {"forwards": run_forwards, "collect": run_collect, "speed": run_speed}[job["case"]](job)
        print(json.dumps({**result, "in_effect": in_effect()}))
        return
    settings, cases = args.settings.split(","), args.cases.split(",")
    for name in (*CACHES, "ZOO_TRIM_EVERY", "BENCH_PAD_MULTIPLE"):
        os.environ.pop(name, None)  # the zoo setting's subprocess gets zoo's values, not the caller's
    common = {"threads": args.threads, "seed": args.seed, "first": args.first}
    jobs = {"forwards": {"case": "forwards", "n": args.forwards, "max_batch": args.max_batch, "max_len": args.max_len},
            "collect": {"case": "collect", "n": args.prompts, "max_words": args.max_words}}
    memory = []
    for case in cases:
        for setting in settings:
            row = {"case": case, "setting": setting, "first": args.first, **jobs[case],
                   **subprocess_run({**common, **jobs[case]}, SETTINGS[setting])}
            row["ratio"] = row["peak_mb"] / row["first_mb"]
            print(f"{case}, {setting}: peak {row['first_mb']:,.0f} MB after {args.first}, {row['peak_mb']:,.0f} MB "
                  f"after {row['n']:,} ({row['ratio']:.2f}x), {row['seconds']:.0f} s", flush=True)
            memory.append(row)

    speed = []
    for r in range(args.speed_rounds if {"zoo", "torch"} <= set(settings) else 0):
        for native in ("1", "0"):
            for setting in ("zoo", "torch"):  # alternating, so that the machine's load falls on both alike
                row = {"round": r, "setting": setting, "native": native,
                       **subprocess_run({**common, "case": "speed"}, {**SETTINGS[setting], "ZOO_NATIVE": native})}
                print(f"speed, {setting}, ZOO_NATIVE={native}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in row.items() if k.endswith("ms") or k.endswith("token")), flush=True)
                speed.append(row)

    print()
    print_table(("case", "setting", "n", f"peak MB after {args.first}", "peak MB after all", "ratio", "s"),
                [(r["case"], r["setting"], f"{r['n']:,}", f"{r['first_mb']:,.0f}", f"{r['peak_mb']:,.0f}",
                  f"{r['ratio']:.2f}", f"{r['seconds']:.0f}") for r in memory])
    ratios = {}
    if speed:
        print()
        metrics = ("forward_b1_ms", "forward_b8_ms", "decode_ms_per_token")
        rows = []
        for native in ("1", "0"):
            for metric in metrics:
                med = {s: statistics.median(r[metric] for r in speed if r["setting"] == s and r["native"] == native)
                       for s in ("zoo", "torch")}
                ratio = ratios[f"{metric}_native{native}"] = med["zoo"] / med["torch"]
                rows.append((metric, native, f"{med['zoo']:.2f}", f"{med['torch']:.2f}", f"{ratio:.3f}"))
        print_table(("speed (median)", "ZOO_NATIVE", "zoo", "torch", "zoo / torch"), rows)

    import torch
    machine = {"cpu": platform.processor() or platform.machine(), "cpus_available": len(os.sched_getaffinity(0)),
               "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
               "load_average_at_start": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
                               "setting_env": SETTINGS, "collect_args": COLLECT, "memory": memory, "speed": speed,
                               "speed_ratios_zoo_over_torch": ratios}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

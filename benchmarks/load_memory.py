"""Peak memory of zoo.load on a ~1B-parameter LLaMA, for each checkpoint layout and stored dtype.

    python benchmarks/load_memory.py                       # every layout, loaded to bf16, 3 runs each
    python benchmarks/load_memory.py --cases meta-bf16,meta-bf16-2shards --repeats 1
    python benchmarks/load_memory.py --cold                # evict the files from the page cache first
    python benchmarks/load_memory.py --out /tmp/load_memory.json

The model: a random-weight LLaMA of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 query heads
sharing 4 key/value heads, intermediate 5632, vocab 32000, untied output: 1.10 B parameters, 2.2 GB in
bf16). It is made once by transformers in bf16 and written with `save_pretrained` (the same directory
benchmarks/generate.py uses), then rewritten in the other layouts, all cached under
benchmarks/results/cache/ (about 15 GB; delete the folder to start over):

    hf-bf16             HF model.safetensors, bf16     (llama-1b-hf-bf16/)
    hf-fp32             HF model.safetensors, fp32     (llama-1b-hf-fp32/)
    meta-bf16           Meta consolidated.00.pth, bf16 (llama-1b-meta-bf16/)
    meta-fp32           Meta consolidated.00.pth, fp32 (llama-1b-meta-fp32/)
    meta-bf16-2shards   Meta consolidated.00/01.pth, bf16, split as fairscale's 2 model-parallel
                        ranks split them (llama-1b-meta-bf16-2shards/)

Each is loaded with `zoo.load(dir, dtype=torch.bfloat16, device="cpu")` (--dtype to change) in a
fresh subprocess, which reports:
  base MB     resident size (VmRSS) after `import torch, zoo`, before loading;
  peak MB     the process's peak resident size (VmHWM) once the load returns. Not getrusage's
              ru_maxrss: Linux carries that over fork + exec from the parent process;
  after MB    resident size once the load has returned;
  model MB    the loaded model's own bytes: the sum of nbytes over its parameters and buffers;
  ratio       (peak - base) / model: 1.0 would be the model and nothing else;
  anon/file   the peaks of RssAnon (heap, tensors) and RssFile (pages of mmap'd files, which
              count in RSS while mapped and touched), sampled every 2 ms by a thread during the
              load: a breakdown of where the peak comes from, approximate;
  load s      wall time of zoo.load.
Medians over --repeats subprocesses.

Reading the numbers: besides the model, the peak can hold the loader's transients: one 64 MB chunk
of stored data being converted, and one tensor of the target dtype being assembled (the largest
here are the 32000x2048 embedding and output: 125 MB in bf16), plus heap memory glibc's malloc
keeps after temporaries are freed (zoo.load calls malloc_trim(0) at the end).

By default the checkpoint's files are read once just before each subprocess, so they are in the
page cache and `load s` measures zoo rather than the disk; --cold evicts them instead
(posix_fadvise DONTNEED). Output: a table and benchmarks/results/load_memory.json.
No assertions: the numbers are for reading.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "cache"
# TinyLlama-1.1B's shape, random weights (the same model and directory as benchmarks/generate.py's "1b")
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
CASES = {  # name: (directory, description)
    "hf-bf16": ("llama-1b-hf-bf16", "HF safetensors bf16"),
    "hf-fp32": ("llama-1b-hf-fp32", "HF safetensors fp32"),
    "meta-bf16": ("llama-1b-meta-bf16", "Meta .pth bf16"),
    "meta-fp32": ("llama-1b-meta-fp32", "Meta .pth fp32"),
    "meta-bf16-2shards": ("llama-1b-meta-bf16-2shards", "Meta .pth bf16, 2 shards"),
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="what zoo.load casts the weights to")
    p.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per case (medians reported)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each load")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--out", default=str(RESULTS / "load_memory.json"), help="JSON results path")
    p.add_argument("--make", help=argparse.SUPPRESS)  # internal: write one case's checkpoint
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: load one case, print JSON
    return p.parse_args()


# ---- /proc/self/status ------------------------------------------------------------------------

def status_mb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile...) in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[name] = int(value.split()[0]) / 1024  # kB
    return out


class Sampler(threading.Thread):
    """Polls RssAnon and RssFile while the load runs, keeping the peak of each (torch's copies release the GIL)."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peaks, self.stop = interval, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for k, v in status_mb("RssAnon", "RssFile").items():
                self.peaks[k] = max(self.peaks[k], v)
            time.sleep(self.interval)

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        return self.peaks


# ---- writing the checkpoints (each in its own subprocess) -------------------------------------

def directory(case: str) -> Path:
    return CACHE / CASES[case][0]


def make(case: str) -> None:
    import torch
    out = directory(case)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if case == "hf-bf16":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        LlamaForCausalLM._from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16).save_pretrained(tmp)
    elif case == "hf-fp32":
        from transformers import LlamaForCausalLM
        LlamaForCausalLM.from_pretrained(ensure("hf-bf16"), dtype=torch.float32).save_pretrained(tmp)
    else:  # Meta layouts, from the same weights: zoo reads the HF files, Meta's writer is below
        import zoo
        dtype = torch.float32 if case == "meta-fp32" else torch.bfloat16
        model = zoo.load(ensure("hf-bf16"), dtype=dtype, device="cpu")
        save_meta(model, tmp, shards=2 if case.endswith("2shards") else 1)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # whole or not at all


def ensure(case: str) -> Path:
    """The case's checkpoint directory, written first if it is not there yet."""
    out = directory(case)
    if case == "hf-bf16" and (out / "config.json").exists():  # shared with generate.py: check it is ours
        config = json.loads((out / "config.json").read_text())
        if any(config.get(k) != v for k, v in LLAMA_1B.items() if k != "rope_parameters"):
            shutil.rmtree(out)
    if not out.is_dir():
        print(f"writing {CASES[case][1]} to {out} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--make", case], check=True, cwd=REPO)
    return out


def meta_split_dim(key: str) -> int | None:
    """Which dimension fairscale's model-parallel layers split a weight on (Meta's checkpoint layout)."""
    if key.startswith("tok_embeddings"):
        return 1  # ParallelEmbedding (LLaMA 1/2) splits the embedding dimension
    if key.startswith("output") or any(f".{w}." in key for w in ("wq", "wk", "wv", "w1", "w3")):
        return 0  # ColumnParallelLinear
    if any(f".{w}." in key for w in ("wo", "w2")):
        return 1  # RowParallelLinear
    return None  # norms are replicated


def save_meta(model, out: Path, shards: int) -> None:
    """params.json + consolidated.NN.pth with Meta's names, each tensor in its own storage."""
    import torch

    from zoo.models.llama import LlamaConfig
    try:
        from zoo.formats.meta import zoo_to_meta
    except ImportError:  # a zoo from before zoo/formats/, to compare loading side by side with older commits
        from zoo.models.llama import zoo_to_meta
    cfg = model.config
    multiple_of = next(m for m in (2 ** i for i in range(13))  # Meta's rule must give our hidden size back
                       if LlamaConfig(dim=cfg.dim, n_heads=cfg.n_heads, multiple_of=m).hidden_dim == cfg.hidden_dim)
    out.mkdir(parents=True)
    (out / "params.json").write_text(json.dumps(dict(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        multiple_of=multiple_of, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_seq_len=cfg.max_seq_len)))
    state = {zoo_to_meta(k): v for k, v in model.state_dict().items()}
    for rank in range(shards):
        part = {}
        for key, t in state.items():
            dim = meta_split_dim(key)
            part[key] = (t if dim is None or shards == 1 else t.chunk(shards, dim=dim)[rank]).clone()
        torch.save(part, out / f"consolidated.{rank:02d}.pth")
        del part


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".bin"))


def warm(files: list[Path]) -> None:
    """Read the files once so that they are in the page cache."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (written back first, so that none stay dirty)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the measurements (each in a fresh subprocess) --------------------------------------------

def worker(path: str, dtype_name: str, threads: int) -> dict:
    import torch

    import zoo
    torch.set_num_threads(threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    base = status_mb("VmRSS", "RssAnon", "RssFile")
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    model = zoo.load(path, dtype=dtype, device="cpu", progress=False)
    load_s = time.perf_counter() - t0
    peaks = sampler.finish()
    now = status_mb("VmRSS", "VmHWM", "RssAnon", "RssFile")
    model_bytes = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    return {"base_mb": base["VmRSS"], "base_anon_mb": base["RssAnon"], "base_file_mb": base["RssFile"],
            "peak_mb": now["VmHWM"], "after_mb": now["VmRSS"], "after_anon_mb": now["RssAnon"],
            "after_file_mb": now["RssFile"], "peak_anon_mb_sampled": peaks["RssAnon"],
            "peak_file_mb_sampled": peaks["RssFile"], "model_mb": model_bytes / 2**20,
            "params": sum(p.numel() for p in model.parameters()), "load_s": load_s,
            "ratio": (now["VmHWM"] - base["VmRSS"]) / (model_bytes / 2**20)}


def spawn(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"subprocess {argv} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def print_table(rows: list[dict]) -> None:
    header = ("layout", "files", "file MB", "base MB", "peak MB", "after MB", "model MB", "ratio",
              "anon/file peak MB", "load s")
    table = [header] + [(r["description"], str(r["files"]), f"{r['file_mb']:,.0f}", f"{r['base_mb']:,.0f}",
                         f"{r['peak_mb']:,.0f}", f"{r['after_mb']:,.0f}", f"{r['model_mb']:,.0f}",
                         f"{r['ratio']:.2f}",
                         f"{r['peak_anon_mb_sampled']:,.0f}/{r['peak_file_mb_sampled']:,.0f}",
                         f"{r['load_s']:.2f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main():
    args = parse_args()
    if args.make:
        make(args.make)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.threads)))
        return

    import torch
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            sys.exit(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    machine = {"cpu": cpu_model(), "cpus_available": len(os.sched_getaffinity(0)), "threads": args.threads,
               "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
               "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
               "load_average_at_start": os.getloadavg()}
    print(f"CPU: {machine['cpu']}, torch threads: {args.threads}, torch {torch.__version__}; "
          f"loading to {args.dtype}, {'cold' if args.cold else 'warm'} page cache, median of {args.repeats}\n")
    for c in cases:
        ensure(c)

    rows = []
    for c in cases:
        path = directory(c)
        files = files_of(path)
        runs = []
        for _ in range(args.repeats):
            evict(files) if args.cold else warm(files)
            runs.append(spawn("--worker", str(path), "--dtype", args.dtype, "--threads", str(args.threads)))
        row = {"case": c, "description": CASES[c][1], "path": str(path.relative_to(REPO)), "files": len(files),
               "file_mb": sum(f.stat().st_size for f in files) / 2**20, "runs": runs}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        print(f"{CASES[c][1]}: peak {row['peak_mb']:,.0f} MB, base {row['base_mb']:,.0f} MB, model "
              f"{row['model_mb']:,.0f} MB: ratio {row['ratio']:.2f}; load {row['load_s']:.2f} s", flush=True)
        rows.append(row)

    print()
    print_table(rows)
    print("\nratio = (peak - base) / model. anon/file: sampled peaks of RssAnon / RssFile during the load.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": {k: v for k, v in vars(args).items()
                                                                if k not in ("make", "worker")},
                               "model": LLAMA_1B, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

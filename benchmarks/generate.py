"""Generation speed and memory, zoo against Hugging Face transformers, on the same checkpoint, side by side.

    python benchmarks/generate.py                          # tiny (fp32, bf16) and 1b (bf16)
    python benchmarks/generate.py --sizes tiny             # the bundled checkpoint only (seconds)
    python benchmarks/generate.py --sizes 1b --repeats 5 --new-tokens 64
    python benchmarks/generate.py --out /tmp/generate.json --threads 2

Models:
  tiny  the bundled `checkpoints/tiny-llama` (Meta layout, bf16 on disk; skipped with a note if it is
        not there). zoo loads it as is; for transformers it is loaded with zoo in fp32, copied into a
        `LlamaForCausalLM` (names by `zoo_to_hf`, wq/wk rows permuted from Meta's interleaved rotary
        pairs to HF's half-split ones by `zoo_tensor_to_hf`) and written with `save_pretrained` to
        benchmarks/results/cache/tiny-llama-hf/. Before any timing the two models' fp32 logits on the
        benchmark prompt must agree within 1e-4, else the run stops.
  1b    a random-weight LLaMA of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 query heads sharing
        4 key/value heads, intermediate 5632, vocab 32000: 1.10 B parameters), made in bf16 by
        transformers from a config and written once with `save_pretrained` to
        benchmarks/results/cache/llama-1b-hf-bf16/ (shared with benchmarks/load_memory.py). Both
        libraries load that directory.

Measured, per model and dtype (tiny: fp32 and bf16; 1b: bf16), for each library in its own fresh
subprocess (so neither's memory or warm caches count against the other):
  load s          zoo.load / LlamaForCausalLM.from_pretrained, wall time. Not like for like:
                  transformers maps the safetensors file and, when no cast is needed, leaves the
                  parameters as views of the mapping, so the weights are read from disk on first
                  use (the warmup generation) and `RSS MB after load` stays near the base; zoo
                  reads every tensor into memory of its own, and its first load in a process also
                  pays ~1.5-2.5 s and ~170 MB for torch importing its meta-device kernels (see
                  benchmarks/load_memory.py).
  prefill tok/s   prompt tokens / time to the first new token, batch 1 (the whole generate call up to
                  the first token: setup, the prompt's forward pass, the first greedy choice).
  decode tok/s    batch x (n - 1) / time from the first new token to the n-th, at batch 1 and 8: the
                  decode steps alone, prefill excluded. Timestamps come from inside one generation:
                  zoo's `zoo.steps` generator yields each step's tokens; for transformers a
                  `BaseStreamer` passed to `generate` receives each step's tokens (on the CPU its
                  `put` is called synchronously right after each step's token is chosen).
                  Greedy, no stop token: zoo `steps(..., stop_ids=set())`; transformers
                  `generate(do_sample=False, eos_token_id=None, min_new_tokens=n, max_new_tokens=n)`
                  with the model's generation_config.eos_token_id cleared too.
  peak RSS MB     the subprocess's peak resident size (VmHWM; not ru_maxrss, which Linux carries over
                  from the parent through fork + exec) over loading and all the generations;
                  `base RSS MB` is the resident size after the imports (torch + zoo, or torch +
                  transformers).
Every timing is the median of --repeats runs after --warmup untimed runs. The prompt is the same
random token ids for both libraries (rows of a batch all prompt-length long, so no padding).
The first tokens each library chose are compared and reported (identical greedy output is expected
in fp32; bf16 may drift apart after a while).

Output: a table (zoo/HF > 1 means zoo is faster for tok/s, and bigger for seconds and MB) and
JSON in benchmarks/results/generate.json with the machine (CPU model, threads, versions).
No assertions on timings: the numbers are for reading.
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "cache"
TINY = REPO / "checkpoints" / "tiny-llama"
TINY_HF = CACHE / "tiny-llama-hf"
# TinyLlama-1.1B's shape, random weights (shared with load_memory.py, which writes the same directory)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
LLAMA_1B_HF = CACHE / "llama-1b-hf-bf16"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_DTYPES = {"tiny": ["fp32", "bf16"], "1b": ["bf16"]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,1b", help="comma-separated: tiny, 1b")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 for every size "
                                                   "(default: tiny fp32,bf16; 1b bf16)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (n)")
    p.add_argument("--batches", default="1,8", help="batch sizes for decode (prefill is reported at the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--out", default=str(RESULTS / "generate.json"), help="JSON results path")
    p.add_argument("--tiny", default=str(TINY), help="the tiny checkpoint (Meta layout)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one side, print JSON
    return p.parse_args()


# ---- helpers ----------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def rss_mb() -> float:
    """Resident set size now (VmRSS), in MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child started
    by a big parent reports at least the parent's size (here the parent holds torch, transformers
    and zoo: ~500 MB, more than the whole tiny benchmark). VmHWM belongs to the new address space.
    """
    return _status_mb("VmHWM")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    except OSError:
        pass
    return []


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The same random token ids for both libraries (ids 3.. to stay clear of unk/bos/eos)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- preparing the checkpoints (in the parent process) ----------------------------------------

def hf_config_from_zoo(cfg, **extra):
    """A transformers LlamaConfig for a zoo LlamaConfig."""
    from transformers import LlamaConfig
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                       max_position_embeddings=cfg.max_seq_len, rope_parameters=rope,
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
                       mlp_bias=cfg.mlp_bias, **extra)


def prepare_tiny(tiny: Path, prompt_len: int) -> dict:
    """Convert the bundled checkpoint for transformers, check fp32 logits agree, save it. Returns check info."""
    import torch
    from transformers import LlamaForCausalLM

    import zoo
    from zoo.models.llama import zoo_tensor_to_hf, zoo_to_hf

    model = zoo.load(tiny, dtype=torch.float32, device="cpu")
    cfg = model.config
    tok = model.tokenizer
    extra = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id) if tok is not None else {}
    hf = LlamaForCausalLM(hf_config_from_zoo(cfg, **extra)).eval()
    state = {zoo_to_hf(name): zoo_tensor_to_hf(name, p.detach(), cfg) for name, p in model.named_parameters()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        sys.exit(f"tiny: converting to transformers left missing {missing}, unexpected {unexpected}")

    ids = torch.tensor(prompts(2, prompt_len, cfg.vocab_size, seed=1))
    with torch.inference_mode():
        ours = model(ids)
        theirs = hf(ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"tiny: fp32 logits, zoo vs transformers on {tuple(ids.shape)} tokens: max |diff| = {diff:.2e}")
    if not diff <= 1e-4:
        sys.exit(f"tiny: zoo and transformers disagree (max |logit diff| {diff:.3e} > 1e-4); not timing them")
    TINY_HF.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(TINY_HF)
    return {"logits_max_abs_diff_fp32": diff, "hf_dir": str(TINY_HF.relative_to(REPO))}


def make_1b_checkpoint() -> Path:
    """The random 1.1B LLaMA in HF layout, bf16 (made once; reused while its config matches)."""
    marker = LLAMA_1B_HF / "config.json"
    if marker.exists() and all(json.loads(marker.read_text()).get(k) == v for k, v in LLAMA_1B.items()
                               if k != "rope_parameters"):
        return LLAMA_1B_HF
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    print(f"writing a random 1.1B LLaMA (bf16) to {LLAMA_1B_HF} ...", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16).eval()
    tmp = LLAMA_1B_HF.with_name(LLAMA_1B_HF.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    shutil.rmtree(LLAMA_1B_HF, ignore_errors=True)
    tmp.rename(LLAMA_1B_HF)  # whole or not at all
    return LLAMA_1B_HF


# ---- one side, in its own subprocess ----------------------------------------------------------

def run_worker(spec: dict) -> dict:
    base_rss_before_import = rss_mb()
    import torch
    torch.set_num_threads(spec["threads"])
    if spec["lib"] == "zoo":
        import zoo
    else:
        import transformers
        from transformers import LlamaForCausalLM
        from transformers.generation.streamers import BaseStreamer
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    base_rss = rss_mb()

    t0 = time.perf_counter()
    if spec["lib"] == "zoo":
        model = zoo.load(spec["path"], dtype=dtype, device="cpu")
        vocab, context = model.config.vocab_size, model.config.max_seq_len
    else:
        model = LlamaForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
        model.generation_config.eos_token_id = None  # no stop token at all
        vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    load_s = time.perf_counter() - t0
    load_rss = rss_mb()
    n, length = spec["new_tokens"], spec["prompt_len"]
    if length + n > context:
        raise SystemExit(f"prompt {length} + {n} new tokens do not fit the model's context of {context}")

    if spec["lib"] == "zoo":
        def generate(rows):
            """(tokens per row, time of the call, time of each step's tokens)"""
            times, out = [], []
            start = time.perf_counter()
            for tokens, _ in zoo.steps(model, rows, max_new_tokens=n, stop_ids=set()):
                times.append(time.perf_counter())
                out.append(tokens.tolist())
            return [list(r) for r in zip(*out)], start, times
    else:
        class Clock(BaseStreamer):
            """Timestamps of generate's streamer calls: the prompt first, then each step's tokens."""
            def __init__(self):
                self.times = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        def generate(rows):
            ids = torch.tensor(rows)
            clock = Clock()
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                                     pad_token_id=0, min_new_tokens=n, max_new_tokens=n, streamer=clock)
            return out[:, ids.shape[1]:].tolist(), start, clock.times[1:]  # times[0]: the prompt's put

    result = {"lib": spec["lib"], "dtype": spec["dtype"], "threads": torch.get_num_threads(),
              "load_s": load_s, "rss_mb_before_imports": base_rss_before_import, "base_rss_mb": base_rss,
              "rss_mb_after_load": load_rss,
              "param_mb": sum(p.nbytes for p in model.parameters()) / 2**20, "runs": {}}
    if spec["lib"] == "hf":
        result["transformers"] = transformers.__version__
        result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    for batch in spec["batches"]:
        rows = prompts(batch, length, vocab)
        for _ in range(spec["warmup"]):
            generate(rows)
        prefill, decode, tokens = [], [], None
        for _ in range(spec["repeats"]):
            out, start, times = generate(rows)
            if len(times) != n or any(len(r) != n for r in out):
                raise SystemExit(f"{spec['lib']}: asked for {n} tokens, got {len(times)} steps")
            prefill.append(times[0] - start)
            decode.append(times[-1] - times[0])
            tokens = tokens or out
        result["runs"][str(batch)] = {
            "prefill_s": statistics.median(prefill), "prefill_s_all": prefill,
            "prefill_tok_s": batch * length / statistics.median(prefill),
            "decode_s": statistics.median(decode), "decode_s_all": decode,
            "decode_tok_s": batch * (n - 1) / statistics.median(decode),
            "tokens": tokens}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def spawn(spec: dict) -> dict | None:
    """Run one side in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                          stderr=None, text=True, cwd=REPO)
    if proc.returncode != 0:
        print(f"  {spec['lib']} {spec['dtype']} failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the report -------------------------------------------------------------------------------

def rows_for(model: str, dtype: str, zoo_r: dict | None, hf_r: dict | None, batches: list[int], prompt_len: int):
    def get(r, *keys):
        for k in keys:
            if r is None or k not in r:
                return None
            r = r[k]
        return r
    b0 = str(batches[0])
    metrics = [("load s", ("load_s",)),
               (f"prefill tok/s (b={b0}, {prompt_len} tok)", ("runs", b0, "prefill_tok_s"))]
    metrics += [(f"decode tok/s (b={b})", ("runs", str(b), "decode_tok_s")) for b in batches]
    metrics += [("base RSS MB (imports)", ("base_rss_mb",)), ("RSS MB after load", ("rss_mb_after_load",)),
                ("peak RSS MB", ("peak_rss_mb",))]
    out = []
    for label, keys in metrics:
        z, h = get(zoo_r, *keys), get(hf_r, *keys)
        ratio = z / h if z is not None and h else None
        out.append({"model": model, "dtype": dtype, "metric": label, "zoo": z, "hf": h, "zoo_over_hf": ratio})
    return out


def print_table(rows: list[dict]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    header = ("model", "dtype", "metric", "zoo", "HF", "zoo/HF")
    table = [header] + [(r["model"], r["dtype"], r["metric"], fmt(r["zoo"]), fmt(r["hf"]),
                         "-" if r["zoo_over_hf"] is None else f"{r['zoo_over_hf']:.2f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    for s in sizes:
        if s not in DEFAULT_DTYPES:
            sys.exit(f"unknown size {s!r}; choose from {', '.join(DEFAULT_DTYPES)}")
    machine = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpus_available": len(os.sched_getaffinity(0)),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "platform": platform.platform(), "load_average_at_start": os.getloadavg()}
    print(f"CPU: {machine['cpu']} ({machine['cpus_available']} available), torch threads: {machine['threads']}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batches {batches}, "
          f"median of {args.repeats} after {args.warmup} warmup\n")

    report = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "models": {}, "table": []}
    for size in sizes:
        if size == "tiny":
            tiny = Path(args.tiny)
            if not (tiny / "params.json").exists():
                print(f"tiny: {tiny} is missing (not trained yet?): skipped\n")
                report["models"]["tiny"] = {"skipped": f"{tiny} missing"}
                continue
            info = prepare_tiny(tiny, args.prompt_len)
            paths = {"zoo": str(tiny), "hf": str(TINY_HF)}
        else:
            path = make_1b_checkpoint()
            info = {"config": LLAMA_1B, "checkpoint": str(path.relative_to(REPO))}
            paths = {"zoo": str(path), "hf": str(path)}
        info["dtypes"] = {}
        for dtype in (args.dtypes.split(",") if args.dtypes else DEFAULT_DTYPES[size]):
            results = {}
            for lib in ("zoo", "hf"):
                print(f"{size} {dtype}: {lib} ...", flush=True)
                spec = dict(lib=lib, path=paths[lib], dtype=dtype, threads=args.threads, batches=batches,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                            warmup=args.warmup)
                results[lib] = spawn(spec)
            z, h = results["zoo"], results["hf"]
            if z and h:
                agree = {b: min(agreeing_prefix(zr, hr) for zr, hr in zip(z["runs"][b]["tokens"],
                                                                         h["runs"][b]["tokens"]))
                         for b in z["runs"]}
                print(f"  greedy tokens identical for the first {agree} of {args.new_tokens} (per batch size, "
                      f"worst row)")
                results["greedy_agreeing_prefix"] = agree
            info["dtypes"][dtype] = results
            report["table"] += rows_for(size, dtype, z, h, batches, args.prompt_len)
        report["models"][size] = info
        print()

    print_table(report["table"])
    print("\nzoo/HF: > 1 means zoo is faster (tok/s) or takes longer / more memory (s, MB).")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

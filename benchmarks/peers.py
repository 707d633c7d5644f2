"""CPU decode and prefill: zoo against llama.cpp and Hugging Face transformers on the same weights, side by side.

    python benchmarks/peers.py                 # the 1.1B, 3 rounds: every configuration below once per round
    python benchmarks/peers.py --rounds 5 --only zoo-eager,llama.cpp
    python benchmarks/peers.py --quick         # the bundled tiny model, zoo eager and api, 1 round: a smoke check

Configurations (batch 1, --prompt 128 tokens, --new 32 tokens, --threads 2):
  zoo eager / zoo compiled   bf16, int8 and int4 g128 (zoo.load(..., quant=...); compiled: zoo.compile,
                             compile time excluded), timed through zoo.steps, plus decode at --batch 8
  zoo api                    the same loads timed by benchmarks/decode.py: zoo.generate alone, as a user
                             times it (the public API only)
  hf                         transformers' LlamaForCausalLM in bf16, generate() (benchmarks/generate.py's worker)
  llama.cpp                  llama-bench on BF16, Q8_0 and Q4_0 GGUF files converted from the same
                             Hugging Face directory: prefill = pp128, decode = tg32 at depth 128
                             (after a 128-token context, as zoo's and HF's decode)
Each zoo and HF configuration runs in a fresh subprocess (benchmarks/compile.py's and
benchmarks/generate.py's workers, one warm-up generation first), llama-bench once per model with
-r 1; the configurations take turns round after round, and each figure is the median over rounds.

The 1.1B is benchmarks/generate.py's random TinyLlama-1.1B-shaped LLaMA (made once under
benchmarks/results/cache). llama.cpp is optional: its binaries are found in $ZOO_LLAMA_CPP or
~/.cache/zoo-peers/llama.cpp/build/bin (where ../shared/peers/llama-cpp.sh builds them), its GGUF
files in benchmarks/results/cache/llama-1b-gguf (made by `llama-cpp.sh gguf HF_DIR OUT_DIR` when that
script is found, at $ZOO_PEERS_SCRIPT or ../shared/peers/llama-cpp.sh); without them the table says
so and has no llama.cpp rows. Time llama.cpp on a quiet machine: its threads spin at each barrier.

Reported: prefill and decode tokens/s, each format's ratio to llama.cpp's (zoo / llama.cpp: above 1
is faster), and GB/s of weights streamed per decoded token at batch 1 (tok/s x the bytes a decode step
reads: every weight but the input embedding), also as a share of this machine's memory bandwidth,
measured first in the same run (benchmarks/matmul.py's copy and read of 1 GiB at --threads): the
physical limit of a decode step. zoo's bytes are computed from the config: bf16 2 per
weight; int8 1 + a 4-byte scale per row; int4 g128 0.5 + 8 bytes per group (scale and zero, fp32).
llama.cpp's are llama-bench's model size less the embedding's share of it. Writes
benchmarks/results/peers.json (--out). No assertions.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
GGUF = REPO / "benchmarks" / "results" / "cache" / "llama-1b-gguf"
LLAMA_CPP_DEFAULT = Path.home() / ".cache" / "zoo-peers" / "llama.cpp" / "build" / "bin"
FORMATS = {"bf16": ("bf16", None, "bf16.gguf"), "int8": ("bf16", "int8", "q8_0.gguf"),
           "int4": ("bf16", "int4", "q4_0.gguf")}  # zoo's name: (dtype, quant, llama.cpp's file)
PEER_NAMES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
KINDS = ("zoo-eager", "zoo-compiled", "zoo-api", "hf", "llama.cpp")


def weight_bytes(config: dict, fmt: str) -> float:
    """Bytes a zoo decode step reads: every linear weight and the output layer (not the embedding)."""
    d, f, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], \
        config["vocab_size"]
    kv = d // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)] * layers + [(vocab, d)]  # [N, K]
    per = {"bf16": lambda n, k: 2 * n * k, "int8": lambda n, k: n * k + 4 * n,
           "int4": lambda n, k: n * k / 2 + 8 * n * k / 128}[fmt]
    return sum(per(n, k) for n, k in shapes) + 2 * d * (2 * layers + 1)  # + the norms, bf16


def llama_cpp_bin(args) -> Path | None:
    path = Path(os.environ.get("ZOO_LLAMA_CPP", LLAMA_CPP_DEFAULT))
    return path if (path / "llama-bench").exists() else None


def ensure_gguf(hf_dir: Path) -> str | None:
    """The GGUF files for hf_dir, converted once; None, or why not."""
    if all((GGUF / f).exists() for _, _, f in FORMATS.values()):
        return None
    script = Path(os.environ.get("ZOO_PEERS_SCRIPT", REPO.parent / "shared" / "peers" / "llama-cpp.sh"))
    if not script.exists():
        return f"no GGUF files in {GGUF} and no conversion script at {script} (set ZOO_PEERS_SCRIPT)"
    print(f"converting {hf_dir} to GGUF with {script} (once) ...", file=sys.stderr, flush=True)
    r = subprocess.run(["bash", str(script), "gguf", str(hf_dir), str(GGUF)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"GGUF conversion failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"


def llama_bench(binary: Path, fmt: str, args) -> dict:
    """pp --prompt and tg --new at depth --prompt, one repetition each, on one GGUF file."""
    out = {}
    for key, flags in (("prefill_tok_s", ["-p", str(args.prompt), "-n", "0"]),
                       ("decode_tok_s", ["-p", "0", "-n", str(args.new), "-d", str(args.prompt)])):
        r = subprocess.run([str(binary / "llama-bench"), "-m", str(GGUF / FORMATS[fmt][2]), "-t", str(args.threads),
                            "-r", "1", "-o", "jsonl", *flags], capture_output=True, text=True)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        row = json.loads(r.stdout.strip().splitlines()[-1])
        out[key] = row["avg_ts"]
        out["model_size"], out["n_params"] = row["model_size"], row["model_n_params"]
    return out


def hf_run(ckpt: Path, args) -> dict:
    from generate import spawn
    r = spawn({"lib": "hf", "dtype": "bf16", "path": str(ckpt), "threads": args.threads, "new_tokens": args.new,
               "prompt_len": args.prompt, "batches": [1], "warmup": 1, "repeats": 1})
    if r is None:
        return {"error": "transformers' worker failed (its output is above)"}
    run = r["runs"]["1"]
    return {"prefill_tok_s": run["prefill_tok_s"], "decode_tok_s": run["decode_tok_s"]}


def zoo_run(ckpt: Path, fmt: str, compiled: bool, args) -> dict:
    from compile import measure
    dtype, quant, _ = FORMATS[fmt]
    return measure(dict(ckpt=str(ckpt), dtype={"bf16": "bfloat16"}[dtype], quant=quant, compiled=compiled,
                        mode="default", threads=args.threads, prompt=args.prompt, new=args.new, batch=args.batch))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="zoo's second decode batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--only", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    p.add_argument("--quick", action="store_true", help="the tiny model, zoo eager and api, 1 round, short prompts")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peers.json")
    args = p.parse_args()
    formats, kinds = args.formats.split(","), args.only.split(",")
    for name, values, allowed in (("--formats", formats, FORMATS), ("--only", kinds, KINDS)):
        if bad := [v for v in values if v not in allowed]:
            print(f"peers.py: {name} {','.join(bad)}: not one of {', '.join(allowed)}", file=sys.stderr)
            sys.exit(2)
    if args.quick:
        ckpt, kinds = REPO / "checkpoints" / "tiny-llama", ["zoo-eager", "zoo-api"]
        args.rounds, args.prompt, args.new, args.batch = 1, 16, 8, 2
        config = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "vocab_size": 4096,
                  "num_attention_heads": 8, "num_key_value_heads": 2}  # checkpoints/tiny-llama/params.json
    else:
        from generate import make_1b_checkpoint
        ckpt = make_1b_checkpoint()
        config = json.loads((ckpt / "config.json").read_text())
    notes = []
    binary = llama_cpp_bin(args) if "llama.cpp" in kinds else None
    if "llama.cpp" in kinds and binary is None:
        notes.append(f"llama.cpp: absent (no llama-bench in $ZOO_LLAMA_CPP or {LLAMA_CPP_DEFAULT}; "
                     f"../shared/peers/llama-cpp.sh build makes it)")
    elif binary is not None and (why := ensure_gguf(ckpt)):
        notes.append(f"llama.cpp: {why}")
        binary = None
    for note in notes:
        print(note, file=sys.stderr)
    import torch
    from matmul import measure_bandwidth
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth(torch.device("cpu"), (1 << 26) if args.quick else (1 << 30))

    configs = [(kind, fmt) for kind in kinds for fmt in formats
               if (kind != "hf" or fmt == "bf16") and (kind != "llama.cpp" or binary is not None)]
    runs = {}
    for round_ in range(args.rounds):
        for kind, fmt in configs:
            if kind == "llama.cpp":
                r = llama_bench(binary, fmt, args)
            elif kind == "hf":
                r = hf_run(ckpt, args)
            elif kind == "zoo-api":
                from decode import spawn
                r = spawn(str(ckpt), fmt, args.prompt, args.new, 1, args.threads)
            else:
                r = zoo_run(ckpt, fmt, kind == "zoo-compiled", args)
            r.pop("tokens", None)
            print(f"round {round_ + 1}: {kind} {fmt}: {r}", file=sys.stderr, flush=True)
            runs.setdefault(f"{kind} {fmt}", []).append(r)

    table = {}
    for (kind, fmt) in configs:
        ok = [r for r in runs[f"{kind} {fmt}"] if "error" not in r]
        if not ok:
            table[f"{kind} {fmt}"] = {"error": runs[f"{kind} {fmt}"][0]["error"]}
            continue
        row = {k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s", "decode_batch_tok_s")
               if k in ok[0]}
        if kind == "llama.cpp":
            size, n_params = ok[0]["model_size"], ok[0]["n_params"]
            streamed = size * (1 - config["vocab_size"] * config["hidden_size"] / n_params)
        else:
            streamed = weight_bytes(config, fmt)
        row["weights_gb_per_token"] = streamed / 1e9
        row["decode_weights_gb_s"] = row["decode_tok_s"] * streamed / 1e9
        row["decode_share_of_bandwidth"] = row["decode_weights_gb_s"] / bandwidth
        row["rounds"] = len(ok)
        table[f"{kind} {fmt}"] = row
    for name, row in table.items():
        peer = table.get(f"llama.cpp {name.split()[1]}")
        if "error" not in row and peer and "error" not in peer and not name.startswith("llama.cpp"):
            row["prefill_vs_llama_cpp"] = row["prefill_tok_s"] / peer["prefill_tok_s"]
            row["decode_vs_llama_cpp"] = row["decode_tok_s"] / peer["decode_tok_s"]

    print(f"\n{'1.1B' if not args.quick else 'tiny'} on the CPU, {args.threads} threads, batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens, median of {args.rounds} round(s); memory bandwidth {bandwidth:.1f} GB/s")
    print(f"{'configuration':<22} {'prefill tok/s':>13} {'vs llama.cpp':>12} {'decode tok/s':>12} {'vs llama.cpp':>12} "
          f"{'weights GB/s':>12} {'of bandwidth':>12} {f'decode b={args.batch}':>11}")
    for name, row in table.items():
        kind, fmt = name.split()
        label = f"{kind} {PEER_NAMES[fmt] if kind == 'llama.cpp' else fmt}"
        if "error" in row:
            print(f"{label:<22} error: {row['error']}")
            continue
        ratio = lambda k: f"{row[k]:.2f}x" if k in row else "-"  # noqa: E731
        batch = f"{row['decode_batch_tok_s']:.1f}" if "decode_batch_tok_s" in row else "-"
        print(f"{label:<22} {row['prefill_tok_s']:>13.1f} {ratio('prefill_vs_llama_cpp'):>12} "
              f"{row['decode_tok_s']:>12.2f} {ratio('decode_vs_llama_cpp'):>12} {row['decode_weights_gb_s']:>12.1f} "
              f"{row['decode_share_of_bandwidth']:>11.0%} {batch:>11}")
    for note in notes:
        print(note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "notes": notes,
                                    "memory_bandwidth_gb_s": bandwidth, "table": table,
                                    "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

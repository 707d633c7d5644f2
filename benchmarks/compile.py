"""Eager against compiled (zoo.compile) generation, side by side, with the compile time.

    python benchmarks/compile.py                          # tiny (fp32, bf16) and 1b (bf16)
    python benchmarks/compile.py --sizes tiny --rounds 3
    python benchmarks/compile.py --sizes 1b --quant int8,int4 --mode max-autotune

For each model, dtype and quantization, one fresh subprocess per round and configuration (eager and
compiled take turns, round after round); each measures, after one warm-up generation (which, for
the compiled model, is where it compiles: `compile s`):
  prefill tok/s   prompt tokens / time to the first new token, batch 1 (--prompt tokens)
  decode tok/s    new tokens after the first / their time, at batch 1 and --batch, greedy, no stop
and the greedy tokens, which must be the same eager and compiled (fp32; bf16 may drift late).
Medians over --rounds; the table gives compiled / eager. Models: `tiny` is the bundled
checkpoint; `1b` the random TinyLlama-1.1B-shaped LLaMA of benchmarks/generate.py (made once).
Writes benchmarks/results/compile.json. No assertions.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import zoo
spec = json.loads(sys.argv[2])
torch.set_num_threads(spec["threads"])
model = zoo.load(spec["ckpt"], dtype=getattr(torch, spec["dtype"]), device="cpu", quant=spec["quant"])
prompt = [1 + (7 * i) % 1000 for i in range(spec["prompt"])]
def run(batch, n):
    start = time.perf_counter()
    stamps, tokens = [], []
    for t, _ in zoo.steps(model, [prompt] * batch, max_new_tokens=n, stop_ids=set()):
        stamps.append(time.perf_counter())
        tokens.append(t[0].item())
    return stamps[0] - start, batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens
out = {}
start = time.perf_counter()
if spec["compiled"]:
    zoo.compile(model, mode=spec["mode"])
for batch in (1, spec["batch"]):
    run(batch, 3)  # warm-up: compiles prefill and decode for this batch size
out["compile_s"] = time.perf_counter() - start
prefill, decode, tokens = run(1, spec["new"])
out.update(prefill_tok_s=spec["prompt"] / prefill, decode_tok_s=decode, tokens=tokens)
out["decode_batch_tok_s"] = run(spec["batch"], spec["new"])[1]
print(json.dumps(out))
"""


def measure(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", WORKER, str(REPO), json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,1b")
    p.add_argument("--quant", default="", help="also these quantizations (int8,int4) of the 1b model, bf16")
    p.add_argument("--mode", default="default", choices=["default", "max-autotune"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile.json")
    args = p.parse_args()
    configs = []
    for size in args.sizes.split(","):
        if size == "tiny":
            ckpt = str(REPO / "checkpoints" / "tiny-llama")
            configs += [(size, ckpt, dtype, None) for dtype in ("float32", "bfloat16")]
        else:
            from generate import make_1b_checkpoint
            ckpt = str(make_1b_checkpoint())
            configs += [(size, ckpt, "bfloat16", q) for q in [None, *filter(None, args.quant.split(","))]]
    results = {}
    for round_ in range(args.rounds):
        for size, ckpt, dtype, quant in configs:
            for compiled in (False, True):
                spec = dict(ckpt=ckpt, dtype=dtype, quant=quant, compiled=compiled, mode=args.mode, threads=args.threads,
                            prompt=args.prompt, new=args.new, batch=args.batch)
                r = measure(spec)
                print(f"round {round_ + 1}: {size} {dtype} {quant or ''} {'compiled' if compiled else 'eager'}: {r}",
                      file=sys.stderr, flush=True)
                results.setdefault(f"{size} {dtype} {quant or '-'}", {}).setdefault(compiled, []).append(r)
    print(f"\nCPU, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens, median of {args.rounds} rounds, "
          f"mode {args.mode}")
    print(f"{'model dtype quant':<24} {'compile s':>9} {'prefill eager/comp':>19} {'decode b=1 eager/comp':>22} "
          f"{f'decode b={args.batch} eager/comp':>22} {'same tokens':>11}")
    table = {}
    for name, by in results.items():
        ok = [r for r in by[False] + by[True] if "error" not in r]
        if len(ok) < len(by[False]) + len(by[True]):
            print(f"{name:<24} error: {next(r['error'] for r in by[False] + by[True] if 'error' in r)}")
            continue
        med = {c: {k: statistics.median(r[k] for r in by[c]) for k in ("compile_s", "prefill_tok_s", "decode_tok_s",
                                                                         "decode_batch_tok_s")} for c in (False, True)}
        same = all(a["tokens"] == b["tokens"] for a, b in zip(by[False], by[True]))
        table[name] = {"eager": med[False], "compiled": med[True], "same_tokens": same}
        cell = lambda k: f"{med[False][k]:.1f}/{med[True][k]:.1f} {med[True][k] / med[False][k]:.2f}x"  # noqa: E731
        print(f"{name:<24} {med[True]['compile_s']:>9.1f} {cell('prefill_tok_s'):>19} {cell('decode_tok_s'):>22} "
              f"{cell('decode_batch_tok_s'):>22} {str(same):>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "table": table, "runs": {
        k: {str(c): v for c, v in by.items()} for k, by in results.items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

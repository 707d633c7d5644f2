"""The cost of hook points: a plain forward now against the code before a change, side by side.

    python benchmarks/hooks.py                    # bundled tiny model, fp32, 1 thread, baseline = bbbeb6f
    python benchmarks/hooks.py --ckpt DIR --dtype bfloat16 --baseline <commit>

Prefill time (--prompt-tokens) and decode tokens/s at batch 1 (greedy, prefill excluded, best of 3
in each run, median over --repeats runs) for:
  before         the `--baseline` commit (default: the last one before the hooks contract of issue
                 #11; 8fb9a62 is the last before hook points existed), checked out with `git worktree`
                 into a temporary folder and run in its own subprocess
  no hooks       this checkout, `hooks=None` (what every plain forward pays: one `if hooks:` per point)
  one hook       this checkout, a do-nothing hook on blocks.0.resid_post (the cost of resolving hooks)
  logits hooked  this checkout, a do-nothing hook on logits: the prefill then computes the final norm
                 and the output layer at every prompt position instead of the last one only
  collect        this checkout, collect("blocks.*.resid_post") (recording every layer's output)
Each configuration runs in a fresh subprocess, alternated over the repeats. Prints a table and
writes benchmarks/results/hooks.json. No assertions.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import zoo
torch.set_num_threads(int(sys.argv[5]))
model = zoo.load(sys.argv[2], dtype=getattr(torch, sys.argv[3]), device="cpu")
kind, n, prompt_tokens = sys.argv[4], int(sys.argv[6]), int(sys.argv[7])
hooks = None
if kind == "one hook":
    hooks = {"blocks.0.resid_post": lambda x, ctx: None}
elif kind == "logits hooked":
    hooks = {"logits": lambda x, ctx: None}
elif kind == "collect":
    hooks = zoo.hooks.collect("blocks.*.resid_post")
prompt = [1 + i % 500 for i in range(prompt_tokens)]
def run():
    kw = {} if hooks is None else {"hooks": hooks}
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in zoo.steps(model, [prompt], max_new_tokens=n, stop_ids=set(), **kw)]
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])
run()
results = [run() for _ in range(3)]
print(json.dumps([min(r[0] for r in results), max(r[1] for r in results)]))
"""


def measure(code_root: Path, kind: str, args) -> list[float]:
    """[prefill seconds, decode tokens/s] of one configuration, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", WORKER, str(code_root), str(args.ckpt), args.dtype, kind,
                          str(args.threads), str(args.new_tokens), str(args.prompt_tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, default=REPO / "checkpoints" / "tiny-llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--baseline", default="bbbeb6f", help="the commit to compare with (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="1 (default) gives the steadiest numbers on a shared machine")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hooks.json")
    args = p.parse_args()
    runs = {"before": [], "no hooks": [], "one hook": [], "logits hooked": [], "collect": []}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.baseline],
                       check=True, capture_output=True)
        try:
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(measure(before if kind == "before" else REPO, "none" if kind == "before" else kind, args))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=True)
    prefill = {kind: statistics.median(v[0] for v in values) for kind, values in runs.items()}
    decode = {kind: statistics.median(v[1] for v in values) for kind, values in runs.items()}
    print(f"checkpoint {args.ckpt}, {args.dtype}, batch 1, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'code':<14} {'prefill ms':>10} {'vs before':>10} {'decode tok/s':>12} {'vs before':>10}")
    for kind in runs:
        print(f"{kind:<14} {1000 * prefill[kind]:>10.2f} {prefill[kind] / prefill['before']:>10.3f} "
              f"{decode[kind]:>12.1f} {decode[kind] / decode['before']:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "runs [prefill_s, decode_tok_s]": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Tensor parallelism on the CPU: per-rank memory, load time and decode speed at world size 1 vs 2.

    python benchmarks/parallel.py                       # the cached random 1.1B LLaMA (made if missing)
    python benchmarks/parallel.py --ckpt DIR --worlds 1,2,4 --new-tokens 32

For each world size w the script starts `torchrun --standalone --nproc_per_node w` on itself (worker
mode). Every rank: zoo.load (only its slice of every weight is read), then a 32-token prompt and
--new-tokens greedy decode steps at batch 1, timed step by step. Reported per rank:
  load s         wall time of zoo.load
  peak RSS MB    the rank's peak resident size (VmHWM) after loading and generating
  params MB      bytes of the parameters this rank holds (about 1/w of the model)
  decode tok/s   decode steps per second (prefill excluded), the median step time inverted
  collective %   share of decode time spent inside torch.distributed all_reduce / all_gather calls,
                 timed by wrapping those two functions in this script (zoo's code is untouched)
The machine's cores are shared out: each rank gets cores // w threads, so world sizes compete with
the same hardware. Output: a table and benchmarks/results/parallel.json. No assertions.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CKPT = RESULTS / "cache" / "llama-1b-hf-bf16"


def make_checkpoint(directory: Path) -> None:
    """A random-weight LLaMA of TinyLlama-1.1B's shape in bf16 safetensors (as benchmarks/generate.py makes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import zoo
    from zoo import parallel
    parallel.setup()
    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[0] += time.perf_counter() - t
            return out
        return wrapper

    dist.all_reduce, dist.all_gather = timed(dist.all_reduce), timed(dist.all_gather)
    start = time.perf_counter()
    model = zoo.load(args.ckpt, dtype=torch.bfloat16, device="cpu")
    load_s = time.perf_counter() - start
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    prompt = torch.randint(0, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    for _ in zoo.steps(model, [prompt], max_new_tokens=4, stop_ids=set()):  # warm-up
        pass
    stamps = []
    spent[0] = 0.0
    for _ in zoo.steps(model, [prompt], max_new_tokens=args.new_tokens, stop_ids=set()):
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            spent[0] = 0.0  # count collectives of the decode steps only
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = dict(rank=parallel.rank(), world=parallel.world_size(), threads=torch.get_num_threads(),
                  load_s=load_s, peak_rss_mb=peak_rss_mb(), params_mb=params_mb,
                  decode_tok_s=1 / statistics.median(steps), collective_pct=100 * spent[0] / sum(steps))
    Path(args.out).with_suffix(f".rank{parallel.rank()}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS / "parallel.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not (args.ckpt / "config.json").exists() and not (args.ckpt / "params.json").exists():
        print(f"making {args.ckpt} ...", file=sys.stderr)
        make_checkpoint(args.ckpt)
    cores = os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in map(int, args.worlds.split(",")):
            out = Path(tmp) / f"w{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   __file__, "--worker", "--ckpt", str(args.ckpt), "--new-tokens", str(args.new_tokens),
                   "--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // world))}
            subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            rows += [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]
    header = f"{'world':>5} {'rank':>4} {'threads':>7} {'load s':>7} {'peak RSS MB':>11} {'params MB':>9} " \
             f"{'decode tok/s':>12} {'collective %':>12}"
    print(f"checkpoint: {args.ckpt}  cores: {cores}\n{header}")
    for r in rows:
        print(f"{r['world']:>5} {r['rank']:>4} {r['threads']:>7} {r['load_s']:>7.2f} {r['peak_rss_mb']:>11.0f} "
              f"{r['params_mb']:>9.0f} {r['decode_tok_s']:>12.2f} {r['collective_pct']:>12.1f}")
    import torch
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(checkpoint=str(args.ckpt), cores=cores, cpu=platform.processor(),
                                        torch=torch.__version__, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

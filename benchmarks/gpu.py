"""The GPU check: one command, on a machine with one CUDA GPU and no network, in under 8 minutes.

    PYTHONPATH=. python3 benchmarks/gpu.py --out $OUT/gpu.json      # on the GPU machine
    python benchmarks/gpu.py --smoke                                 # here, on the CPU: the same code, tiny sizes

Sections, each timed and kept apart (an error in one is recorded and the next runs), in this order,
skipping what no longer fits --budget seconds:
  tests     the cases that skip here with "needs CUDA" (tests/test_kernels.py, test_quant_widths.py), for real
  parity    CUDA fp32 and bf16 logits of the bundled tiny model against its CPU fp32 logits, and of random
            LLaMA / OPT / GPT-NeoX configs against Hugging Face on the same GPU (fp32 max |diff|; bf16 mean
            |diff| to the fp32 reference, zoo's beside HF's own)
  torchrun  `torchrun --nproc_per_node 1 run.py` through NCCL on the tiny model (exit status and output)
  decode    a random LLaMA-2-7B-shaped model built on the GPU (no checkpoint): decode tok/s at batch 1 and 8,
            zoo eager, zoo compiled (CUDA graphs), Hugging Face on the same weights; then int8 and int4
            (Triton) eager and compiled
  kernels   `python benchmarks/matmul.py` on the GPU at M = 1..16 (its table has % of memory bandwidth)
Prints one table at the end and writes everything to --out (JSON).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import zoo  # noqa: E402
from zoo.models import llama  # noqa: E402

LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, max_seq_len=4096)
SMOKE_7B = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=768, max_seq_len=512)


class Report:
    """Section results, with the time each took; the table printed at the end."""

    def __init__(self, budget: float):
        self.start, self.budget, self.sections, self.rows = time.perf_counter(), budget, {}, []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def run(self, name: str, fn, needs: float, *args):
        if self.left() < needs:
            self.sections[name] = {"skipped": f"{self.left():.0f} s left of the budget, {needs:.0f} s needed"}
            self.rows.append((name, "skipped (time)", ""))
            return
        t = time.perf_counter()
        try:
            self.sections[name] = {"result": fn(self, *args)}
        except Exception as e:  # recorded, and the next section runs
            self.sections[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            self.rows.append((name, "ERROR", f"{type(e).__name__}: {str(e)[:90]}"))
        self.sections[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{name}: {self.sections[name]['seconds']} s]", file=sys.stderr, flush=True)

    def row(self, section: str, what: str, value: str):
        self.rows.append((section, what, value))
        print(f"  {section:<9} {what:<44} {value}", file=sys.stderr, flush=True)


def tests(report: Report, device: str) -> dict:
    files = ["tests/test_kernels.py", "tests/test_quant_widths.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files], cwd=REPO,
                       capture_output=True, text=True, timeout=max(30, report.left() - 200),
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    report.row("tests", " ".join(files), f"exit {r.returncode}: {tail}")
    return {"exit": r.returncode, "stdout_tail": r.stdout[-6000:], "stderr_tail": r.stderr[-3000:]}


def parity(report: Report, device: str) -> dict:
    from helpers import FAMILY_VARIANTS, hf_family, hf_llama, save_hf
    out = {}
    tokens = torch.randint(1, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    cpu = zoo.load("tiny-llama", dtype=torch.float32, device="cpu")(tokens)
    for dtype in (torch.float32, torch.bfloat16):
        got = zoo.load("tiny-llama", dtype=dtype, device=device)(tokens.to(device)).float().cpu()
        out[f"tiny {dtype}"] = diff = (got - cpu).abs().max().item()
        report.row("parity", f"tiny-llama {str(dtype)[6:]} {device} vs CPU fp32", f"max |diff| {diff:.2e}")
    import tempfile
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    for variant in ["llama-gqa", *sorted(FAMILY_VARIANTS)]:
        hf = (hf_llama("gqa") if variant == "llama-gqa" else hf_family(variant))
        with tempfile.TemporaryDirectory() as d:
            save_hf(hf, Path(d))
            hf = hf.to(device)
            with torch.no_grad():
                want = hf(tokens.to(device)).logits.float()
                z32 = zoo.load(d, dtype=torch.float32, device=device)(tokens.to(device))
                z16 = zoo.load(d, dtype=torch.bfloat16, device=device)(tokens.to(device)).float()
                h16 = hf.to(torch.bfloat16)(tokens.to(device)).logits.float()
        fp32 = (z32 - want).abs().max().item()
        bf16, hf_bf16 = (z16 - want).abs().mean().item(), (h16 - want).abs().mean().item()
        out[variant] = {"fp32_max_diff": fp32, "bf16_mean_err": bf16, "hf_bf16_mean_err": hf_bf16}
        report.row("parity", f"{variant} {device} vs HF", f"fp32 {fp32:.1e}; bf16 err {bf16:.4f} (HF {hf_bf16:.4f})")
    return out


def torchrun(report: Report, device: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "run.py",
                        "--max-new-tokens", "8", "--temperature", "0", "--device", device], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    report.row("torchrun", f"nproc 1, {device} ({'NCCL' if device == 'cuda' else 'gloo'})",
               f"exit {r.returncode}: {r.stdout.strip()[-60:]!r}")
    return {"exit": r.returncode, "stdout": r.stdout[-2000:], "stderr": r.stderr[-3000:]}


def random_llama(shape: dict, device: str) -> torch.nn.Module:
    """A zoo LLaMA of `shape` built on the device, bf16, weights ~ N(0, 0.02) (norms 1)."""
    cfg = llama.LlamaConfig(**shape)
    with torch.device("meta"):
        model = llama.Llama(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    model.inv_freq = llama.inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def hf_copy(model: torch.nn.Module, device: str):
    """Hugging Face's LlamaForCausalLM holding the same weights (q/k rows permuted to HF's layout)."""
    import transformers
    c = model.config
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                                   num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                   num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                                   rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    state = {llama.zoo_to_hf(n): llama.zoo_tensor_to_hf(n, t, c) for n, t in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"copying zoo's weights into HF: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def zoo_decode(model, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """(prefill s, decode tok/s) of one greedy generation."""
    ids = [[1 + (7 * i + b) % 30000 for i in range(prompt)] for b in range(batch)]
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in zoo.steps(model, ids, max_new_tokens=new, stop_ids=set())]
    return stamps[0] - start, batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def hf_decode(hf, batch: int, prompt: int, new: int, device: str) -> float:
    ids = torch.tensor([[1 + (7 * i + b) % 30000 for i in range(prompt)] for b in range(batch)], device=device)

    def timed(n):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync()
        return time.perf_counter() - t
    timed(2)
    return batch * (new - 1) / (timed(new) - timed(1))


def decode(report: Report, device: str, shape: dict, prompt: int, new: int) -> dict:
    out = {}
    model = random_llama(shape, device)
    hf = hf_copy(model, device)
    with torch.no_grad():  # the two agree before anything is timed
        tokens = torch.randint(1, 30000 if shape["vocab_size"] > 30000 else shape["vocab_size"], (1, 16), device=device)
        gap = (model(tokens) - hf(tokens).logits.float()).abs().max().item()
    out["zoo_vs_hf_bf16_max_diff"] = gap
    report.row("decode", "zoo vs HF logits (bf16, same weights)", f"max |diff| {gap:.3f}")
    for batch in (1, 8):
        out[f"hf b={batch}"] = rate = hf_decode(hf, batch, prompt, new, device)
        report.row("decode", f"HF transformers bf16 eager b={batch}", f"{rate:.1f} tok/s")
    del hf
    torch.cuda.empty_cache() if device == "cuda" else None
    for scheme in (None, "int8", "int4"):
        if scheme is not None:
            if report.left() < 150:
                report.row("decode", f"{scheme}", "skipped (time)")
                continue
            zoo.quant.quantize(model, scheme, group_size=128)
        name = scheme or "bf16"
        for compiled in (False, True):
            if compiled:
                start = time.perf_counter()
                zoo.compile(model)
                for batch in (1, 8):
                    zoo_decode(model, batch, prompt, 3)  # compiles
                out[f"{name} compile s"] = compile_s = time.perf_counter() - start
                report.row("decode", f"zoo {name} compile (b=1 and 8)", f"{compile_s:.0f} s")
            else:
                zoo_decode(model, 1, prompt, 3)  # warm-up
            for batch in (1, 8):
                prefill, rate = zoo_decode(model, batch, prompt, new)
                out[f"{name} {'compiled' if compiled else 'eager'} b={batch}"] = rate
                report.row("decode", f"zoo {name} {'compiled' if compiled else 'eager'} b={batch}",
                           f"{rate:.1f} tok/s (prefill {prompt * batch / prefill:.0f} tok/s)")
        model.__dict__.pop("compiled", None)  # none where zoo.compile left it eager (int8/int4, no native kernels)
    return out


def kernels(report: Report, device: str, smoke: bool) -> dict:
    path = Path(os.environ.get("OUT", "/tmp")) / "kernels.json"
    args = ["--batches", "1,2,4,8,16", "--json", str(path), "--device", device]
    args += ["--shape", "512,256", "--repeats", "3"] if smoke else ["--models", "7b"]
    r = subprocess.run([sys.executable, "benchmarks/matmul.py", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=max(30, report.left() - 10), env={**os.environ, "PYTHONPATH": str(REPO)})
    report.row("kernels", "benchmarks/matmul.py " + " ".join(args[:2]), f"exit {r.returncode} ({path.name})")
    print(r.stdout[-4000:], file=sys.stderr)
    return {"exit": r.returncode, "stdout": r.stdout[-12000:], "stderr": r.stderr[-3000:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "benchmarks" / "results")) / "gpu.json")
    p.add_argument("--budget", type=float, default=450, help="seconds for all sections (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (a check of this script)")
    p.add_argument("--only", default=None, help="comma-separated sections")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("error: no CUDA GPU here; run with --smoke to check this script on the CPU", file=sys.stderr)
        return 2
    report = Report(args.budget)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    print(f"gpu.py on {info['device']}, torch {info['torch']}", file=sys.stderr)
    shape, prompt, new = (SMOKE_7B, 16, 8) if args.smoke else (LLAMA_7B, 128, 64)
    plan = [("tests", tests, 60, device), ("parity", parity, 40, device), ("torchrun", torchrun, 30, device),
            ("decode", decode, 200, device, shape, prompt, new), ("kernels", kernels, 40, device, args.smoke)]
    only = set(args.only.split(",")) if args.only else None
    for name, fn, needs, *fn_args in plan:
        if only is None or name in only:
            report.run(name, fn, needs, *fn_args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "sections": report.sections, "rows": report.rows}, indent=2))
    print(f"\n{'section':<9} {'what':<44} value")
    for section, what, value in report.rows:
        print(f"{section:<9} {what:<44} {value}")
    print(f"wrote {args.out} ({time.perf_counter() - report.start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

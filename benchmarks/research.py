"""The research instruments side by side with TransformerLens 4.x (and nnsight 0.8 where practical): the same
results where both compute the same thing, and the times as ratios, from one run.

    python benchmarks/research.py            # a random ~200M LLaMA (1024 wide, 12 layers), fp32, 2 threads
    python benchmarks/research.py --quick    # the bundled tiny model: a smoke check in seconds

Instruments (clean/corrupted: random token pairs differing at one position; metric: a logit difference at
the last position, averaged over the batch):
  gradient     d(metric)/d(resid_pre) at every layer: zoo collect(grads=True) + backward; TransformerLens
               backward hooks on blocks.*.hook_resid_pre; nnsight 0.8 `with metric.backward(): x.grad`
  attribution  attribution patching over every head and position: zoo.analysis.attribute(points="z");
               TransformerLens's attribution_patch (attn_head_out nodes); also in forwards' time
  sweep        activation patching of resid_pre by layer and position, and of every head's z at every position:
               zoo.analysis.patch_sweep; TransformerLens's get_act_patch_resid_pre / _attn_head_out_all_pos
The peers are optional (pip install -e ".[bench]"): one that does not import is reported as such. Each
instrument runs zoo, then each peer, `--rounds` times in turn (alternating, the best of each kept: this
is a shared machine). The sweep's sequence is shorter than the others' (--sweep-seq): a peer runs one
forward per patched unit. Writes benchmarks/results/research.json. No assertions.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import zoo  # noqa: E402
from zoo import hooks  # noqa: E402
from zoo.analysis import attribute, patch_sweep  # noqa: E402

BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
           num_key_value_heads=16, max_position_embeddings=512)


def hf_directory(args) -> Path:
    """A Hugging Face directory both zoo and the peers load: the tiny model converted, or the random LLaMA."""
    cache = REPO / "benchmarks" / "results" / "cache"
    if args.quick:
        out = cache / "tiny-llama-hf"
        if not (out / "config.json").exists():
            zoo.save(zoo.load("tiny-llama", dtype=torch.float32), out, format="hf")
        return out
    out = cache / "research-llama-200m"
    if not (out / "config.json").exists():
        import transformers
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BIG))
        model.save_pretrained(out)
        (REPO / "checkpoints" / "tiny-llama" / "tokenizer.model").is_file() and \
            (out / "tokenizer.model").write_bytes((REPO / "checkpoints" / "tiny-llama" / "tokenizer.model").read_bytes())
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def pair(vocab: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, seq // 3] = (clean[:, seq // 3] + 101) % vocab
    return clean, corrupted


def metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 11]).mean()


# ---- zoo ------------------------------------------------------------------------------------------

def zoo_gradient(model, tokens):
    cache = hooks.collect("blocks.*.resid_pre", grads=True)
    metric(model(tokens, hooks=cache)).backward()
    return torch.stack([cache.grads[f"blocks.{i}.resid_pre"] for i in range(len(model.blocks))])


# ---- TransformerLens --------------------------------------------------------------------------------

def tl_gradient(bridge, tokens):
    """TransformerLens's own forward + backward capture (its bridge's tensors at converted points are views the
    forward never consumes, so it hooks the backward itself)."""
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient
    names = [f"blocks.{i}.hook_resid_pre" for i in range(bridge.cfg.n_layers)]
    grads = cache_activation_and_gradient(bridge, tokens, metric, names_filter=names).gradients
    return torch.stack([grads[n] for n in names])


def tl_attribution(bridge, clean, corrupted, layers, seq, heads):
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch
    scores = attribution_patch(bridge, clean, corrupted, lambda logits: metric(logits)).node_scores
    out = torch.zeros(layers, seq, heads)
    for node, score in scores.items():
        if node.kind == "attn_head_out":
            out[node.layer, node.position, node.head] = score
    return out


def tl_sweep(bridge, clean, corrupted, by):
    import transformer_lens.patching as patching
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
        fn = patching.get_act_patch_resid_pre if by == "layer,position" else patching.get_act_patch_attn_head_out_all_pos
        return fn(bridge, corrupted, cache, metric).cpu()


def nnsight_gradient(lm, tokens, layers):
    grads = []
    with lm.trace(tokens):
        inputs = [lm.model.layers[i].inputs[0][0] for i in range(layers)]
        value = metric(lm.output.logits)
        with value.backward():  # gradients arrive last layer first: asked for in that order
            for x in reversed(inputs):
                grads.append(x.grad.save())
    return torch.stack([g.detach() for g in reversed(grads)])


def peers(directory: Path) -> dict:
    """name -> the loaded peer, or the reason it is not there."""
    out = {}
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer
        bridge = TransformerBridge.boot_transformers(str(directory), tokenizer=AutoTokenizer.from_pretrained(directory),
                                                     device="cpu", dtype=torch.float32)
        out["TransformerLens"] = bridge.eval()
    except Exception as e:  # reported in the table: the benchmark runs without the peers
        out["TransformerLens"] = f"not available ({type(e).__name__}: {str(e)[:120]})"
    try:
        from nnsight import LanguageModel
        out["nnsight"] = LanguageModel(str(directory), device_map="cpu", dtype=torch.float32, dispatch=True)
    except Exception as e:
        out["nnsight"] = f"not available ({type(e).__name__}: {str(e)[:120]})"
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the bundled tiny model, small inputs")
    p.add_argument("--batch", type=int, default=None, help="rows (default 4; --quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens for gradient and attribution (default 128; --quick 16)")
    p.add_argument("--sweep-seq", type=int, default=None, help="tokens for the sweeps (default 24; --quick 16)")
    p.add_argument("--sweep-batch", type=int, default=1, help="rows for the sweeps (default 1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "research.json")
    args = p.parse_args()
    batch, seq = args.batch or (2 if args.quick else 4), args.seq or (16 if args.quick else 128)
    sweep_seq = args.sweep_seq or (16 if args.quick else 24)
    torch.set_num_threads(args.threads)
    directory = hf_directory(args)
    model = zoo.load(directory, dtype=torch.float32, device="cpu")
    c = model.config
    others = peers(directory)
    clean, corrupted = pair(c.vocab_size, batch, seq, 0)
    s_clean, s_corrupted = pair(c.vocab_size, args.sweep_batch, sweep_seq, 1)
    tasks = {
        "forward": {"zoo": lambda: torch.no_grad()(model)(clean)},
        "gradient at every resid_pre": {"zoo": lambda: zoo_gradient(model, clean),
                                        "TransformerLens": lambda b: tl_gradient(b, clean),
                                        "nnsight": lambda lm: nnsight_gradient(lm, clean, c.n_layers)},
        "attribution over all heads": {"zoo": lambda: attribute(model, clean, corrupted, metric, points="z")["z"],
                                       "TransformerLens": lambda b: tl_attribution(b, clean, corrupted, c.n_layers,
                                                                                    seq, c.n_heads)},
        "patching sweep, resid_pre layers x positions": {
            "zoo": lambda: patch_sweep(model, s_clean, s_corrupted, metric, by="layer,position"),
            "TransformerLens": lambda b: tl_sweep(b, s_clean, s_corrupted, "layer,position")},
        "patching sweep, heads (z, all positions)": {
            "zoo": lambda: patch_sweep(model, s_clean, s_corrupted, metric, by="head"),
            "TransformerLens": lambda b: tl_sweep(b, s_clean, s_corrupted, "head")},
    }
    results = {}
    for task, runners in tasks.items():
        best, outputs = {}, {}
        for round in range(args.rounds + 1):  # round 0 warms up (first calls allocate and pick kernels): not timed
            for name, fn in runners.items():
                peer = others.get(name) if name != "zoo" else None
                if isinstance(peer, str):
                    continue
                try:
                    seconds, outputs[name] = timed(fn if name == "zoo" else lambda: fn(peer))
                except Exception as e:  # a peer's API that does not do this: said in the table
                    outputs[name] = f"failed ({type(e).__name__}: {str(e)[:120]})"
                    continue
                if round:
                    best[name] = min(best.get(name, float("inf")), seconds)
        row = {"zoo s": best["zoo"]}
        for name in runners:
            if name == "zoo":
                continue
            if name in best:
                row[name] = {"s": best[name], "peer / zoo": best[name] / best["zoo"],
                             "max rel diff": rel(outputs["zoo"], outputs[name])}
            else:
                row[name] = outputs.get(name) or others[name]
        results[task] = row
    forward = results["forward"]["zoo s"]
    results["attribution over all heads"]["zoo / forward"] = results["attribution over all heads"]["zoo s"] / forward
    print(f"{directory.name}: batch {batch} x {seq} tokens (sweeps {args.sweep_batch} x {sweep_seq}), fp32, "
          f"{args.threads} threads, best of {args.rounds} alternating rounds")
    print(f"{'instrument':<46} {'zoo s':>8}  peers (peer s / zoo s, max relative difference)")
    for task, row in results.items():
        cells = []
        for name, v in row.items():
            if name in ("zoo s", "zoo / forward"):
                continue
            cells.append(f"{name} {v['peer / zoo']:.2f}x ({v['max rel diff']:.1e})" if isinstance(v, dict) else
                         f"{name}: {v}")
        extra = f"  [{row['zoo / forward']:.2f} forwards]" if "zoo / forward" in row else ""
        print(f"{task:<46} {row['zoo s']:>8.3f}  {'; '.join(cells)}{extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

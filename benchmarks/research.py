"""The research instruments side by side with TransformerLens 4.x (and nnsight 0.8 where practical): the same
results where both compute the same thing, and the times as ratios, from one run.

    python benchmarks/research.py            # a random ~200M LLaMA (1024 wide, 12 layers), fp32, 2 threads
    python benchmarks/research.py --quick    # the bundled tiny model: a smoke check in seconds
    python benchmarks/research.py --only forward,cache   # the instruments whose names start so

Instruments (clean/corrupted: random token pairs differing at one position; metric: a logit difference at
the last position, averaged over the batch):
  forward      the logits: zoo's forward; TransformerLens's bridge(tokens); nnsight's trace saving lm.output.logits
  resid_post   the residual stream after every block: zoo collect("blocks.*.resid_post"); TransformerLens
               run_with_cache(names_filter=... hook_resid_post); nnsight each layer's output.save()
  every point  every hook point each library has: zoo collect("*"); TransformerLens run_with_cache() (every
               hook, aliases counted once); nnsight tracer.cache(include_inputs=True) (each module's inputs and
               output). Compared on the points both have (TL_POINTS, NNSIGHT_POINTS; q and k moved to zoo's
               interleaved rotary pairing); the row says how many each caches
  ablation     zero one head's z in every layer: zoo ablate(heads=[h]) on blocks.*.z; TransformerLens
               run_with_hooks on blocks.*.attn.hook_z; nnsight zeroes that head's slice of o_proj's input
  steering     greedy generation of --new-tokens tokens with a fixed vector added to one middle layer's
               resid_post at every position: zoo.generate(hooks=add(v)); TransformerLens generate inside
               bridge.hooks(); nnsight generate with the addition at every step (tracer.iter). Same tokens?
  gradient     d(metric)/d(resid_pre) at every layer: zoo collect(grads=True) + backward; TransformerLens
               backward hooks on blocks.*.hook_resid_pre; nnsight 0.8 `with metric.backward(): x.grad`
  attribution  attribution patching over every head and position: zoo.analysis.attribute(points="z");
               TransformerLens's attribution_patch (attn_head_out nodes); also in forwards' time
  sweep        activation patching of resid_pre by layer and position, and of every head's z at every position:
               zoo.analysis.patch_sweep; TransformerLens's get_act_patch_resid_pre / _attn_head_out_all_pos
Agreement: the largest difference relative to the largest magnitude (per point, the worst point), or the
share of generated tokens that are the same. The peers are optional (pip install -e ".[bench]"): one that
does not import is reported as such. Each
instrument runs zoo, then each peer, `--rounds` times in turn (alternating, the best of each kept: this
is a shared machine). The sweep's sequence is shorter than the others' (--sweep-seq): a peer runs one
forward per patched unit. Writes benchmarks/results/research.json. No assertions (tests/test_research_bench.py
checks the agreements of a --quick run).
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

def zoo_cache(model, tokens, *names):
    cache = hooks.collect(*names)
    with torch.no_grad():
        model(tokens, hooks=cache)
    return dict(cache.items())


def zoo_ablated(model, tokens, head):
    with torch.no_grad():
        return model(tokens, hooks={"blocks.*.z": hooks.ablate(heads=[head])})


def zoo_steered(model, tokens, layer, vector, new_tokens):
    out = zoo.generate(model, tokens.tolist(), max_new_tokens=new_tokens, stop_ids=set(),
                       hooks={f"blocks.{layer}.resid_post": hooks.add(vector)})
    return torch.tensor(out)


def zoo_gradient(model, tokens):
    cache = hooks.collect("blocks.*.resid_pre", grads=True)
    metric(model(tokens, hooks=cache)).backward()
    return torch.stack([cache.grads[f"blocks.{i}.resid_pre"] for i in range(len(model.blocks))])


def interleaved(x):
    """q or k (..., head_dim) from Hugging Face's half-split rotary pairing to zoo's interleaved one (zoo/rotary.py)."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


# ---- TransformerLens --------------------------------------------------------------------------------

# zoo's point -> TransformerLens's hook (per block, then the model's own); q and k go through `interleaved`
TL_POINTS = {"resid_pre": "hook_resid_pre", "attn_in": "ln1.hook_out", "q": "attn.hook_q", "k": "attn.hook_k",
             "v": "attn.hook_v", "pattern": "attn.hook_pattern", "z": "attn.hook_z", "attn_out": "hook_attn_out",
             "resid_mid": "hook_resid_mid", "mlp_in": "ln2.hook_out", "mlp_pre": "mlp.hook_pre",
             "mlp_post": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
TL_TOP = {"embed": "hook_embed", "ln_final": "ln_final.hook_out", "logits": "hook_unembed"}


def tl_names(layers: int) -> dict:
    """TransformerLens's hook name -> zoo's point name."""
    out = {tl: zoo for zoo, tl in TL_TOP.items()}
    for i in range(layers):
        out.update({f"blocks.{i}.{tl}": f"blocks.{i}.{zoo}" for zoo, tl in TL_POINTS.items()})
    return out


def tl_forward(bridge, tokens):
    with torch.no_grad():
        return bridge(tokens)


def tl_cache(bridge, tokens, names_filter=None):
    """run_with_cache, keyed by zoo's names where zoo has the point (each hook point once: its aliases dropped)."""
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=names_filter)
    to_zoo, out, seen = tl_names(bridge.cfg.n_layers), {}, set()
    for name in sorted(cache.keys(), key=lambda n: n not in to_zoo):  # the mapped names first
        point = id(bridge.hook_dict.get(name, name))
        if point in seen:
            continue
        seen.add(point)
        x, zoo_name = cache[name], to_zoo.get(name, name)
        out[zoo_name] = interleaved(x) if zoo_name.endswith((".q", ".k")) else x
    return out


def tl_ablated(bridge, tokens, head):
    def zero(z, hook):  # (batch, seq, heads, d_head)
        z[:, :, head] = 0
        return z
    with torch.no_grad():
        return bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{i}.attn.hook_z", zero)
                                                        for i in range(bridge.cfg.n_layers)])


def tl_steered(bridge, tokens, layer, vector, new_tokens, kv_cache=True):
    """generate (its default: with a KV cache, or recomputing the whole sequence each step) inside bridge.hooks()."""
    with torch.no_grad(), bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", lambda x, hook: x + vector)]):
        out = bridge.generate(tokens, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False,
                              return_type="tokens", verbose=False, use_past_kv_cache=kv_cache)
    return out[:, tokens.shape[1]:]


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


# ---- nnsight ----------------------------------------------------------------------------------------

# zoo's point -> (the module under model.model.layers[i], "input" or "output"), then the model's own
NNSIGHT_POINTS = {"resid_pre": ("", "input"), "attn_in": ("input_layernorm", "output"),
                  "q": ("self_attn.q_proj", "output"), "k": ("self_attn.k_proj", "output"),
                  "v": ("self_attn.v_proj", "output"), "z": ("self_attn.o_proj", "input"),
                  "attn_out": ("self_attn.o_proj", "output"), "resid_mid": ("post_attention_layernorm", "input"),
                  "mlp_in": ("post_attention_layernorm", "output"), "mlp_pre": ("mlp.gate_proj", "output"),
                  "mlp_post": ("mlp.down_proj", "input"), "mlp_out": ("mlp", "output"), "resid_post": ("", "output")}
NNSIGHT_TOP = {"embed": ("model.model.embed_tokens", "output"), "ln_final": ("model.model.norm", "output"),
               "logits": ("model.lm_head", "output")}


def nnsight_names(layers: int) -> dict:
    """(nnsight's module path, "input" or "output") -> zoo's point name."""
    out = {where: zoo for zoo, where in NNSIGHT_TOP.items()}
    for i in range(layers):
        for point, (module, which) in NNSIGHT_POINTS.items():
            out[(".".join(filter(None, (f"model.model.layers.{i}", module))), which)] = f"blocks.{i}.{point}"
    return out


def nnsight_forward(lm, tokens):
    with torch.no_grad(), lm.trace(tokens):
        logits = lm.output.logits.save()
    return logits


def nnsight_resid_post(lm, tokens, layers):
    saved = []
    with torch.no_grad(), lm.trace(tokens):
        for i in range(layers):
            saved.append(lm.model.layers[i].output.save())
    return {f"blocks.{i}.resid_post": x for i, x in enumerate(saved)}


def nnsight_cache(lm, tokens, head_dim):
    """Every module's inputs and output (tracer.cache), keyed by zoo's names where zoo has the point."""
    with torch.no_grad(), lm.trace(tokens) as tracer:
        cache = tracer.cache(include_inputs=True)
    to_zoo, out = nnsight_names(len(lm.model.layers)), {}
    for path in cache.keys():
        entry = cache[path]
        for which, x in (("input", entry.input), ("output", entry.output)):
            name = to_zoo.get((path, which), f"{path}.{which}")
            x = x[0] if isinstance(x, tuple) else x  # self_attn returns (output, weights)
            if not isinstance(x, torch.Tensor):
                continue
            if name.endswith((".q", ".k", ".v", ".z")):
                x = x.unflatten(-1, (-1, head_dim))  # (batch, seq, heads, d_head)
                x = interleaved(x) if name.endswith((".q", ".k")) else x
            out[name] = x
    return out


def nnsight_ablated(lm, tokens, head, head_dim):
    with torch.no_grad(), lm.trace(tokens):
        for layer in lm.model.layers:  # o_proj's input: (batch, seq, heads * d_head), the heads' z side by side
            layer.self_attn.o_proj.input[:, :, head * head_dim:(head + 1) * head_dim] = 0
        logits = lm.output.logits.save()
    return logits


def nnsight_steered(lm, tokens, layer, vector, new_tokens):
    with torch.no_grad(), lm.generate(tokens, max_new_tokens=new_tokens, do_sample=False) as tracer:
        for _ in tracer.iter[:new_tokens]:  # one forward per new token: the prefill, then each step
            lm.model.layers[layer].output[:] += vector
        ids = tracer.result.save()
    return ids[:, tokens.shape[1]:]


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


def agreement(ours, theirs) -> dict:
    """How far a peer's result is from zoo's: tokens (the share that are the same), a tensor, or a dict of
    points (the worst of those both have, and how many the peer has)."""
    if isinstance(ours, dict):
        common = [name for name in ours if name in theirs]
        worst = max(common, key=lambda name: rel(ours[name], theirs[name]))
        lacks = sorted({name.rsplit(".", 1)[-1] for name in ours if name not in theirs})
        return {"max rel diff": rel(ours[worst], theirs[worst]), "worst point": worst,
                "points compared": len(common), "points cached": len(theirs), "lacks": lacks}
    if not ours.is_floating_point():
        return {"same tokens": float((ours == theirs).float().mean()) if ours.shape == theirs.shape else 0.0}
    return {"max rel diff": rel(ours, theirs)}


def shown(v: dict) -> str:
    """A peer's cell in the table: its time ratio and its agreement."""
    if "same tokens" in v:
        return f"{v['peer / zoo']:.2f}x (tokens {v['same tokens']:.0%} same)"
    if "points compared" in v:
        lacks = f", lacks {'/'.join(v['lacks'])}" if v["lacks"] else ""
        return (f"{v['peer / zoo']:.2f}x ({v['max rel diff']:.1e} over {v['points compared']} points; "
                f"{v['points cached']} cached{lacks})")
    return f"{v['peer / zoo']:.2f}x ({v['max rel diff']:.1e})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the bundled tiny model, small inputs")
    p.add_argument("--batch", type=int, default=None, help="rows (default 4; --quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens for gradient and attribution (default 128; --quick 16)")
    p.add_argument("--sweep-seq", type=int, default=None, help="tokens for the sweeps (default 24; --quick 16)")
    p.add_argument("--sweep-batch", type=int, default=1, help="rows for the sweeps (default 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens the steered generation makes (default 32; "
                   "--quick 8), after the batch's prompts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated beginnings of instrument names (default: all)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "research.json")
    args = p.parse_args()
    batch, seq = args.batch or (2 if args.quick else 4), args.seq or (16 if args.quick else 128)
    sweep_seq = args.sweep_seq or (16 if args.quick else 24)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    torch.set_num_threads(args.threads)
    directory = hf_directory(args)
    model = zoo.load(directory, dtype=torch.float32, device="cpu")
    c = model.config
    others = peers(directory)
    clean, corrupted = pair(c.vocab_size, batch, seq, 0)
    s_clean, s_corrupted = pair(c.vocab_size, args.sweep_batch, sweep_seq, 1)
    head, middle = c.n_heads // 2, c.n_layers // 2
    steer = torch.randn(c.dim, generator=torch.Generator().manual_seed(2))
    tasks = {
        "forward": {"zoo": lambda: torch.no_grad()(model)(clean),
                    "TransformerLens": lambda b: tl_forward(b, clean),
                    "nnsight": lambda lm: nnsight_forward(lm, clean)},
        "cache every resid_post": {
            "zoo": lambda: zoo_cache(model, clean, "blocks.*.resid_post"),
            "TransformerLens": lambda b: tl_cache(b, clean, lambda name: name.endswith("hook_resid_post")),
            "nnsight": lambda lm: nnsight_resid_post(lm, clean, c.n_layers)},
        "cache every point": {"zoo": lambda: zoo_cache(model, clean, "*"),
                              "TransformerLens": lambda b: tl_cache(b, clean),
                              "nnsight": lambda lm: nnsight_cache(lm, clean, c.head_dim)},
        f"zero-ablate head {head} in every layer": {"zoo": lambda: zoo_ablated(model, clean, head),
                                                    "TransformerLens": lambda b: tl_ablated(b, clean, head),
                                                    "nnsight": lambda lm: nnsight_ablated(lm, clean, head, c.head_dim)},
        f"steered greedy generation, {new_tokens} tokens": {
            "zoo": lambda: zoo_steered(model, clean, middle, steer, new_tokens),
            "TransformerLens": lambda b: tl_steered(b, clean, middle, steer, new_tokens),
            "TransformerLens (use_past_kv_cache=False)": lambda b: tl_steered(b, clean, middle, steer, new_tokens,
                                                                              kv_cache=False),
            "nnsight": lambda lm: nnsight_steered(lm, clean, middle, steer, new_tokens)},
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
    if args.only:
        wanted = args.only.split(",")
        tasks = {task: runners for task, runners in tasks.items() if any(task.startswith(w) for w in wanted)}
        if "forward" not in tasks:
            print(f"research.py: --only {args.only}: the forward is the unit of the others; include it", file=sys.stderr)
            sys.exit(2)
    results = {}
    for task, runners in tasks.items():
        best, outputs = {}, {}
        for round in range(args.rounds + 1):  # round 0 warms up (first calls allocate and pick kernels): not timed
            for name, fn in runners.items():
                peer = others.get(name.split(" (")[0]) if name != "zoo" else None  # "peer (a variant)": that peer
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
        if isinstance(outputs["zoo"], dict):
            row["zoo points cached"] = len(outputs["zoo"])
        for name in runners:
            if name == "zoo":
                continue
            if name in best:
                row[name] = {"s": best[name], "peer / zoo": best[name] / best["zoo"],
                             **agreement(outputs["zoo"], outputs[name])}
            else:
                row[name] = outputs.get(name) or others[name.split(" (")[0]]
        results[task] = row
    forward = results["forward"]["zoo s"]
    if "attribution over all heads" in results:
        results["attribution over all heads"]["zoo / forward"] = results["attribution over all heads"]["zoo s"] / forward
    print(f"{directory.name}: batch {batch} x {seq} tokens (sweeps {args.sweep_batch} x {sweep_seq}; generation "
          f"{new_tokens} new tokens, resid_post of layer {middle} steered), fp32, "
          f"{args.threads} threads, best of {args.rounds} alternating rounds")
    print(f"{'instrument':<46} {'zoo s':>8}  peers (peer s / zoo s, max relative difference)")
    for task, row in results.items():
        cells = []
        for name, v in row.items():
            if name.startswith("zoo "):
                continue
            cells.append(f"{name} {shown(v)}" if isinstance(v, dict) else f"{name}: {v}")
        extra = f"  [{row['zoo / forward']:.2f} forwards]" if "zoo / forward" in row else ""
        extra += f"  [zoo caches {row['zoo points cached']}]" if "zoo points cached" in row else ""
        print(f"{task:<46} {row['zoo s']:>8.3f}  {'; '.join(cells)}{extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

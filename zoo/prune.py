"""Capability pruning by activations (taker's selective pruning; Pochinkov & Schoots, arXiv 2403.01267): delete
the MLP neurons and attention heads that serve a "cripple" text set more than a "focus" set, through the weights.

    python -m zoo prune tiny-llama --focus prose.txt --cripple code.txt --ff-frac 0.02 --steps 2 --out pruned/
    focus, cripple = zoo.stats.collect_stats(model, f), zoo.stats.collect_stats(model, c)
    s = score(focus, cripple, "mlp_post", "abs")          # (n_layers, d_mlp): cripple_stat / (focus_stat + eps)
    neurons = select(s, 0.02)                             # (n_layers, d_mlp) bool: the top 2% of the whole model
    delete(model, neurons=neurons, means=focus)           # W_out rows (and inputs) zeroed, focus means folded in

Scores (per unit, from zoo.stats' statistics; the larger, the more the unit serves the cripple set):
    abs   mean |x|        freq  how often x > 0     sqrt  mean sqrt|x|     std  standard deviation
    rms   sqrt(mean x^2)  each cripple_stat / (focus_stat + eps)
    mean  |cripple mean - focus mean|                 rand  uniform random: the baseline
The top fraction is taken across the whole model (units deleted before are never taken again). A head's
score is the mean (or median) of its d_head dimensions' scores on z.

Deletion goes through the model map (zoo.weights), so every loader and saver sees a plain model: a deleted
neuron's W_out row, its W_in and W_gate columns and b_in (b_gate) entries are zeroed; a deleted head's W_O
rows. With means (offset "mean"), the focus mean of each deleted unit times its W_out row (W_O rows) is
added to the layer's output bias, which is what replacing the unit by that mean at every position does. A
layer with no bias gets one through its family's config flag (LLaMA's mlp_bias / attention_bias: zero biases
on the other projections of that kind too), so the config a saved checkpoint carries builds the same model.
A quantized model's layers keep their stored weights through prune's forwards (keep_stored_weights), and each
edit re-quantizes the rows it changed, the deleted weights exact zeros (QuantLinear.requantize).
"""
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zoo import parallel
from zoo import stats as zstats
from zoo.checks import integer, require
from zoo.console import say
from zoo.loader import build
from zoo.models import family_of
from zoo.quant import QuantLinear
from zoo.weights import weights

RATIOS = {"abs": "mean_abs", "freq": "freq_pos", "sqrt": "mean_sqrt", "std": "std", "rms": None}
SCORINGS = (*RATIOS, "mean", "rand")
HEADS_BY = ("mean", "median")
EPS = 1e-6


def _stat(stats: dict, point: str, name: str | None) -> torch.Tensor:
    if name is None:  # rms: sqrt(mean x^2) = sqrt(std^2 + mean^2)
        return (stats[f"{point}.std"].square() + stats[f"{point}.mean"].square()).sqrt()
    return stats[f"{point}.{name}"]


def score(focus: dict | None, cripple: dict | None, point: str, scoring: str = "abs", eps: float = EPS,
          generator: torch.Generator | None = None, shape: tuple | None = None) -> torch.Tensor:
    """Each unit's score at `point` (mlp_post: (n_layers, d_mlp); z: (n_layers, n_heads, d_head)), float64.
    "rand" needs no statistics: `shape` (or either statistics' shape) and `generator`."""
    require(scoring in SCORINGS, "scoring", scoring, f"one of {', '.join(SCORINGS)}")
    if scoring == "rand":
        shape = shape or (focus or cripple)[f"{point}.mean"].shape
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    if scoring == "mean":
        return (cripple[f"{point}.mean"] - focus[f"{point}.mean"]).abs()
    name = RATIOS[scoring]
    return _stat(cripple, point, name) / (_stat(focus, point, name) + eps)


def head_scores(dim_scores: torch.Tensor, by: str = "mean") -> torch.Tensor:
    """(n_layers, n_heads, d_head) scores of z's dimensions -> (n_layers, n_heads), by their mean or median."""
    require(by in HEADS_BY, "heads_by", by, "'mean' or 'median' of a head's dimensions' scores")
    return dim_scores.mean(-1) if by == "mean" else dim_scores.median(-1).values


def select(scores: torch.Tensor, frac: float, deleted: torch.Tensor | None = None) -> torch.Tensor:
    """A bool mask of scores' shape: the round(frac * all units) highest-scoring units not yet `deleted`."""
    require(isinstance(frac, (int, float)) and 0 <= frac <= 1, "frac", frac, "a fraction in 0..1")
    k = round(frac * scores.numel())
    flat = scores.flatten().clone()
    if deleted is not None:
        flat[deleted.flatten()] = -math.inf
        k = min(k, int((~deleted).sum()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(k).indices] = True
    return chosen.view(scores.shape)


def add_biases(model: nn.Module, layers: list[str]) -> list[str]:
    """Give each linear layer named in `layers` (e.g. "blocks.0.mlp.w_out") a bias where it has none, by setting the
    config flag of the model's family that gives it one (each bias-named flag that is False is tried on a model
    built on the meta device) and adding every zero bias that flag adds; returns the flags set."""
    missing = {n for n in layers if model.get_submodule(n).bias is None}
    cfg, flags, name = model.config, [], family_of(model)
    for flag in [f.name for f in dataclasses.fields(cfg) if "bias" in f.name and getattr(cfg, f.name) is False]:
        if not missing:
            break
        built = build(name, dataclasses.replace(cfg, **{flag: True}), Path("config"))
        given = {n for n in missing if built.get_submodule(n).bias is not None}
        if not given:
            continue
        setattr(cfg, flag, True)
        flags.append(flag)
        missing -= given
        like = next(model.parameters())
        for module_name, module in built.named_modules():
            ours = model.get_submodule(module_name)
            if isinstance(getattr(module, "bias", None), torch.Tensor) and getattr(ours, "bias", 0) is None:
                ours.bias = nn.Parameter(torch.zeros(module.bias.shape, dtype=like.dtype, device=like.device),
                                         requires_grad=False)
    if missing:
        raise ValueError(f"the {name} family has no config flag that gives {sorted(missing)[0]} a bias, which "
                         f"offset='mean' folds the deleted units' means into")
    return flags


@torch.no_grad()
def delete(model: nn.Module, neurons: torch.Tensor | None = None, heads: torch.Tensor | None = None,
           means: dict | None = None) -> None:
    """Delete neurons ((n_layers, d_mlp) bool) and heads ((n_layers, n_heads) bool) through the weights; with
    `means` (zoo.stats of the focus set: mlp_post.mean, z.mean) fold each deleted unit's mean into the output
    bias (module docstring)."""
    n = model.config.n_layers
    neurons = torch.zeros(n, model.config.d_mlp, dtype=torch.bool) if neurons is None else neurons.cpu()
    heads = torch.zeros(n, model.config.n_heads, dtype=torch.bool) if heads is None else heads.cpu()
    if means is not None:
        add_biases(model, [f"blocks.{i}.mlp.w_out" for i in range(n) if neurons[i].any()] +
                   [f"blocks.{i}.attn.wo" for i in range(n) if heads[i].any()])
    W = weights(model)
    for i in range(n):
        mlp, attn = f"blocks.{i}.mlp.", f"blocks.{i}.attn."
        js = neurons[i].nonzero()[:, 0].tolist()
        if js:
            W_out = W[mlp + "W_out"]
            if means is not None:
                mean = means["mlp_post.mean"][i, js].to(torch.float64)
                W[mlp + "b_out"] += (mean @ W_out[js].double()).to(W_out.dtype)
            W_out[js] = 0
            for name in ("W_in", "W_gate"):
                if mlp + name in W:
                    W[mlp + name][:, js] = 0
            for name in ("b_in", "b_gate"):
                if mlp + name in W:
                    W[mlp + name][js] = 0
        hs = heads[i].nonzero()[:, 0].tolist()
        if hs:
            W_O = W[attn + "W_O"]
            if means is not None:
                mean = means["z.mean"][i, hs].to(torch.float64)  # (heads, d_head)
                W[attn + "b_O"] += torch.einsum("hd,hdD->D", mean, W_O[hs].double()).to(W_O.dtype)
            W_O[hs] = 0


@torch.inference_mode()
def evaluate(model: nn.Module, windows: list[list[int]], batch: int = 8) -> dict:
    """Next-token prediction over the windows (each position predicts the next token of its window):
    top-1 and top-10 accuracy, loss (mean NLL, nats), perplexity, and how many tokens were predicted."""
    device = next(model.parameters()).device
    hits1 = hits10 = count = 0
    nll = torch.zeros((), dtype=torch.float64)
    for tokens, left_pad in zstats.batches(windows, batch, device):
        logits = model(tokens, left_pad=left_pad)[:, :-1]  # (batch, seq - 1, vocab): slot t predicts slot t + 1
        slots = torch.arange(tokens.shape[1] - 1, device=device)
        real = slots[None] >= (left_pad[:, None] if left_pad is not None else 0)
        logits, target = logits[real.expand(tokens.shape[0], -1)], tokens[:, 1:][real.expand(tokens.shape[0], -1)]
        nll += F.cross_entropy(logits, target, reduction="sum").double().cpu()
        top = logits.topk(min(10, logits.shape[-1]), dim=-1).indices
        hits1 += int((top[:, 0] == target).sum())
        hits10 += int((top == target[:, None]).any(-1).sum())
        count += target.numel()
    loss = nll.item() / count
    return {"tokens": count, "top1": hits1 / count, "top10": hits10 / count, "loss": loss, "ppl": math.exp(loss)}


def split(windows: list[list[int]], held_out: float) -> tuple[list[list[int]], list[list[int]]]:
    """(windows for statistics, held-out windows for evaluation): every 1/held_out-th window held out, spread
    through the file (window i when floor((i + 1) * held_out) > floor(i * held_out))."""
    require(0 < held_out < 1, "held_out", held_out, "a fraction between 0 and 1")
    out = ([], [])
    for i, w in enumerate(windows):
        out[math.floor((i + 1) * held_out) > math.floor(i * held_out)].append(w)
    require(all(out), "windows", len(windows), "enough windows for both statistics and evaluation (2 or more)")
    return out


def keep_stored_weights(model: nn.Module) -> None:
    """Make every quantized layer keep its stored weight through forwards (QuantLinear.keep_stored), so that
    deletion can edit it after statistics and evaluation ran; an error if one has let it go already."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.quantized is None:
                raise ValueError(f"{name}: this {m.scheme.name} layer let its stored weight go at the model's first "
                                 f"forward, so pruning cannot edit it: load the model again and prune it before it "
                                 f"runs")
            m.keep_stored = True


def prune(model: nn.Module, focus: tuple[list, list], cripple: tuple[list, list], ff_frac: float = 0.02,
          attn_frac: float = 0.0, scoring: str = "abs", steps: int = 1, offset: str | None = None,
          recollect: bool = True, heads_by: str = "mean", eps: float = EPS, batch: int = 8, seed: int = 0,
          report: Callable[[str], None] | None = None) -> list[dict]:
    """Prune `model` in place for `steps` steps. focus, cripple: (windows for statistics, held-out windows) each
    (`split`). Each step collects both sets' statistics (on the model as pruned so far; only before the first
    step without `recollect`), scores, deletes the top ff_frac of the model's neurons and attn_frac of its heads
    (offset "mean": focus means folded in), and evaluates both held-out sets. Returns one record per step, step
    0 the model as it came: units deleted so far (in all and per layer) and each set's `evaluate`. report(text)
    is told the table so far and the counts per layer after each step."""
    require(scoring in SCORINGS, "scoring", scoring, f"one of {', '.join(SCORINGS)}")
    require(offset in (None, "mean"), "offset", offset, "None or 'mean' (the focus mean folded into the bias)")
    require(heads_by in HEADS_BY, "heads_by", heads_by, "'mean' or 'median'")
    for name, frac in (("ff_frac", ff_frac), ("attn_frac", attn_frac)):
        require(isinstance(frac, (int, float)) and 0 <= frac <= 1, name, frac, "a fraction in 0..1")
    integer("steps", steps, low=1)
    keep_stored_weights(model)
    c = model.config
    deleted = {"neurons": torch.zeros(c.n_layers, c.d_mlp, dtype=torch.bool),
               "heads": torch.zeros(c.n_layers, c.n_heads, dtype=torch.bool)}
    points = [p for p, frac in (("mlp_post", ff_frac), ("z", attn_frac)) if frac > 0]
    generator, stats, records = torch.Generator().manual_seed(seed), None, []
    for step in range(steps + 1):
        if step > 0:
            if (scoring != "rand" or offset == "mean") and points and (stats is None or recollect):
                stats = [zstats.collect_stats(model, windows, points, batch) for windows, _ in (focus, cripple)]
            f, cr = stats or (None, None)
            new = {"neurons": torch.zeros_like(deleted["neurons"]), "heads": torch.zeros_like(deleted["heads"])}
            if ff_frac > 0:
                s = score(f, cr, "mlp_post", scoring, eps, generator, (c.n_layers, c.d_mlp))
                new["neurons"] = select(s, ff_frac, deleted["neurons"])
            if attn_frac > 0:
                s = score(f, cr, "z", scoring, eps, generator, (c.n_layers, c.n_heads, c.d_head))
                new["heads"] = select(head_scores(s, heads_by), attn_frac, deleted["heads"])
            delete(model, new["neurons"], new["heads"], means=f if offset == "mean" else None)
            deleted = {k: deleted[k] | new[k] for k in deleted}
        records.append({"step": step, **{k: int(v.sum()) for k, v in deleted.items()},
                        **{f"{k}_per_layer": v.sum(1).tolist() for k, v in deleted.items()},
                        "focus": evaluate(model, focus[1], batch), "cripple": evaluate(model, cripple[1], batch)})
        if report is not None:
            r = records[-1]
            report(f"{table(records)}\n  deleted per layer: neurons {r['neurons_per_layer']}, heads "
                   f"{r['heads_per_layer']}")
    return records


def table(records: list[dict]) -> str:
    """One row per step: units deleted so far, then each set's top-1, top-10, loss and perplexity, and the
    change of top-1 from step 0."""
    header = ["step", "neurons", "heads"] + [f"{s} {m}" for s in ("focus", "cripple")
                                             for m in ("top1", "top10", "loss", "ppl", "dtop1")]
    rows = [header]
    for r in records:
        row = [str(r["step"]), f"{r['neurons']:,}", f"{r['heads']:,}"]
        for s in ("focus", "cripple"):
            e, base = r[s], records[0][s]["top1"]
            row += [f"{e['top1']:.4f}", f"{e['top10']:.4f}", f"{e['loss']:.4f}", f"{e['ppl']:.2f}",
                    f"{e['top1'] - base:+.4f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


# ---- python -m zoo prune -------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("ckpt")
    p.add_argument("--focus", required=True, help="texts to keep (a text file, or .jsonl of {\"text\": ...})")
    p.add_argument("--cripple", required=True, help="texts to lose (the same kinds of file)")
    p.add_argument("--ff-frac", type=float, default=0.02, help="fraction of all MLP neurons deleted per step "
                                                               "(default: %(default)s)")
    p.add_argument("--attn-frac", type=float, default=0.0, help="fraction of all heads per step (default: 0)")
    p.add_argument("--scoring", choices=SCORINGS, default="abs", help="(default: %(default)s)")
    p.add_argument("--heads-by", choices=HEADS_BY, default="mean", help="a head's score from its dimensions'")
    p.add_argument("--steps", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens per set for statistics (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens per set (default: %(default)s)")
    p.add_argument("--offset", choices=("none", "mean"), default="none", help="mean: fold the focus mean of each "
                                                                              "deleted unit into the output bias")
    p.add_argument("--no-recollect", action="store_true", help="statistics once, before the first step")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="for --scoring rand (default: %(default)s)")
    p.add_argument("--json", default="prune.json", help="the steps' records (default: %(default)s)")
    p.add_argument("--out", help="write the pruned model here as a Hugging Face checkpoint (zoo.save; a quantized "
                                 "one in zoo's quantized format), never over its source")
    p.add_argument("--force", action="store_true", help="replace a checkpoint zoo wrote in --out")
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def command(args) -> int:
    """python -m zoo prune: the prune loop on --focus and --cripple, its table, its JSON and the pruned model."""
    import zoo
    from zoo.output import check_output
    for flag in ("tokens", "eval_tokens", "ctx", "batch", "steps"):
        integer("--" + flag.replace("_", "-"), getattr(args, flag), low=1)
    source = zoo.find_checkpoint(args.ckpt)
    if args.out is not None:
        check_output(args.out, source, args.force)  # before any work: never the source, nor in or around it
    model = zoo.load(args.ckpt, dtype=args.dtype, device=args.device)
    ctx, held_out = min(args.ctx, model.config.max_seq_len), args.eval_tokens / (args.tokens + args.eval_tokens)
    sets = [split(zstats.text_windows(model, path, args.tokens + args.eval_tokens, ctx), held_out)
            for path in (args.focus, args.cripple)]
    records = prune(model, *sets, ff_frac=args.ff_frac, attn_frac=args.attn_frac, scoring=args.scoring,
                    steps=args.steps, offset=None if args.offset == "none" else args.offset,
                    recollect=not args.no_recollect, heads_by=args.heads_by, batch=args.batch, seed=args.seed,
                    report=say)
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    settings["checkpoint"] = str(source.resolve())
    if parallel.rank() == 0:
        Path(args.json).write_text(json.dumps({"settings": settings, "steps": records}, indent=1) + "\n")
    if args.out is not None:  # a quantized model in zoo's quantized format (zoo.quant.save), any other as HF's
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        zoo.save(model, args.out, format="zoo" if quantized else "hf", force=args.force, source=source)
    say(f"wrote {args.json}" + (f" and the pruned model to {args.out}" if args.out else ""))
    return 0

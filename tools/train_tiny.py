"""Train the bundled demo checkpoint `checkpoints/tiny-llama/` from scratch, on the CPU.

    python tools/train_tiny.py --steps 1000

(`--steps 20 --out /tmp/tiny` is a quick trial that reports the speed.) Everything comes from what
ships with CPython 3.11, so the run needs no download and gives the same files on the same machine:

1. corpus     the text of `pydoc_data.topics` (the "help()" topics, sorted by key) and the docstrings
              of the standard library, read with `ast` from the .py files (the modules are not
              imported). One document per topic and per source file; every 20th is held out.
2. tokenizer  a SentencePiece BPE of 4096 pieces trained on the train split, LLaMA style:
              identity normalization, byte fallback, unk 0 / bos 1 / eos 2, no pad.
3. model      zoo's own `Llama` (dim 256, 6 layers, 8 query heads sharing 2 key/value heads: ~6.6 M
              parameters), fresh weights.
4. train      fp32 AdamW, linear warmup then cosine decay, on random 256-token windows of the
              train split (documents joined as <s> text </s>).
5. evaluate   held-out perplexity over fixed, non-overlapping 256-token windows.
6. save       Meta's layout: params.json, consolidated.00.pth (bf16, Meta's tensor names),
              tokenizer.model; then reloaded with `zoo.load` and measured again; README.md and
              train_log.json record the figures.
"""
import argparse
import ast
import io
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

import zoo
from zoo.formats.meta import zoo_to_meta
from zoo.models.llama import Llama, LlamaConfig

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}  # any path component


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "checkpoints" / "tiny-llama"), help="checkpoint directory")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps, at least 10)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args()


# ---- 1. corpus ----------------------------------------------------------------------------------

def topic_documents() -> list[str]:
    """The English text of Python's help() topics: the language reference, one topic a document."""
    from pydoc_data.topics import topics
    return [topics[key].strip() for key in sorted(topics)]


def docstrings(path: Path) -> list[str] | None:
    """The module, class and function docstrings of one .py file, in source order (None: unparsable)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)  # dedented, stripped
            if doc:
                found.append((getattr(node, "lineno", 0), doc))
    return [doc for _, doc in sorted(found, key=lambda x: x[0])]


def stdlib_documents() -> list[str]:
    """One document per standard-library source file: its docstrings, blank-line separated.

    Files are walked in sorted order; tests, idlelib and site-packages are skipped, and so is a
    docstring already seen (the ~100 generated codecs in encodings/ share most of theirs).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, docs = set(), []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        found = docstrings(path)
        fresh = [d for d in found or [] if d not in seen]
        seen.update(fresh)
        if fresh:
            docs.append("\n\n".join(fresh))
    return docs


def build_corpus() -> tuple[list[str], list[str]]:
    docs = topic_documents() + stdlib_documents()
    train = [d for i, d in enumerate(docs) if i % 20 != 19]
    held_out = [d for i, d in enumerate(docs) if i % 20 == 19]
    return train, held_out


# ---- 2. tokenizer -------------------------------------------------------------------------------

def train_tokenizer(train_docs: list[str], vocab: int, path: Path) -> spm.SentencePieceProcessor:
    """SentencePiece BPE on the lines of the train split, set up as LLaMA's tokenizer was.

    Identity normalization and no whitespace folding keep indentation; a newline (never inside a
    training line) is encoded by byte fallback as <0x0A>, so code examples keep their shape.
    One thread, every line used, no sampling: the same input gives the same model.
    """
    lines = [line.rstrip() for doc in train_docs for line in doc.split("\n")]
    lines = [line for line in lines if line.strip()]
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab,
        character_coverage=0.99995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str]) -> torch.Tensor:
    """All documents as one stream of token ids: <s> doc </s> <s> doc </s> ..."""
    ids = []
    for doc in docs:
        ids += [sp.bos_id(), *sp.encode(doc), sp.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


# ---- 3. model -----------------------------------------------------------------------------------

def make_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=vocab_size, multiple_of=256,
                       norm_eps=1e-5, rope_theta=10000.0, max_seq_len=512, tie_embeddings=False)


def init_weights(model: Llama) -> None:
    """GPT-2 style: N(0, 0.02), the projections back into the residual stream scaled by 1/sqrt(2 n_layers).

    (nn.Embedding's default N(0, 1) is far too large for a model this small.) Norm weights stay 1.
    """
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = residual_std if name.endswith(("attn.wo.weight", "mlp.w_out.weight")) else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)


# ---- 4. train -----------------------------------------------------------------------------------

def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to peak/10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (full causal forward, no cache)."""
    logits = model(tokens[:, :-1])  # (batch, seq, vocab) fp32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model, stream: torch.Tensor, args) -> dict:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; norm weights are not decayed
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = args.warmup if args.warmup is not None else max(10, args.steps // 20)
    batches = torch.Generator().manual_seed(0)  # which windows each step reads
    model.train()
    start, cpu_start, window_loss, losses = time.time(), time.process_time(), 0.0, []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, warmup, args.lr)
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=batches)
        tokens = torch.stack([stream[s : s + args.seq_len + 1] for s in starts.tolist()])
        loss = next_token_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window_loss += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            elapsed = time.time() - start
            losses.append((step + 1, window_loss / n))
            print(f"step {step + 1:5d}/{args.steps}  loss {window_loss / n:.3f}  lr {opt.param_groups[0]['lr']:.2e}"
                  f"  {elapsed:6.0f}s  {(step + 1) / elapsed:.2f} steps/s", flush=True)
            window_loss = 0.0
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    model.eval()
    return {"steps": args.steps, "warmup": warmup, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "steps_per_s": round(args.steps / seconds, 3), "final_train_loss": round(losses[-1][1], 4),
            "loss_curve": [[s, round(l, 4)] for s, l in losses]}


# ---- 5. evaluate --------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """exp(mean token loss) over fixed non-overlapping windows: window i predicts tokens
    i*seq_len+1 .. (i+1)*seq_len from the ones before it in the window; every token is predicted once
    (the last, shorter window included)."""
    total, count = 0.0, 0
    windows = [stream[i : i + seq_len + 1] for i in range(0, len(stream) - 1, seq_len)]
    full = [w for w in windows if len(w) == seq_len + 1]
    rest = [w for w in windows if len(w) != seq_len + 1]
    groups = [torch.stack(full[i : i + batch]) for i in range(0, len(full), batch)] + [w[None] for w in rest]
    for tokens in groups:
        logits = model(tokens[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += tokens[:, 1:].numel()
    return math.exp(total / count)


def sample_text(model, prompt: str = "The for statement") -> str:
    ids = model.tokenizer.encode(prompt, bos=True)
    new = zoo.generate(model, [ids], max_new_tokens=60, temperature=0.7, top_p=0.9, seed=0)[0]
    return prompt + model.tokenizer.decode(ids[-1:] + new)[len(model.tokenizer.decode(ids[-1:])):]


# ---- 6. save ------------------------------------------------------------------------------------

def save_meta(model: Llama, out: Path) -> None:
    """params.json + consolidated.00.pth (Meta's names, bf16, each tensor its own small storage)."""
    cfg = model.config
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "vocab_size": cfg.vocab_size, "multiple_of": cfg.multiple_of, "norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    state = {zoo_to_meta(name): t.detach().to(torch.bfloat16).contiguous().clone()
             for name, t in model.state_dict().items()}
    torch.save(state, out / "consolidated.00.pth")


def write_readme(out: Path, log: dict) -> None:
    cfg = make_config(log["vocab_size"])
    c, t, e = log["corpus"], log["train"], log["eval"]
    sizes = "\n".join(f"| `{name}` | {size:,} |" for name, size in log["files"].items())
    text = f"""# tiny-llama

A {log['params'] / 1e6:.2f} M-parameter LLaMA trained from scratch on the CPU, bundled as zoo's demo
and test checkpoint. It writes English-ish text about Python: plausible, rarely correct. It is
stored in Meta's layout (`params.json`, `consolidated.00.pth` with Meta's tensor names in bf16,
a SentencePiece `tokenizer.model`).

```python
import torch, zoo
model = zoo.load("tiny-llama", dtype=torch.float32)
ids = model.tokenizer.encode("The for statement", bos=True)
print(model.tokenizer.decode(zoo.generate(model, [ids], max_new_tokens=60, temperature=0.7, top_p=0.9, seed=0)[0]))
```

## How it was made

    {log['command']}

with torch {log['torch']} and Python {log['python']}: {t['seconds'] / 60:.1f} minutes of training on {log['threads']} CPU threads
({t['cpu_seconds'] / 60:.1f} CPU-minutes over both threads; wall time grows when the machine is shared).
All of it is in `tools/train_tiny.py`:

- **Corpus**: the text of `pydoc_data.topics` (Python's `help()` topics, sorted by key) and the
  docstrings of CPython {log['python']}'s standard library, read with `ast` (tests, idlelib and
  site-packages skipped, repeated docstrings dropped). One document per topic and per source file;
  every 20th document is held out.
  Train: {c['train_docs']:,} documents, {c['train_chars']:,} characters, {c['train_tokens']:,} tokens.
  Held out: {c['held_out_docs']:,} documents, {c['held_out_chars']:,} characters, {c['held_out_tokens']:,} tokens.
- **Tokenizer**: SentencePiece BPE, {log['vocab_size']} pieces, trained on the train split; byte fallback,
  identity normalization (indentation kept, newlines as `<0x0A>`), unk 0, bos 1, eos 2, no pad.
- **Model**: `LlamaConfig({log['config']})`: {log['params']:,} parameters, untied output,
  grouped-query attention ({cfg.n_heads} query heads share {cfg.n_kv_heads} key/value heads), SwiGLU hidden size {log['hidden_dim']}.
- **Training**: fp32, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {log['lr']},
  {t['warmup']} warmup steps then cosine decay to a tenth, gradient clipping 1.0, {log['batch']} random windows
  of {log['seq_len']} tokens a step, `torch.manual_seed(0)`. {t['steps']:,} steps
  ({t['steps'] * log['batch'] * log['seq_len']:,} tokens, about {t['steps'] * log['batch'] * log['seq_len'] / c['train_tokens']:.1f} epochs)
  in {t['seconds']:.0f} s ({t['steps_per_s']} steps/s). Final train loss {t['final_train_loss']:.3f}.

## Held-out perplexity

Token-level, over fixed non-overlapping {log['seq_len']}-token windows of the whole held-out split:

| weights | perplexity |
|---|---|
| fp32, as trained | {e['held_out_ppl_fp32']:.2f} |
| bf16 as saved, reloaded with `zoo.load(..., dtype=torch.float32)` | {e['held_out_ppl_bf16_reloaded']:.2f} |

(Train-split perplexity of the fp32 weights, same windows, first {e['train_ppl_tokens']:,} tokens: {e['train_ppl_fp32']:.2f}.
The gap is over-fitting: the corpus is small and was seen about {t['steps'] * log['batch'] * log['seq_len'] / c['train_tokens']:.0f} times.)

## Sample

`temperature=0.7, top_p=0.9, seed=0`, 60 new tokens, from the reloaded checkpoint:

```
{log['sample']}
```

## Files

| file | bytes |
|---|---|
{sizes}

`train_log.json` holds the same figures and the loss curve.
"""
    (out / "README.md").write_text(text)


def main():
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. corpus
    train_docs, held_docs = build_corpus()
    print(f"corpus: {len(train_docs)} train documents ({sum(map(len, train_docs)):,} chars), "
          f"{len(held_docs)} held out ({sum(map(len, held_docs)):,} chars)", flush=True)

    # 2. tokenizer
    sp = train_tokenizer(train_docs, args.vocab, out / "tokenizer.model")
    train_stream, held_stream = encode_documents(sp, train_docs), encode_documents(sp, held_docs)
    print(f"tokenizer: {sp.vocab_size()} pieces; train {len(train_stream):,} tokens, "
          f"held out {len(held_stream):,} tokens ({sum(map(len, train_docs)) / len(train_stream):.2f} chars/token)",
          flush=True)

    # 3. model
    cfg = make_config(sp.vocab_size())
    model = Llama(cfg)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; {cfg}", flush=True)

    # 4. train
    trained = train(model, train_stream, args)

    # 5. evaluate
    ppl_fp32 = perplexity(model, held_stream, args.seq_len)
    train_ppl_tokens = min(len(train_stream), len(held_stream))
    train_ppl = perplexity(model, train_stream[:train_ppl_tokens], args.seq_len)
    print(f"held-out perplexity (fp32): {ppl_fp32:.2f}   train perplexity (fp32, first {train_ppl_tokens:,} "
          f"tokens): {train_ppl:.2f}", flush=True)

    # 6. save, reload, measure again
    save_meta(model, out)
    reloaded = zoo.load(out, dtype=torch.float32, device="cpu")
    ppl_bf16 = perplexity(reloaded, held_stream, args.seq_len)
    sample = sample_text(reloaded)
    print(f"held-out perplexity (bf16 saved, reloaded as fp32): {ppl_bf16:.2f}\nsample: {sample}", flush=True)

    log = {
        "command": "python tools/train_tiny.py " + " ".join(sys.argv[1:]),
        "python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__.split("+")[0],
        "threads": args.threads, "params": n_params, "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim,
        "config": ", ".join(f"{k}={getattr(cfg, k)!r}" for k in
                            ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps",
                             "rope_theta", "max_seq_len")),
        "lr": args.lr, "batch": args.batch, "seq_len": args.seq_len,
        "corpus": {"train_docs": len(train_docs), "train_chars": sum(map(len, train_docs)),
                   "train_tokens": len(train_stream), "held_out_docs": len(held_docs),
                   "held_out_chars": sum(map(len, held_docs)), "held_out_tokens": len(held_stream)},
        "train": trained,
        "eval": {"held_out_ppl_fp32": round(ppl_fp32, 3), "held_out_ppl_bf16_reloaded": round(ppl_bf16, 3),
                 "train_ppl_fp32": round(train_ppl, 3), "train_ppl_tokens": train_ppl_tokens},
        "sample": sample,
    }
    files = ["params.json", "consolidated.00.pth", "tokenizer.model"]
    log["files"] = {name: os.path.getsize(out / name) for name in files}
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_readme(out, log)
    print(f"wrote {out}: " + ", ".join(f"{n} {s:,} B" for n, s in log["files"].items()))


if __name__ == "__main__":
    main()

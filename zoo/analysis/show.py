"""Pictures of one prompt in one self-contained HTML file: the tokens, the attention pattern of every layer and head,
the logit lens as a heatmap and direct logit attribution as a bar chart, each figure exportable as PNG.

    html = zoo.analysis.show(model, "The for statement")      # a str: the whole page
    zoo.analysis.save_html(model, "The for statement", "report.html")
    python -m zoo show tiny-llama --prompt "The for statement" --out report.html

The page is show.html beside this file with the numbers in it as JSON (<script id="zoo-data">): no network, no
CDN, one file that opens offline. Its script is plain JS drawing on canvases. The numbers are the hook points'
(collect's, gather=True: every head), the logit lens's and logit_attribution's, each rounded to DIGITS decimals.
"""
import html
import json
import os
from pathlib import Path

import torch

from zoo import hooks, parallel
from zoo.analysis.lens import logit_attribution, logit_lens
from zoo.checks import DTYPES, integer, require

DIGITS = 6  # decimals of every number in the page: the page's values are within 5e-7 of zoo's
TEMPLATE = Path(__file__).with_name("show.html")


def show(model, prompt, answer: int | None = None, wrong: int | None = None, k: int = 5) -> str:
    """The page for `prompt` (text, encoded with BOS, or a list of token ids) as a str. The bar chart attributes
    the logit of `answer` minus that of `wrong` at the last position; by default the model's first and second
    choices there. Under tensor parallelism every rank computes it and gets the same page."""
    ids = _ids(model, prompt)
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    cache = hooks.collect("blocks.*.pattern", gather=True)
    with torch.no_grad():
        logits = model(tokens, hooks=cache)[0, -1]
    if answer is None:  # the model's first choice against its second, unless wrong is given
        first, second = logits.topk(2).indices.tolist()
        answer, wrong = first, second if wrong is None else wrong
    lens = logit_lens(model, tokens, k=k)
    attr = logit_attribution(model, tokens, answer, wrong)
    data = {
        "model": f"{type(model).__name__}: {len(model.blocks)} layers, {model.config.n_heads} heads, "
                 f"d_model {model.config.dim}",
        "tokens": _pieces(model, ids), "ids": ids,
        "patterns": [[[_round(row[: q + 1]) for q, row in enumerate(head)] for head in cache[f"blocks.{i}.pattern"][0]]
                     for i in range(len(model.blocks))],
        "lens": {"names": lens.names, "probs": _round(lens.probs[:, 0]), "ids": lens.tokens[:, 0].tolist(),
                 "tokens": [[[_piece(model, t) for t in top] for top in row] for row in lens.tokens[:, 0].tolist()]},
        "attribution": {"names": attr.names, "shares": _round(attr.shares[:, 0]), "total": _round(attr.total[0]),
                        "logit_diff": _round(attr.logit_diff[0]), "position": attr.position,
                        "answer": _piece(model, answer), "wrong": None if wrong is None else _piece(model, wrong)},
    }
    page = TEMPLATE.read_text(encoding="utf-8")
    title = html.escape(f"zoo: {prompt if isinstance(prompt, str) else ' '.join(map(str, ids))}"[:100])
    return page.replace("{{title}}", title).replace("{{data}}", _script_json(data))


def save_html(model, prompt, path, **kwargs) -> Path:
    """Write show(model, prompt, **kwargs) to `path` (an .html file; replaced if it exists, through a temporary
    sibling renamed into place). Under tensor parallelism rank 0 writes; every rank returns the path."""
    path = page_path(path)
    page = show(model, prompt, **kwargs)
    if parallel.rank() == 0:
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, path)
    return path


def page_path(path) -> Path:
    """`path` as the file to write a page to, checked first: an .html file in a directory that exists."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: name the .html file to write")
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{path}: the page is written to an .html file (name one ending in .html)")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the directory {path.parent} does not exist")
    return path


def _ids(model, prompt) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError("show: this model has no tokenizer; pass the prompt as a list of token ids")
        ids = model.tokenizer.encode(prompt, bos=True)
    else:
        ids = list(prompt)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"show: the prompt is text or a list of token ids, not {prompt!r}")
    if not ids or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError("show: the prompt is empty")
    return ids


def _piece(model, token: int) -> str:
    """One token's text (the tokenizer's decoding of it alone), or [id] where that is empty or there is no tokenizer."""
    tok = model.tokenizer
    if tok is None:
        return f"[{token}]"
    if token == tok.bos_id:
        return "<bos>"
    return tok.decode([token]) or f"[{token}]"


def _pieces(model, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded prompt (so a SentencePiece token keeps its leading space); a
    token whose text is not a prefix extension (a split UTF-8 character) is shown alone."""
    out, before = [], ""
    for n, token in enumerate(ids):
        if model.tokenizer is None or token == model.tokenizer.bos_id:
            out.append(_piece(model, token))
            continue
        text = model.tokenizer.decode([t for t in ids[: n + 1] if t != model.tokenizer.bos_id])
        out.append(text[len(before):] if text.startswith(before) and len(text) > len(before) else _piece(model, token))
        before = text
    return out


def _round(t):
    """A tensor (or a number) as nested lists of floats rounded to DIGITS decimals."""
    values = t.tolist() if isinstance(t, torch.Tensor) else t
    if isinstance(values, list):
        return [_round(v) for v in values]
    return round(float(values), DIGITS)


def _script_json(data) -> str:
    """JSON that an HTML <script> block holds as it is: no '<', '>' or '&' to end it early."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def add_arguments(p) -> None:
    """python -m zoo show's flags."""
    p.add_argument("ckpt")
    p.add_argument("--prompt", required=True, help="the text to show (encoded with BOS)")
    p.add_argument("--out", required=True, help="the .html file to write (replaced if it exists)")
    p.add_argument("--k", type=int, default=5, help="top tokens per cell of the logit lens (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="the model's dtype (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def command(args) -> int:
    """python -m zoo show: the page of --prompt written to --out (rank 0 under torchrun); the output, the prompt
    and --k are checked before the weights are loaded."""
    import zoo
    path = page_path(args.out)
    require(args.prompt.strip() != "", "--prompt", args.prompt, "some text to show")
    integer("--k", args.k, low=1)
    model = zoo.load(args.ckpt, dtype=DTYPES[args.dtype], device=args.device)
    if model.tokenizer is None:
        raise ValueError(f"{zoo.find_checkpoint(args.ckpt)}: no tokenizer to read --prompt with")
    save_html(model, args.prompt, path, k=args.k)
    if parallel.rank() == 0:
        print(f"wrote {path} ({path.stat().st_size / 2**10:.0f} KiB): it opens in a browser, offline")
    return 0

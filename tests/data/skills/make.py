"""Writes code.txt and prose.txt, two text sets that differ in kind, from what the bundled tiny-llama was trained on
(checkpoints/tiny-llama/README.md: Python 3.11.7's help topics and standard-library docstrings):

    code.txt    code: the interactive examples (">>>" blocks) of the standard library's docstrings, and the indented
                code blocks of the help topics (not grammar rules), dedented; a blank line between blocks
    prose.txt   prose: the help topics' paragraphs that are neither indented nor headings

    python tests/data/skills/make.py [--chars 60000]     (run with Python 3.11.7 for the same files)

Each file keeps every k-th of its blocks, in order, for about --chars characters.
"""
import argparse
import ast
import os
import re
import sysconfig
import textwrap
from pathlib import Path

import pydoc_data.topics

CODE_START = re.compile(r"(>>>|\.\.\.|def |class |for |while |if |elif |else:|return|import |from |with |try:|except|"
                        r"finally:|raise|pass|yield|async |await |print\(|lambda|@|del |global |nonlocal |assert )")
SKIPPED = ("test", "idlelib", "site-packages", "tkinter", "lib2to3")


def code_line(line: str) -> bool:
    s = line.strip()
    return bool(CODE_START.match(s) or re.search(r"[=()\[\]{}#]", s))


def paragraphs(text: str) -> list[list[str]]:
    return [[line for line in p.split("\n") if line.strip()] for p in re.split(r"\n\s*\n", text)]


def topic_blocks() -> tuple[list[str], list[str]]:
    code, prose = [], []
    for key in sorted(pydoc_data.topics.topics):
        for lines in paragraphs(pydoc_data.topics.topics[key]):
            if len(lines) < 2 or set(lines[-1]) <= set("*=-"):
                continue
            if all(line.startswith("   ") for line in lines):
                if "::=" not in "".join(lines) and sum(map(code_line, lines)) >= 0.8 * len(lines):
                    code.append(textwrap.dedent("\n".join(lines)))
            elif not any(line.startswith(" ") for line in lines):
                prose.append("\n".join(lines))
    return code, prose


def doctest_blocks() -> list[str]:
    blocks, seen = [], set()
    root = sysconfig.get_paths()["stdlib"]
    for directory, _, files in sorted(os.walk(root)):
        if any(part in directory for part in SKIPPED):
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(directory, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and doc not in seen:
                        seen.add(doc)
                        blocks += [textwrap.dedent("\n".join(lines)) for lines in paragraphs(doc)
                                   if len(lines) >= 2 and lines[0].lstrip().startswith(">>>")]
    return blocks


def spread(blocks: list[str], chars: int) -> str:
    """Every k-th block, k chosen so that about `chars` characters are kept, in order: the whole source sampled."""
    k = max(1, round(sum(len(b) + 2 for b in blocks) / chars))
    return "\n\n".join(blocks[::k]) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=60_000)
    args = p.parse_args()
    code, prose = topic_blocks()
    here = Path(__file__).parent
    mixed = [b for pair in zip(doctest_blocks(), code + [""] * 10_000) for b in pair if b]  # the two kinds of code
    (here / "code.txt").write_text(spread(mixed, args.chars))
    (here / "prose.txt").write_text(spread(prose, args.chars))

"""Mutation testing: plant realistic bugs in zoo, one at a time, and check that the tests catch each one.

    python tools/mutate.py                      # every mutant, on the committed tree (git archive HEAD)
    python tools/mutate.py rope-linear-factor   # some of them, by name (or a prefix: `rotary-`)
    python tools/mutate.py --worktree           # on the tracked files as they are in the checkout now
    python tools/mutate.py --list               # names, files and tests
    python tools/mutate.py --check              # only: is every snippet still there, exactly once? (a second)

A mutant is one file, an exact snippet of it, its replacement, and the few tests that should fail
because of it (so that a run takes seconds, not the whole suite). Each is applied alone to a fresh
copy of the repository in a temporary directory (never to the checkout: others edit it), and the
tests run there with `python -m pytest -x`; the copy's `zoo` is the one imported (checked once).
Before the mutants, the union of their tests runs once on the unmutated copy: a test that fails
there would "kill" every mutant and mean nothing.

killed: the tests failed (or timed out). survived: they passed with the bug in place, so either a
test is missing or the mutated line does nothing (dead code); fix one or the other. A snippet that
is not found exactly once is an error, not a skip: the list must not rot as the code changes.

Exit status: 0 every mutant killed; 1 some survived; 2 a stale snippet, an unknown test or a
failing baseline. The kill rate goes in the README ("Testing") and stays at 100%.

The hooks (zoo/hooks.py) and quantization (zoo/quant, zoo/kernels) mutants target behaviour any
rewrite keeps (int8's scale per row, int4's step, mean versus zero ablation): extend the list when
those modules settle.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    file: str  # relative to the repository root
    old: str  # an exact snippet of the file, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


def t(module: str, *tests: str) -> tuple[str, ...]:
    """Node ids of tests in tests/{module}.py (the whole file when none are named)."""
    path = f"tests/{module}.py"
    return tuple(f"{path}::{name}" for name in tests) or (path,)


PARITY = t("test_llama_parity", "test_logits_match_hf_fp32")
FAMILIES = t("test_families", "test_logits_match_hf_fp32")

MUTANTS = [
    # ---- models/llama.py ------------------------------------------------------------------------
    Mutant("llama-meta-w1-w3-swapped", "zoo/models/llama.py",
           '"w1": "w_gate", "w3": "w_in"', '"w1": "w_in", "w3": "w_gate"',
           t("test_checkpoints", "test_meta_layout_equals_hf_layout")),
]


def find(m: Mutant, root: Path) -> str:
    """The mutated text of m.file under root; an error when the snippet is not there exactly once."""
    text = (root / m.file).read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"error: mutant {m.name}: its snippet is found {count} times in {m.file} (wanted once); "
                         f"update it in tools/mutate.py:\n{m.old}")
    return text.replace(m.old, m.new)


def export(dest: Path, worktree: bool) -> None:
    """The repository's tracked files into dest: as committed (HEAD), or as they are in the checkout."""
    dest.mkdir(parents=True)
    if worktree:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            if (REPO / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, dest / name)
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def copy_of(base: Path, dest: Path) -> Path:
    """A copy of base whose files are hard links (cheap); a file to change is unlinked first, never edited."""
    shutil.copytree(base, dest, copy_function=os.link)
    return dest


def pytest(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, time.perf_counter() - start, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""


def check_imports_copy(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", "import zoo; print(zoo.__file__)"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"error: the copy imports zoo from {out}, not from {root}: mutants would not be tested")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run, by name or name prefix (default: all)")
    p.add_argument("--worktree", action="store_true", help="copy the checkout's tracked files, not HEAD")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--check", action="store_true", help="only check that every snippet is found exactly once")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated copy")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests (default: %(default)s)")
    args = p.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("error: two mutants share a name")
    chosen = [m for m in MUTANTS if not args.names or any(m.name.startswith(n) for n in args.names)]
    if not chosen:
        raise SystemExit(f"error: no mutant named {', '.join(args.names)}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:28s} {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="zoo-mutants-") as tmp:
        base = Path(tmp) / "base"
        export(base, args.worktree)
        for m in chosen:
            find(m, base)  # every snippet checked before anything runs
        if args.check:
            print(f"{len(chosen)} mutant snippet(s) found, each exactly once")
            return 0
        check_imports_copy(base)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
            rc, seconds, out = pytest(copy_of(base, Path(tmp) / "baseline"), tests, args.timeout * 3)
            if rc != 0:
                print(out[-4000:])
                raise SystemExit(f"error: the mutants' tests fail without any mutant (exit {rc}): fix that first")
            print(f"baseline: {len(tests)} test selection(s) pass unmutated ({seconds:.0f} s)", flush=True)

        survived, started = [], time.perf_counter()
        for m in chosen:
            root = copy_of(base, Path(tmp) / m.name)
            target = root / m.file
            text = find(m, root)
            target.unlink()  # a hard link to base: replace the file, do not write through it
            target.write_text(text)
            rc, seconds, out = pytest(root, m.tests, args.timeout)
            if rc in (4, 5):  # usage error (a test id not found) or nothing collected
                print(out[-2000:])
                raise SystemExit(f"error: mutant {m.name}: its tests {m.tests} were not found (pytest exit {rc})")
            verdict = "survived" if rc == 0 else "killed"
            if rc == 0:
                survived.append(m)
            print(f"{verdict:8s} {seconds:5.1f}s  {m.name}{'  (timeout)' if rc == 'timeout' else ''}", flush=True)
            shutil.rmtree(root)

    killed = len(chosen) - len(survived)
    print(f"\nkilled {killed} of {len(chosen)} mutants ({100 * killed / len(chosen):.1f}%) "
          f"in {time.perf_counter() - started:.0f} s")
    for m in survived:
        print(f"SURVIVED {m.name}: {m.file}: {m.old!r} -> {m.new!r}; tests {' '.join(m.tests)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's examples run as written: every ```python block, and every command line of its ```bash blocks
that needs nothing but the bundled model (the others name checkpoints a test machine does not have, torchrun
or an interactive terminal; the lists below say which, so a new example is run or listed, never forgotten).

A python block names a model it did not load (`model`, `tokens`, `prompts`, ...): a short preamble on the
bundled tiny-llama provides them, and a checkpoint the README names but that is not bundled (llama-2-7b-chat)
is the bundled one here. Everything runs in a scratch directory holding `checkpoints/` and `run.py` as links.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
STAND_INS = {'"llama-2-7b-chat"': '"tiny-llama"'}  # checkpoints the README names, not bundled
PREAMBLE = """
import torch, zoo
model = zoo.load("tiny-llama", dtype=torch.float32)
tokens = torch.tensor([model.tokenizer.encode("The for statement", bos=True)])
prompts = [tokens[0].tolist(), tokens[0, :3].tolist()]
corrupted = torch.tensor([model.tokenizer.encode("The if statement", bos=True)] * 2)[:, :tokens.shape[1]]
text = open("text.txt").read()
"""
# command lines of ```bash blocks that are not run here, and why
NOT_RUN = {
    "pip install": "installs (CI's own first step)",
    "python -m pytest": "the test suite itself",
    "python tools/mutate.py": "minutes of mutation testing",
    "torchrun": "a checkpoint not bundled (tensor parallelism is tested in test_parallel.py)",
    "llama-2-7b": "a checkpoint not bundled",
    "path/to/": "a placeholder path",
    "--interactive": "an interactive terminal",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def command_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not any(marker in line for marker in NOT_RUN):
                lines.append(line)
    return lines


def scratch(root: Path) -> Path:
    """A directory to run examples in: the bundled checkpoints, run.py, a text and a prompts file."""
    import pydoc_data.topics
    (root / "checkpoints").symlink_to(REPO / "checkpoints")
    (root / "run.py").symlink_to(REPO / "run.py")
    (root / "tests").symlink_to(REPO / "tests")  # the README's text sets, tests/data/skills
    topics = pydoc_data.topics.topics
    (root / "text.txt").write_text("\n\n".join(topics[k] for k in ("for", "if", "while", "try", "with")))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                ("The for statement", "A list is", "Exceptions are raised")))
    return root


@pytest.fixture(scope="module")
def for_python(tmp_path_factory):
    return scratch(tmp_path_factory.mktemp("readme-python"))


@pytest.fixture(scope="module")
def for_commands(tmp_path_factory):  # one directory for all: `quantize ... tiny-int4`, then `--ckpt tiny-int4`
    return scratch(tmp_path_factory.mktemp("readme-commands"))


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_the_blocks_are_found():
    assert len(blocks("python")) >= 7 and len(command_lines()) >= 8
    assert any("hooks.patch" in b for b in blocks("python"))  # the hooks example is among them


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(for_python, index):
    code = blocks("python")[index]
    for name, stand_in in STAND_INS.items():
        code = code.replace(name, stand_in)
    done = run_python(PREAMBLE + code, for_python)
    assert done.returncode == 0, f"README python block {index}:\n{code}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("line", command_lines())
def test_command_line_runs(for_commands, line):
    python = str(Path(sys.executable).parent)
    done = subprocess.run(line, shell=True, cwd=for_commands, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": python + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, f"README command {line!r}:\n{done.stderr[-3000:]}"

"""The shape of the code that the README's tour promises: forwards that read as their architecture, modules
short enough to read, no import cycle inside zoo. Counted with `ast`: a code line is a line of a statement,
docstrings and comments excluded."""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import zoo

ROOT = Path(zoo.__file__).resolve().parent
FAMILY_FILES = ("llama.py", "opt.py", "gpt_neox.py")


def code_lines(function: ast.FunctionDef) -> int:
    lines = set()
    body = function.body[1:] if ast.get_docstring(function) else function.body
    for statement in body:
        for node in ast.walk(statement):
            if hasattr(node, "lineno") and not isinstance(node, ast.expr_context):
                lines.update(range(node.lineno, getattr(node, "end_lineno", node.lineno) + 1))
    source = function_source_lines(function)
    return sum(1 for n in lines if n in source and not source[n].lstrip().startswith("#"))


def function_source_lines(function: ast.FunctionDef) -> dict[int, str]:
    return {n: line for n, line in enumerate(_SOURCE[function].splitlines(), 1)}


_SOURCE: dict = {}


def methods(path: Path, cls: str, name: str) -> list[ast.FunctionDef]:
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and (node.name == cls or cls == "*"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    _SOURCE[item] = text
                    found.append(item)
    return found


@pytest.mark.parametrize("family", FAMILY_FILES)
def test_each_forward_reads_as_its_architecture(family):
    path = ROOT / "models" / family
    tree = ast.parse(path.read_text())
    (model,) = [c.name for c in tree.body if isinstance(c, ast.ClassDef) and any(
        isinstance(b, ast.Name) and b.id == "Decoder" for b in c.bases)]  # the family's model class
    (forward,), (block,) = methods(path, model, "forward"), methods(path, "Block", "forward")
    assert code_lines(forward) <= 15, family
    assert code_lines(block) <= 12, family


def test_attention_forward_is_short():
    (forward,) = methods(ROOT / "attention.py", "Attention", "forward")
    assert code_lines(forward) <= 15


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The zoo modules `name` imports, at the top or inside functions, but its own ancestor packages (which
    Python initialises first whatever the order, so a submodule importing from them is no cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def test_no_import_cycle_inside_zoo():
    specs = {m.name: Path(importlib.util.find_spec(m.name).origin) for m in pkgutil.walk_packages([str(ROOT)], "zoo.")}
    specs["zoo"] = ROOT / "__init__.py"
    graph = {name: imports(name, path, set(specs)) for name, path in specs.items()}
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node not in done:
            path.append(node)
            for dep in sorted(graph[node]):
                visit(dep)
            path.pop()
            done.add(node)

    for name in sorted(graph):
        visit(name)

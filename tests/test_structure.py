"""The shape of the code that the README's tour promises: forwards that read as their architecture, modules
short enough to read, no import cycle inside zoo. Counted with `ast`: a code line is a line of a statement,
docstrings and comments excluded."""
import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import zoo
from zoo.models import FAMILIES

ROOT = Path(zoo.__file__).resolve().parent


def code_lines(path: Path, cls: str) -> int:
    """Code lines of `cls.forward` in the module at `path`."""
    text = path.read_text()
    (function,) = [item for node in ast.parse(text).body if isinstance(node, ast.ClassDef) and node.name == cls
                   for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "forward"]
    body = function.body[1:] if ast.get_docstring(function) else function.body
    lines = {n for statement in body for node in ast.walk(statement) if hasattr(node, "lineno")
             for n in range(node.lineno, node.end_lineno + 1)}
    source = text.splitlines()
    return sum(1 for n in lines if not source[n - 1].lstrip().startswith("#"))  # comments inside a statement


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_forward_reads_as_its_architecture(name):
    model = FAMILIES[name].model
    model = next(c for c in model.__mro__ if "forward" in c.__dict__)  # Qwen's and Mistral's are LLaMA's
    path = Path(inspect.getsourcefile(model))
    assert code_lines(path, model.__name__) <= 15, name
    assert code_lines(path, "Block") <= 12, name


def test_attention_forward_is_short():
    assert code_lines(ROOT / "attention.py", "Attention") <= 15


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

"""tools/mutate.py's list stays in step with the code: every mutant's snippet is found exactly once in
the files as they are, and its tests exist. (The sweep itself, `python tools/mutate.py`, takes minutes.)"""
import importlib.util

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutate)


@pytest.mark.parametrize("mutant", mutate.MUTANTS, ids=lambda m: m.name)
def test_snippet_found_once_and_tests_exist(mutant):
    assert mutate.find(mutant, ROOT) != (ROOT / mutant.file).read_text()
    for test in mutant.tests:
        path, _, name = test.partition("::")
        name = name.partition("[")[0]  # a parametrized test's id names its function
        assert (ROOT / path).is_file(), test
        assert not name or f"def {name}(" in (ROOT / path).read_text(), test


def test_every_core_module_has_mutants():
    files = {m.file for m in mutate.MUTANTS}
    for module in ("zoo/models/llama.py", "zoo/models/opt.py", "zoo/models/gpt_neox.py", "zoo/forward.py", "zoo/cache.py",
                   "zoo/kernels/attention.py", "zoo/mlp.py",
                   "zoo/rotary.py", "zoo/norm.py", "zoo/parallel/layers.py", "zoo/parallel/comm.py",
                   "zoo/quant/int8.py", "zoo/quant/int4.py", "zoo/kernels/__init__.py", "zoo/sampling.py", "zoo/hooks/points.py",
                   "zoo/hooks/builtins.py",
                   "zoo/formats/lazy.py", "zoo/formats/gpt_neox.py"):
        assert module in files, module

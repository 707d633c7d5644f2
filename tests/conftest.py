import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "checkpoints" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    assert (TINY / "params.json").exists(), f"the bundled checkpoint {TINY} is missing"
    return TINY


# ---- no silent skips ------------------------------------------------------------------------------
# A skipped test is a test that did not run: CI's green must not hide one. The only reason allowed is
# the hardware this machine lacks; anything else (a missing package, an importorskip, a file not
# found) fails the run, after pytest's own summary has listed it (-rs, pytest.ini).
ALLOWED_SKIPS = ("needs CUDA",)
_bad_skips: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(ALLOWED_SKIPS):
            _bad_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):  # a whole module skipped at import (pytest.importorskip, skip(allow_module_level))
    _record(report)


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _bad_skips:
        terminalreporter.section("skips not allowed", sep="=", red=True, bold=True)
        for nodeid, reason in _bad_skips:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(f"{len(_bad_skips)} test(s) or module(s) skipped for a reason other than "
                              f"{' / '.join(map(repr, ALLOWED_SKIPS))}: the run fails (tests/conftest.py)", red=True)

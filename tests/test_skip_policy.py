"""The test command fails when a test is skipped for any reason but "needs CUDA" (tests/conftest.py)."""
from conftest import ROOT

CONFTEST = (ROOT / "tests" / "conftest.py").read_text()


def run(pytester, source):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_x=source)
    return pytester.runpytest("-rs")


def test_needs_cuda_skip_is_allowed(pytester):
    result = run(pytester, 'import pytest\n\n'
                           '@pytest.mark.skipif(True, reason="needs CUDA")\ndef test_gpu(): pass\n\n'
                           'def test_cpu(): pass\n')
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == 0
    assert "skips not allowed" not in result.stdout.str()


def test_other_skip_fails_the_run_and_is_listed(pytester):
    result = run(pytester, 'import pytest\n\n'
                           'def test_a(): pytest.skip("the data file is missing")\n\n'
                           'def test_b(): pass\n')
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*skips not allowed*", "test_x.py::test_a: the data file is missing",
                                 "1 test(s) or module(s) skipped for a reason other than 'needs CUDA'*"])


def test_module_level_importorskip_fails_the_run(pytester):
    pytester.makepyfile(test_y="def test_other(): pass\n")  # the rest of the suite passes
    result = run(pytester, 'import pytest\n\npytest.importorskip("no_such_package_zoo")\n\n'
                           'def test_a(): pass\n')
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*skips not allowed*", "test_x.py: could not import 'no_such_package_zoo'*"])


def test_a_failure_keeps_its_exit_status(pytester):
    result = run(pytester, 'import pytest\n\n'
                           'def test_a(): pytest.skip("no reason")\n\n'
                           'def test_b(): assert False\n')
    assert result.ret == 1
    result.assert_outcomes(failed=1, skipped=1)

"""Session guards (a pytest plugin, loaded by conftest.py): a run meant to test something that tested nothing fails.

The interpreter run. CI's second command, the README's ``TRITON_INTERPRET=1 python -m pytest -q -m triton``, exists to
run the Triton kernels under the interpreter. Every Triton case carries a skip condition (backends.py: the package
missing, no GPU and no interpreter), so a machine without triton, or a broken availability probe, used to skip all of
them and exit 0. Under TRITON_INTERPRET=1, with a marker expression that selects ``triton`` tests, the session now
fails unless at least one ``triton``-marked test ran (passed or failed). ``--collect-only`` and runs that collected
nothing are left alone.

(The CUDA counterpart, a GPU machine whose extension was built without CUDA kernels, is a failing test:
test_build.py::test_cuda_build_when_expected, with the rule in backends.cuda_build_expected.)

This module imports neither torch nor ffkernels, so a test can load it into a child pytest on its own
(test_run_guards.py).
"""
from __future__ import annotations

import os
import sys

import pytest

_ran = {"triton": 0}
_selected = {"triton": 0}


def triton_run_expected(config) -> bool:
    """Whether this session is an interpreter run of the Triton tests: TRITON_INTERPRET=1, a ``-m`` expression, and
    at least one test marked ``triton`` left selected by it (counted after collection and deselection, so no private
    pytest API evaluates the expression here)."""
    markexpr = config.option.markexpr or ""
    if os.environ.get("TRITON_INTERPRET") != "1" or not markexpr or config.option.collectonly:
        return False
    return _selected["triton"] > 0


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    _selected["triton"] = sum(1 for item in session.items if item.get_closest_marker("triton") is not None)


def pytest_runtest_logreport(report):
    if report.when == "call" and not report.skipped and "triton" in report.keywords:
        _ran["triton"] += 1


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if not triton_run_expected(session.config) or session.testscollected == 0 or _ran["triton"]:
        return
    sys.stderr.write("\nffkernels: TRITON_INTERPRET=1 with -m triton, but no Triton test ran (every one was skipped "
                     "or deselected; see the skip reasons above). Is triton installed? This run fails.\n")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""run_guards.py in a child pytest: an interpreter run of the Triton tests (TRITON_INTERPRET=1, -m triton) in which
every Triton case skipped fails; one where a Triton case ran, or any other kind of run, keeps its exit status."""
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASE = textwrap.dedent("""
    import os
    import pytest

    @pytest.mark.triton
    def test_kernel():
        if os.environ.get("FAKE_NO_TRITON") == "1":
            pytest.skip("the triton package is not installed")

    def test_other():
        pass
""")


def _run(tmp_path, *args, interpret="1", no_triton="1"):
    (tmp_path / "test_case.py").write_text(CASE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    triton: the Triton cases\n")
    env = {**os.environ, "PYTHONPATH": HERE, "TRITON_INTERPRET": interpret, "FAKE_NO_TRITON": no_triton}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "run_guards", "-p", "no:cacheprovider", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_interpreter_run_that_skipped_every_triton_case_fails(tmp_path):
    r = _run(tmp_path, "-m", "triton")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no Triton test ran" in r.stderr and "1 skipped" in r.stdout


@pytest.mark.parametrize("args,interpret,no_triton", [
    (("-m", "triton"), "1", "0"),      # a Triton case ran
    (("-m", "not triton"), "1", "1"),  # not a Triton run
    ((), "1", "1"),                    # no marker expression: the plain suite
    (("-m", "triton"), "0", "1"),      # not under the interpreter (a GPU run is sized by scripts/gpu_check.sh)
], ids=["ran", "not-triton", "no-marker", "no-interpreter"])
def test_other_runs_keep_their_exit_status(tmp_path, args, interpret, no_triton):
    r = _run(tmp_path, *args, interpret=interpret, no_triton=no_triton)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no Triton test ran" not in r.stderr


def test_conftest_registers_every_run_guards_hook():
    """conftest.py imports the guards' hooks by name (that is how pytest registers them in the real suite, where
    run_guards is no -p plugin): every pytest_* hook of run_guards.py must be among them, or its part never runs."""
    import conftest
    import run_guards

    hooks = [n for n in vars(run_guards) if n.startswith("pytest_")]
    assert "pytest_collection_finish" in hooks
    assert [n for n in hooks if getattr(conftest, n, None) is not getattr(run_guards, n)] == []

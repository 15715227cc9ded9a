"""The GPU smoke selection (gpu_selection.py, ``--gpu-smoke``) is representative: counted as on a GPU
(FFKERNELS_COLLECT_AS_GPU=1), it keeps every GPU test function, every (backend, dtype) it runs, every option family
of the sweeps, and the non-finite, host-sync, argument-check and long-training cases; and it is much smaller."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION_WORDS = {"rms", "l2", "none", "sum", "mean", "hinton", "symba", "adam", "sgd", "momentum", "wd", "bias",
                "nobias", "fp32", "fp64"}


def _collect(*args) -> list:
    env = {**os.environ, "FFKERNELS_COLLECT_AS_GPU": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                        "tests/"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [ln for ln in p.stdout.splitlines() if "::" in ln]


@pytest.fixture(scope="module")
def collected():
    return _collect("-m", "gpu"), _collect("-m", "gpu", "--gpu-smoke")


def _func(node):
    return node.split("[")[0]


def _words(node):
    return set(node.split("[", 1)[1].rstrip("]").split("-")) if "[" in node else set()


def test_smoke_keeps_every_function_backend_and_dtype(collected):
    full, smoke = collected
    assert set(smoke) <= set(full) and 3 * len(smoke) < len(full), (len(smoke), len(full))
    assert {_func(n) for n in smoke} == {_func(n) for n in full}

    def kinds(nodes):
        return {(_func(n), frozenset(_words(n) & {"cuda", "triton", "fp32", "fp64"})) for n in nodes}
    assert kinds(smoke) == kinds(full)


@pytest.mark.parametrize("func", ["tests/test_training_vs_oracle.py::test_every_option",
                                  "tests/test_peer_norm.py::test_steps_match_oracle",
                                  "tests/test_conv_gpu.py::test_every_option",
                                  "tests/test_non_finite.py::test_step_with_non_finite_loss_changes_nothing"])
def test_smoke_covers_every_option_family(collected, func):
    full, smoke = collected
    for backend in ("cuda", "triton"):
        def words(nodes):
            return set().union(*(_words(n) for n in nodes if _func(n) == func and backend in _words(n)))
        want = {w for w in words(full) if not re.fullmatch(r"\d+(x\d+)+", w)}
        assert words(smoke) >= want, (backend, want - words(smoke))


def test_smoke_keeps_every_argument_check_and_the_long_training(collected):
    full, smoke = collected
    for func in ("tests/test_bad_op_arguments.py::test_op_rejects_bad_arguments",
                 "tests/test_training_vs_oracle.py::test_many_steps_large_layer",
                 "tests/test_cuda_gpu.py::test_lowp_grad_within_reference_error"):
        assert [n for n in smoke if _func(n) == func] == [n for n in full if _func(n) == func] != [], func


def test_collect_as_gpu_refuses_to_run_tests(tmp_path):
    env = {**os.environ, "FFKERNELS_COLLECT_AS_GPU": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_schedules.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "for counting (--collect-only) only" in p.stdout + p.stderr

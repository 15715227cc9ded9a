"""The GPU smoke selection (a pytest plugin, loaded by conftest.py): ``pytest --gpu-smoke -m gpu`` runs a
representative part of the GPU cases, sized for scripts/gpu_check.sh's bounded test phases; without the option
nothing changes (``pytest -m gpu`` is the full GPU suite: ``scripts/gpu_check.sh --full``).

Which GPU cases (items marked ``gpu``) the smoke selection keeps:

- every case of KEEP_FILES (the argument checks, which raise before any kernel runs; the GPU label checks; the two
  files gpu_check.sh runs as phases of their own) and KEEP_TESTS (the long training run);
- for the option sweeps (OPTION_SWEEPS: the linear, labeled, peer-norm and conv ones, and the conv step's non-finite
  cases) and the non-finite and host-sync tests (COVER_FILES): a greedy cover, per
  backend, of the words of the case ids, shapes left out -- each norm, goodness, loss variant, optimizer variant,
  bias/nobias, peer setting, dtype, way of making the loss non-finite, ... in at least one case, at whatever shape
  that case has (one or two shapes per sweep);
- for every other test: the first case of each (backend, dtype) -- every op and dtype once, at one shape.
Cases not marked ``gpu`` are never deselected here.

``FFKERNELS_COLLECT_AS_GPU=1`` (collection only: ``--collect-only``) parametrizes the tests as on a GPU machine
(cuda and triton cases on the device "cuda", marked ``gpu``), so that ``scripts/gpu_check.sh --plan`` can count
the phases on a machine without one. Running tests with it is refused.
"""
from __future__ import annotations

import os
import re

import pytest

# kept whole: the argument checks (they raise before any kernel runs), the GPU label checks, and test_cuda_gpu.py and
# test_triton_gpu.py, which are gpu_check.sh's own phases (tests-cuda, tests-triton)
KEEP_FILES = ("test_bad_op_arguments.py", "test_gpu_labels.py", "test_cuda_gpu.py", "test_triton_gpu.py")
KEEP_TESTS = ("test_training_vs_oracle.py::test_many_steps_large_layer",)  # the long training run
# a cover of their words per backend: the option sweeps (the conv step's too), and every non-finite and host-sync case
# kind (the conv step's non-finite cases live in test_conv_gpu.py, beside its sweeps)
OPTION_SWEEPS = ("test_training_vs_oracle.py::test_every_option", "test_labeled.py::test_options",
                 "test_peer_norm.py::test_steps_match_oracle", "test_conv_gpu.py::test_every_option",
                 "test_conv_gpu.py::test_non_finite_loss_changes_nothing")
COVER_FILES = ("test_non_finite.py", "test_host_syncs.py")
_SHAPE = re.compile(r"\d+(x\d+)+")
BACKENDS = ("reference", "cpu", "cuda", "triton")
DTYPES = ("fp32", "fp64", "fp16", "bf16")


def pytest_addoption(parser):
    parser.addoption("--gpu-smoke", action="store_true", default=False,
                     help="ffkernels: run the representative GPU selection (tests/gpu_selection.py), not every GPU "
                          "case")


def pytest_configure(config):
    if os.environ.get("FFKERNELS_COLLECT_AS_GPU") == "1" and not config.option.collectonly:
        raise pytest.UsageError("FFKERNELS_COLLECT_AS_GPU=1 is for counting (--collect-only) only")


def _name(item) -> str:
    """file::function, the file without its folder."""
    return f"{os.path.basename(str(item.path))}::{item.originalname}"


def _words(item) -> tuple:
    cs = getattr(item, "callspec", None)
    return tuple(cs.id.split("-")) if cs is not None else ()


def _of(item, names) -> tuple:
    return tuple(w for w in _words(item) if w in names)


def smoke_selection(items) -> list:
    """The GPU items the smoke run keeps, in their collection order."""
    keep, groups = set(), {}
    for item in items:
        name = _name(item)
        if name.split("::")[0] in KEEP_FILES or name in KEEP_TESTS or getattr(item, "callspec", None) is None:
            keep.add(item.nodeid)
        elif name in OPTION_SWEEPS or name.split("::")[0] in COVER_FILES:  # a cover per backend
            groups.setdefault(("cover", name, _of(item, BACKENDS)), []).append(item)
        else:
            groups.setdefault(("first", name, _of(item, BACKENDS), _of(item, DTYPES)), []).append(item)
    for key, group in groups.items():
        if key[0] == "first":  # the first case of each (backend, dtype)
            keep.add(group[0].nodeid)
            continue
        cases = [(item, {w for w in _words(item) if not _SHAPE.fullmatch(w)}) for item in group]
        need = set().union(*(w for _, w in cases))
        while need:  # greedy cover: the case with the most words not yet covered (the first on ties)
            item, words = max(cases, key=lambda c: len(c[1] & need))
            keep.add(item.nodeid)
            need -= words
    return [item for item in items if item.nodeid in keep]


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-smoke"):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    kept = {item.nodeid for item in smoke_selection(gpu)}
    deselected = [item for item in gpu if item.nodeid not in kept]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.nodeid not in {d.nodeid for d in deselected}]

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

from backends import CUDA, INTERPRET, backend_params  # noqa: E402
# the session guards (run_guards.py): an interpreter run of the Triton tests that ran none fails
from run_guards import pytest_collection_finish, pytest_runtest_logreport, pytest_sessionfinish  # noqa: E402,F401
# the GPU smoke selection (--gpu-smoke, gpu_selection.py): scripts/gpu_check.sh's bounded test phases
from gpu_selection import pytest_addoption, pytest_collection_modifyitems, pytest_configure  # noqa: E402,F401


@pytest.fixture(params=backend_params())
def backend(request):
    """Each backend of tests/backends.py (skipped, saying why, where it cannot run)."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny shapes: fastest there, and it spares the OpenMP barriers that make
    tiny ops ~100x slower when another process holds one of the two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_blas_under_the_interpreter():
    """The Triton interpreter runs each program's tl.dot as a small numpy matmul; a multi-threaded BLAS on busy
    cores makes those hundreds of times slower (sync overhead), so numpy's BLAS stays on one thread there."""
    if not INTERPRET:
        yield
        return
    import numpy  # noqa: F401  (loads the BLAS to limit)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 GEMMs without TF32 on GPUs (torch's default; its 1e-3 would drown what the tests look for)."""
    if not CUDA:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old

"""Which backends run here, what "auto" picks, and the errors that say why a backend cannot run."""
import importlib.util
import re

import pytest
import torch

import ffkernels
from backends import ALL, BY_NAME, CPU, CUDA, INTERPRET, TRITON, backend_params
from ffkernels import BackendUnavailableError, FFLinear
from ffkernels.backends import BACKENDS, resolve_backend


def test_available_backends_agree_with_the_tests():
    assert ffkernels.available_backends() == [b.name for b in ALL if b.skip_reason is None]


@pytest.mark.parametrize("name", [b.name for b in ALL])
def test_unavailable_backends_say_why(name):
    reason = BACKENDS[name].unavailable_reason()
    if reason is None:
        pytest.skip(f"{name} is available here")
    with pytest.raises(BackendUnavailableError,
                       match=re.escape(f"backend {name!r} is not available: {reason}")):
        FFLinear(4, 3, backend=name).backend
    if name == "triton" and not CUDA and importlib.util.find_spec("triton") is not None:
        assert "TRITON_INTERPRET=1" in reason
    if name == "cuda":
        assert "cuda" in reason.lower()


def test_a_backend_on_the_wrong_device_says_why():
    if CPU.skip_reason is None:
        with pytest.raises(BackendUnavailableError, match="runs on cpu tensors"):
            resolve_backend("cpu", "meta")
    if not INTERPRET and TRITON.skip_reason is None:  # on a GPU: CPU tensors need the interpreter
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            resolve_backend("triton", "cpu")


@pytest.mark.parametrize("backend", backend_params([TRITON]))
def test_triton_refuses_float64(backend):
    with pytest.raises(BackendUnavailableError, match="float64"):
        resolve_backend("triton", backend.device, torch.float64)


def test_auto_backend_on_the_cpu():
    assert FFLinear(4, 3, dtype=torch.bfloat16).backend == "reference"  # no kernel for it: the reference
    assert FFLinear(4, 3).backend == ("cpu" if CPU.skip_reason is None else "reference")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_backend_on_a_gpu():
    want = "cuda" if BY_NAME["cuda"].skip_reason is None else "triton"
    assert resolve_backend("auto", "cuda", torch.float16) == want
    assert FFLinear(4, 3, device="cuda").backend == want

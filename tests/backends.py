"""The backends this test process can run, as pytest parameters.

    reference  always: the oracle's math behind the backend interface; CPU; float32 and float64. Not a kernel: the
               "vs oracle" sweeps run KERNELS only; the reference runs the plumbing and behaviour tests
    cpu        when ffkernels._C is built; float32 and float64
    triton     under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported: CPU tensors,
               float32 only) or on a CUDA GPU (float32 here; float16/bfloat16 in test_triton_gpu.py)
    cuda       when ffkernels._C was built with CUDA kernels and a GPU is present; float32 and float64

Availability is decided here from the build and the machine, not by asking ffkernels (test_backend_choice.py
checks that ffkernels.available_backends() agrees). Cases of the triton backend carry the ``triton`` marker,
cases on a GPU the ``gpu`` marker, so that on a CPU-only machine the second run,

    TRITON_INTERPRET=1 python -m pytest -q -m triton

runs exactly the Triton cases under the interpreter.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from ffkernels.backends import compiled as _ext

TRITON_PACKAGE = "ffkernels.backends.triton"  # where the Triton kernels live: the one place to change
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FFKERNELS_COLLECT_AS_GPU=1: parametrize as on a GPU machine, for counting only (gpu_selection.py refuses to run so)
CUDA = torch.cuda.is_available() or os.environ.get("FFKERNELS_COLLECT_AS_GPU") == "1"
RUN_INTERPRETER = "TRITON_INTERPRET=1 python -m pytest -q -m triton"

FP32, FP64 = torch.float32, torch.float64
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Backend:
    name: str
    device: str                  # where its tensors live in the tests
    dtypes: tuple                # the dtypes the behaviour tests run it with
    namespace: Optional[str]     # torch.ops namespace of its registered ops (None: it has none)
    op_names: tuple              # the ops it has kernels for on ``device``
    skip_reason: Optional[str]   # None when it runs in this process
    interpreted: bool = False    # the Triton interpreter: each kernel program runs in Python (slow)
    sweep: str = "full"          # how much of the shape/option sweeps it runs: full or reduced

    def __str__(self) -> str:
        return self.name

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def ops(self):
        """torch.ops.<namespace>, its ops registered."""
        if self.namespace == "ffkernels_triton":
            importlib.import_module(f"{TRITON_PACKAGE}.ops")
            importlib.import_module(f"{TRITON_PACKAGE}.labeled")
            importlib.import_module(f"{TRITON_PACKAGE}.conv_ops")
        return getattr(torch.ops, self.namespace)

    def op(self, name: str):
        return getattr(self.ops, name).default

    @property
    def marks(self) -> list:
        marks = [pytest.mark.skipif(self.skip_reason is not None, reason=f"{self.name}: {self.skip_reason}")]
        if self.name == "triton":
            marks.append(pytest.mark.triton)
        if self.gpu:
            marks.append(pytest.mark.gpu)
        return marks


def _cpu_reason():
    return None if _ext.loaded() else f"ffkernels._C is not built ({_ext.load_error()}); test_build.py fails then"


def _triton_reason():
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if INTERPRET or CUDA:
        return None
    return f"needs a CUDA GPU, or the interpreter on the CPU: run `{RUN_INTERPRETER}`"


def _cuda_reason():
    if not _ext.built_with_cuda():
        return "ffkernels._C was built without CUDA kernels (no toolkit at build time, or FFKERNELS_CUDA=0)"
    if not CUDA:
        return "no CUDA GPU"
    return None


def cuda_build_expected() -> Optional[str]:
    """Why this machine must have an extension with CUDA kernels (None: it need not). FFKERNELS_EXPECT_CUDA=1 (CI with
    a toolkit, scripts/gpu_check.sh) or a CUDA GPU present: there a build without CUDA kernels would skip every cuda
    case and pass, so test_build.py fails instead. FFKERNELS_EXPECT_CUDA=0 allows a CPU-only build on a GPU machine."""
    flag = os.environ.get("FFKERNELS_EXPECT_CUDA")
    if flag == "1":
        return "FFKERNELS_EXPECT_CUDA=1"
    if flag != "0" and torch.cuda.is_available():
        return "a CUDA GPU is present (torch.cuda.is_available(); FFKERNELS_EXPECT_CUDA=0 to test a CPU-only build)"
    return None


COMPILED_OPS = ("ff_grad", "ff_update", "ff_step")
LABELED_OPS = ("ff_grad_labeled", "ff_step_labeled")  # the supervised first layer (B-row GEMMs)

# the reference runs the oracle's own math (autograd, torch.optim on the state it is given): it is in no "vs oracle"
# sweep (KERNELS below), only in the plumbing and behaviour tests
REFERENCE = Backend("reference", "cpu", (FP32, FP64), None, (), None)
CPU = Backend("cpu", "cpu", (FP32, FP64), "ffkernels", COMPILED_OPS + LABELED_OPS, _cpu_reason())
# Triton runs the reduced sweep: under the interpreter every kernel program runs in Python (~50x slower per step than
# the C++ kernels); on a GPU every new specialization is a JIT compile
TRITON = Backend("triton", "cpu" if INTERPRET or not CUDA else "cuda", (FP32,), "ffkernels_triton",
                 COMPILED_OPS + LABELED_OPS,
                 _triton_reason(), interpreted=INTERPRET or not CUDA, sweep="reduced")
CUDA_BACKEND = Backend("cuda", "cuda", (FP32, FP64), "ffkernels", COMPILED_OPS + LABELED_OPS, _cuda_reason())

ALL = (REFERENCE, CPU, TRITON, CUDA_BACKEND)
BY_NAME = {b.name: b for b in ALL}
# the backends with kernels of their own: the ones a "matches the oracle" test checks. The reference's grad/update/step
# ARE the oracle (autograd + torch.optim), so comparing it with the oracle checks nothing; it runs where it is not the
# oracle: FFLinear/FFNet plumbing, state, resume, the non-finite rule, bad input (test_reference_backend.py and the
# behaviour files)
KERNELS = (CPU, TRITON, CUDA_BACKEND)


def backend_params(backends=ALL) -> list:
    """One pytest parameter per backend (skipped, with the reason, where it cannot run)."""
    return [pytest.param(b, id=b.name, marks=b.marks) for b in backends]


def backend_dtype_params(backends=ALL) -> list:
    """(backend, dtype) parameters, for every dtype each backend runs with."""
    return [pytest.param(b, dt, id=f"{b.name}-{DTYPE_IDS[dt]}", marks=b.marks) for b in backends for dt in b.dtypes]


def case_params(make, backends=ALL) -> list:
    """(backend, dtype, *args) parameters for every backend and dtype it runs with, from
    ``make(backend, dtype) -> [(case id or "", *args), ...]`` (what each backend runs of a sweep)."""
    return [pytest.param(b, dt, *args, id="-".join([b.name, DTYPE_IDS[dt], *([case_id] if case_id else [])]),
                         marks=b.marks)
            for b in backends for dt in b.dtypes for case_id, *args in make(b, dt)]


def with_ops(backends=ALL) -> tuple:
    """The backends that register ops (torch.ops.ffkernels, torch.ops.ffkernels_triton)."""
    return tuple(b for b in backends if b.namespace is not None)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The optimizer state's dtype for parameters of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32

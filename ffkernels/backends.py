"""Backends: which implementations of the fused FF step exist here, and choosing one.

Every backend offers the same three functions on plain tensors (no autograd):
    grad(x_pos, x_neg, weight, bias, cfg)                         -> FFGradOutput
    update(weight, bias, grad_w, grad_b, st_w, st_b, step, cfg, loss=None)   in place; skipped if loss is not finite
    step(x_pos, x_neg, weight, bias, st_w, st_b, step, cfg)       -> FFStepOutput (update skipped if loss not finite)
``st_w``/``st_b`` are tuples of the optimizer state tensors named by ``cfg.state_names``.
A backend may also offer ``step_labeled``/``grad_labeled``: the same for the supervised first layer, given x
and the labels to write into it (see FFLinear.ff_step_labeled); where it does not, the caller builds the pair.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _ext
from . import reference as ref
from ._types import BackendUnavailableError, FFGradOutput, FFStepOutput, dtype_name
from .config import FFConfig

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")


def _finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).all())


class ReferenceBackend:
    """Autograd + torch.optim: the oracle, usable on any device and dtype."""

    name = "reference"
    dtypes = None  # any floating dtype

    def unavailable_reason(self):
        return None

    def device_reason(self, device: torch.device):
        return None

    def grad(self, x_pos, x_neg, weight, bias, cfg: FFConfig) -> FFGradOutput:
        return ref.ff_grad(x_pos, x_neg, weight, bias, cfg)

    def update(self, weight, bias, grad_w, grad_b, st_w, st_b, step, cfg: FFConfig, loss=None) -> None:
        if loss is not None and not _finite(loss):
            return
        triples = [(weight, grad_w, st_w)] + ([(bias, grad_b, st_b)] if bias is not None else [])
        params, grads, states = (list(t) for t in zip(*triples))
        ref.optimizer_update(params, grads, states, step, cfg)

    def step(self, x_pos, x_neg, weight, bias, st_w, st_b, step, cfg: FFConfig) -> FFStepOutput:
        g = self.grad(x_pos, x_neg, weight, bias, cfg)
        self.update(weight, bias, g.grad_weight, g.grad_bias, st_w, st_b, step, cfg, loss=g.loss)
        return FFStepOutput(*g[:5])


def _state_args(states, like: torch.Tensor):
    """The op's two state slots; unused ones get an empty tensor (the schema has no optional there)."""
    s = list(states) + [None] * (2 - len(states))
    return [t if t is not None else like.new_empty(0) for t in s]


class CompiledBackend:
    """The C++ (``cpu``) and CUDA C++ (``cuda``) kernels of ffkernels._C, via torch.ops.ffkernels."""

    def __init__(self, name: str, device_type: str, dtypes):
        self.name, self.device_type, self.dtypes = name, device_type, dtypes

    def unavailable_reason(self):
        if not _ext.loaded():
            return f"the compiled extension ffkernels._C is not built or failed to load ({_ext.load_error()})"
        if self.device_type == "cuda":
            if not _ext.built_with_cuda():
                return ("ffkernels._C was built without CUDA kernels (no CUDA toolkit at build time, or "
                        "FFKERNELS_CUDA=0); rebuild with a toolkit and FFKERNELS_CUDA=1")
            if not torch.cuda.is_available():
                return "no CUDA GPU is available (torch.cuda.is_available() is False)"
        return None

    def device_reason(self, device: torch.device):
        if device.type != self.device_type:
            return f"backend {self.name!r} runs on {self.device_type} tensors, got tensors on {device}"
        return None

    def grad(self, x_pos, x_neg, weight, bias, cfg: FFConfig) -> FFGradOutput:
        r = torch.ops.ffkernels.ff_grad(x_pos, x_neg, weight, bias, *cfg.loss_args())
        return FFGradOutput(*r[:6], r[6] if bias is not None else None)

    def update(self, weight, bias, grad_w, grad_b, st_w, st_b, step, cfg: FFConfig, loss=None) -> None:
        s1w, s2w = _state_args(st_w, weight)
        s1b, s2b = _state_args(st_b, bias) if bias is not None else (None, None)
        torch.ops.ffkernels.ff_update(weight, bias, grad_w, grad_b, s1w, s2w, s1b, s2b, loss, int(step),
                                      *cfg.optim_args())

    def step(self, x_pos, x_neg, weight, bias, st_w, st_b, step, cfg: FFConfig) -> FFStepOutput:
        s1w, s2w = _state_args(st_w, weight)
        s1b, s2b = _state_args(st_b, bias) if bias is not None else (None, None)
        r = torch.ops.ffkernels.ff_step(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, int(step),
                                        *cfg.loss_args(), *cfg.optim_args())
        return FFStepOutput(*r)


class CPUBackend(CompiledBackend):
    """The C++ CPU kernels, plus the supervised first-layer step (x with labels written in, B-row GEMMs)."""

    def __init__(self):
        super().__init__("cpu", "cpu", (torch.float32, torch.float64))

    def grad_labeled(self, x, label_pos, label_neg, num_classes, value, weight, bias, cfg: FFConfig) -> FFGradOutput:
        r = torch.ops.ffkernels.ff_grad_labeled(x, label_pos, label_neg, num_classes, value, weight, bias,
                                                *cfg.loss_args())
        return FFGradOutput(*r[:6], r[6] if bias is not None else None)

    def step_labeled(self, x, label_pos, label_neg, num_classes, value, weight, bias, st_w, st_b, step,
                     cfg: FFConfig) -> FFStepOutput:
        s1w, s2w = _state_args(st_w, weight)
        s1b, s2b = _state_args(st_b, bias) if bias is not None else (None, None)
        r = torch.ops.ffkernels.ff_step_labeled(x, label_pos, label_neg, num_classes, value, weight, bias, s1w, s2w,
                                                s1b, s2b, int(step), *cfg.loss_args(), *cfg.optim_args())
        return FFStepOutput(*r)


class _LazyTritonBackend:
    """Front for ffkernels.triton_backend, imported only when first used (importing triton is slow)."""

    name = "triton"

    def __init__(self):
        self._impl = None

    @staticmethod
    def interpreting() -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def unavailable_reason(self):
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton)"
        if importlib.util.find_spec("ffkernels.triton_backend") is None:
            return "this ffkernels has no Triton kernels (ffkernels.triton_backend is missing)"
        if not torch.cuda.is_available() and not self.interpreting():
            return "Triton needs a CUDA GPU, or TRITON_INTERPRET=1 (set before importing triton) to run on the CPU"
        return None

    def device_reason(self, device: torch.device):
        if device.type == "cuda":
            return None
        if device.type == "cpu" and self.interpreting():
            return None
        if device.type == "cpu":
            return ("backend 'triton' runs on CUDA tensors; on CPU tensors only under the Triton interpreter "
                    "(TRITON_INTERPRET=1, set before importing triton)")
        return f"backend 'triton' cannot run on {device}"

    @property
    def impl(self):
        if self._impl is None:
            from . import triton_backend

            self._impl = triton_backend.TritonBackend()
        return self._impl

    @property
    def dtypes(self):
        return self.impl.dtypes

    def grad(self, *a, **k):
        return self.impl.grad(*a, **k)

    def update(self, *a, **k):
        return self.impl.update(*a, **k)

    def step(self, *a, **k):
        return self.impl.step(*a, **k)


BACKENDS = {
    "reference": ReferenceBackend(),
    "cpu": CPUBackend(),
    "cuda": CompiledBackend("cuda", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16)),
    "triton": _LazyTritonBackend(),
}


def available_backends() -> list:
    """Names of the backends usable in this process, e.g. ["reference", "cpu", "triton"]."""
    return [n for n in BACKEND_NAMES if BACKENDS[n].unavailable_reason() is None]


def _dtype_reason(backend, dtype):
    if dtype is None or backend.dtypes is None or dtype in backend.dtypes:
        return None
    names = ", ".join(dtype_name(d) for d in backend.dtypes)
    return f"backend {backend.name!r} supports {names}, got {dtype_name(dtype)}"


def resolve_backend(requested: str, device, dtype=None) -> str:
    """The backend name to use for tensors on ``device`` of ``dtype``.

    "auto" picks the fastest usable one (cuda > triton > reference on GPUs, cpu > reference on CPUs);
    a named backend that cannot run here raises BackendUnavailableError saying why.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            b = BACKENDS[name]
            if b.unavailable_reason() is None and b.device_reason(device) is None and _dtype_reason(b, dtype) is None:
                return name
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"ffkernels: unknown backend {requested!r}; expected 'auto' or one of "
                         f"{', '.join(map(repr, BACKEND_NAMES))}")
    b = BACKENDS[requested]
    reason = b.unavailable_reason() or b.device_reason(device) or _dtype_reason(b, dtype)
    if reason:
        raise BackendUnavailableError(f"ffkernels: backend {requested!r} is not available: {reason}")
    return requested


def get_backend(name: str):
    return BACKENDS[name]

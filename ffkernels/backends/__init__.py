"""Backends: the implementations of the fused FF step, which of them can run here, and choosing one.

    contract.py    the checks every backend shares (inputs, optimizer state, gradients) and result shapes
    reference.py   ``reference``: autograd + torch.optim, the oracle (any device, any dtype)
    op_backend.py  the calls into a torch.ops namespace with the shared op schemas
    compiled.py    ``cpu`` and ``cuda``: the ops of ffkernels._C and their fakes
    triton/        ``triton``: the Triton kernels, their ops and fakes, and their availability probe

Every backend offers the same three functions on plain tensors (no autograd):
    grad(x_pos, x_neg, weight, bias, cfg, peer_mean=None)         -> FFGradOutput
    update(weight, bias, grad_w, grad_b, st_w, st_b, step, cfg, loss=None)   in place; skipped if loss is not finite
    step(x_pos, x_neg, weight, bias, st_w, st_b, step, cfg, peer_mean=None)
                                                                  -> FFStepOutput (update skipped if loss not finite)
``st_w``/``st_b`` are tuples of the optimizer state tensors named by ``cfg.state_names``; ``peer_mean`` is the running
mean r of peer normalization, required when ``cfg.peer_norm > 0`` (``step`` updates it, ``grad`` only reads it). A backend may also offer
``step_labeled``: the same for the supervised first layer, given x and the labels to write into it (see
FFLinear.ff_step_labeled); where it does not, the caller builds the pair. Nothing in this package imports a
module above it but the leaves ``config`` and ``_types`` (docs/design.md, "Backends").
"""
from __future__ import annotations

import torch

from .._types import BackendUnavailableError, dtype_name
from .compiled import cpu_backend, cuda_backend
from .reference_backend import ReferenceBackend
from .triton import TritonBackend

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

BACKENDS = {
    "reference": ReferenceBackend(),
    "cpu": cpu_backend(),
    "cuda": cuda_backend(),
    "triton": TritonBackend(),
}


def available_backends() -> list:
    """Names of the backends usable in this process, e.g. ["reference", "cpu", "triton"]."""
    return [n for n in BACKEND_NAMES if BACKENDS[n].unavailable_reason() is None]


def _dtype_reason(backend, dtype):
    if dtype is None or backend.dtypes is None or dtype in backend.dtypes:
        return None
    names = ", ".join(dtype_name(d) for d in backend.dtypes)
    return f"backend {backend.name!r} supports {names}, got {dtype_name(dtype)}"


def resolve_backend(requested: str, device, dtype=None, kernels: str = "step") -> str:
    """The backend name to use for tensors on ``device`` of ``dtype``.

    "auto" picks the fastest usable one (cuda > triton > reference on GPUs, cpu > reference on CPUs) that has the
    ``kernels`` asked for ("step": the linear step every backend has; "conv_step": the conv step); a named backend
    that cannot run here raises BackendUnavailableError saying why (a missing conv step: when it is called).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            b = BACKENDS[name]
            if (b.unavailable_reason() is None and b.device_reason(device) is None and _dtype_reason(b, dtype) is None
                    and hasattr(b, kernels)):
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

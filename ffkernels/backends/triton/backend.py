"""TritonBackend: the ``backend="triton"`` entry of the registry, with its own availability probe.

Importing this module does not import triton (slow); the kernels and their ops are loaded on first use.
"""
from __future__ import annotations

import importlib.util

import torch

from ..op_backend import OpBackend
from . import settings


class TritonBackend(OpBackend):
    """grad / update / step / step_labeled / conv_grad / conv_step of docs/design.md with the Triton kernels (see
    docs/triton.md)."""

    def __init__(self):
        super().__init__("triton", "ffkernels_triton", labeled=True, gemm_dtypes=settings.GEMM_DTYPES, conv=True)
        self._registered = False

    @property
    def ops(self):
        if not self._registered:
            from . import conv_ops, labeled, ops  # noqa: F401  (register torch.ops.ffkernels_triton)

            self._registered = True
        return super().ops

    @property
    def dtypes(self):
        return settings.supported_dtypes()

    def unavailable_reason(self):
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton)"
        if not torch.cuda.is_available() and not settings.interpreting():
            return "Triton needs a CUDA GPU, or TRITON_INTERPRET=1 (set before importing triton) to run on the CPU"
        return None

    def device_reason(self, device: torch.device):
        if device.type == "cuda":
            return None
        if device.type == "cpu" and settings.interpreting():
            return None
        if device.type == "cpu":
            return ("backend 'triton' runs on CUDA tensors; on CPU tensors only under the Triton interpreter "
                    "(TRITON_INTERPRET=1, set before importing triton)")
        return f"backend 'triton' cannot run on {device}"

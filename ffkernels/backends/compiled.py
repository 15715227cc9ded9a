"""The compiled backends ``cpu`` and ``cuda``: the ops of ``ffkernels._C`` (``torch.ops.ffkernels``) and
their fake kernels.

Loading ``ffkernels._C`` registers the ops' schemas and their CPU kernels (python_api/ff_api.cpp) and, in a
CUDA build, their CUDA kernels (csrc/cuda/ff_register_cuda.cpp). The fakes below let torch.compile and
``torch.library.opcheck`` trace the ops: the same convention as the Triton ops, fakes beside the ops.
"""
from __future__ import annotations

import warnings

import torch

from .contract import grad_outputs_like, step_outputs_like
from .contract_conv import conv_outputs_like
from .op_backend import OpBackend

_C = None
_error: "str | None" = None

try:
    from .. import _C  # noqa: F811
except ImportError as e:  # not built, or built against another torch
    _error = str(e)
    warnings.warn(
        "ffkernels: the compiled extension ffkernels._C could not be loaded "
        f"({_error}); only the 'reference' (and, where usable, 'triton') backends are available. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def load_error() -> "str | None":
    return _error


def built_with_cuda() -> bool:
    return bool(_C is not None and getattr(_C, "with_cuda", 0))


def cuda_archs() -> str:
    return getattr(_C, "cuda_archs", "") if _C is not None else ""


def _register_fakes() -> None:
    @torch.library.register_fake("ffkernels::ff_grad")
    def _ff_grad(x_pos, x_neg, weight, bias, peer_mean, options):
        return grad_outputs_like(x_pos, weight, bias)

    @torch.library.register_fake("ffkernels::ff_update")
    def _ff_update(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, options):
        return None

    @torch.library.register_fake("ffkernels::ff_step")
    def _ff_step(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, peer_mean, step, options):
        return step_outputs_like(x_pos, weight)

    @torch.library.register_fake("ffkernels::ff_grad_labeled")
    def _ff_grad_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, peer_mean, options):
        return grad_outputs_like(x, weight, bias)

    @torch.library.register_fake("ffkernels::ff_step_labeled")
    def _ff_step_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, s1w, s2w, s1b, s2b,
                         peer_mean, step, options):
        return step_outputs_like(x, weight)

    @torch.library.register_fake("ffkernels::ff_conv_grad")
    def _ff_conv_grad(x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes, options):
        gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
        return (*conv_outputs_like(x_pos, x_neg, weight, stride, padding, dilation, num_classes, options),
                torch.empty_like(weight), gb)

    @torch.library.register_fake("ffkernels::ff_conv_step")
    def _ff_conv_step(x_pos, x_neg, target, weight, bias, s1w, s2w, s1b, s2b, stride, padding, dilation, groups,
                      num_classes, step, options):
        return conv_outputs_like(x_pos, x_neg, weight, stride, padding, dilation, num_classes, options)


if _C is not None:
    _register_fakes()


class CompiledBackend(OpBackend):
    """The C++ (``cpu``) or CUDA C++ (``cuda``) kernels of ffkernels._C."""

    def __init__(self, name: str, device_type: str, dtypes, labeled: bool = False, gemm_dtypes=("param",),
                 conv: bool = False):
        super().__init__(name, "ffkernels", labeled=labeled, gemm_dtypes=gemm_dtypes, conv=conv)
        self.device_type, self.dtypes = device_type, dtypes

    def unavailable_reason(self):
        if not loaded():
            return f"the compiled extension ffkernels._C is not built or failed to load ({load_error()})"
        if self.device_type == "cuda":
            if not built_with_cuda():
                return ("ffkernels._C was built without CUDA kernels (no CUDA toolkit at build time, or "
                        "FFKERNELS_CUDA=0); rebuild with a toolkit and FFKERNELS_CUDA=1")
            if not torch.cuda.is_available():
                return "no CUDA GPU is available (torch.cuda.is_available() is False)"
        return None

    def device_reason(self, device: torch.device):
        if device.type != self.device_type:
            return f"backend {self.name!r} runs on {self.device_type} tensors, got tensors on {device}"
        return None


def cpu_backend() -> CompiledBackend:
    """The C++ CPU kernels, with the supervised first-layer step (x with labels written in, B-row GEMMs), the
    convolutional step (conv_grad, conv_step), and bf16 GEMMs under torch.autocast (ATen's, i.e. oneDNN's)."""
    return CompiledBackend("cpu", "cpu", (torch.float32, torch.float64), labeled=True,
                           gemm_dtypes=("param", "bfloat16"), conv=True)


def cuda_backend() -> CompiledBackend:
    """The CUDA kernels, with the supervised first-layer step and the convolutional step (conv_grad, conv_step: cuDNN's
    convolutions and CUDA epilogue kernels) too, and bf16 or fp16 GEMMs and convolutions under torch.autocast (cuBLAS's
    and cuDNN's, fp32 accumulation; float32 master weights)."""
    return CompiledBackend("cuda", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16), labeled=True,
                           gemm_dtypes=("param", "bfloat16", "float16"), conv=True)

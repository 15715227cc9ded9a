"""The Triton backend of ffkernels (``backend="triton"``): four kernels and their torch.library ops.

    forward_kernel.py          kernel 1: z = x W^T over pos||neg with row scale, bias, ReLU, partial goodness
    forward_labeled_kernel.py  kernel 1L: the labeled first layer's forward, one B-row GEMM for both sides
    loss_kernel.py             kernel 2: goodness, per-row dL/dz coefficient, loss
    weight_grad_kernel.py      kernel 3: dW/db GEMM over the batch (split over the rows for small layers, then
                               kernel 3b); writes them, or applies Adam/SGD in its epilogue
    update_kernel.py           kernel 4: the optimizer from given gradients (ff_update)
    ff_math.py                 the FF math of csrc/ff_math.h as Triton device functions
    optim_args.py              the optimizer's kernel arguments, computed on the host
    launch.py                  launching a kernel: wrap_triton where torch can trace it, else directly
    ops.py                     torch.ops.ffkernels_triton.{ff_grad, ff_update, ff_step} and their fakes
    labeled.py                 torch.ops.ffkernels_triton.{ff_grad_labeled, ff_step_labeled} and their fakes
    settings.py                fp32 dot precision, tiles and warps, the row split, interpreter detection
    backend.py             TritonBackend (availability, lazy op registration), used by ffkernels.backends

Runs on CUDA GPUs, and on the CPU under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported). Importing this package does not import triton. See docs/triton.md.
"""
from .backend import TritonBackend
from .settings import get_fp32_precision, set_fp32_precision

__all__ = ["TritonBackend", "set_fp32_precision", "get_fp32_precision"]

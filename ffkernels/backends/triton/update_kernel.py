"""Kernel 4: the optimizer update from a given gradient (ff_update, e.g. after an all-reduce).

Elementwise over one parameter, its gradient and its fp32 state, with the same per-element code as the
epilogue of kernel 3 (ff_math.apply_optimizer). With a loss given, every program reads it first and
returns if it is not finite, so the skip is decided on the device without a host sync.
"""
import triton
import triton.language as tl

from .ff_math import apply_optimizer, is_finite
from .launch import launchable
from .optim_args import OptimArgs

BLOCK = 1024


@triton.jit
def ff_update_kernel(
    p_ptr, g_ptr, s1_ptr, s2_ptr, loss_ptr, numel,
    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first,
    OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, HAS_LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    if HAS_LOSS:
        if not is_finite(tl.load(loss_ptr).to(tl.float32)):
            return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    apply_optimizer(p_ptr, s1_ptr, s2_ptr, offs, ok, g, step_size, one_minus_beta1, beta2, one_minus_beta2, eps,
                    bc2_sqrt, momentum, weight_decay, first, OPTIM, MOMENTUM)


def launch_update(param, grad, state1, state2, loss, update: OptimArgs) -> None:
    """Update ``param`` (and its state, None where unused) in place from ``grad``; skipped if ``loss`` is not finite."""
    n = param.numel()
    launchable(ff_update_kernel)[(triton.cdiv(n, BLOCK),)](
        param, grad, state1, state2, loss, n, **update.scalars,
        OPTIM=update.optim, MOMENTUM=update.momentum_buffer, HAS_LOSS=loss is not None, BLOCK=BLOCK)

"""Conv kernel C0: the per-image divisor d of the input normalization (rms, l2), x̂ = x / d over C H W.

One program per image (pos images, then neg): it sums x^2 over the image in blocks (an fp64 vector of partial sums,
added in block order, then one tree sum: a fixed order) and stores d = row_denominator_f64 (ff_math.py, the formula of
every backend, in fp64 and rounded once to fp32 as the CPU kernel's: an image sums C H W squares, and an error in d
scales every z of the image alike). The forward kernel divides its accumulator by d (the convolution is linear in x:
conv(x / d) = conv(x) / d) and the weight-gradient kernel folds 1/d into the rows' coefficients, so x̂ is never
written. A separate pass because a forward program sees only the receptive fields of its tile, not whole images. Not
launched for norm="none".
"""
import torch
import triton
import triton.language as tl

from .ff_math import NORM_CODES, row_denominator_f64
from .launch import launchable

BLOCK = 1024


@triton.jit
def ff_conv_norm_kernel(xp_ptr, xn_ptr, den_ptr, B, numel, norm_eps, NORM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    side = tl.program_id(1)
    if side == 0:
        x_ptr = xp_ptr
    else:
        x_ptr = xn_ptr
    image = x_ptr + i.to(tl.int64) * numel
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for k0 in range(0, numel, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        x = tl.load(image + ks, mask=ks < numel, other=0.0).to(tl.float64)
        acc += x * x
    eps = tl.full((), norm_eps, tl.float64)  # eps added in fp64, as the CPU kernel adds its double eps
    tl.store(den_ptr + side * B + i, row_denominator_f64(tl.sum(acc, axis=0), numel * 1.0, eps, NORM))


def launch_conv_norm(x_pos, x_neg, norm: str, norm_eps: float):
    """The divisors d (sides * B,) fp32 of pos images then neg images; None for norm="none"."""
    if norm == "none":
        return None
    B = x_pos.shape[0]
    sides = 1 if x_neg is None else 2
    den = x_pos.new_empty((sides * B,), dtype=torch.float32)
    numel = x_pos[0].numel()
    # without negatives side 1 is not launched: x_pos stands in for the pointer (one pointer type in both branches)
    launchable(ff_conv_norm_kernel)[(B, sides)](x_pos, x_pos if x_neg is None else x_neg, den, B, numel, norm_eps,
                                                NORM=NORM_CODES[norm], BLOCK=min(BLOCK, triton.next_power_of_2(numel)))
    return den

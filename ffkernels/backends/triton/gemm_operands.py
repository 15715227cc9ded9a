"""Kernel 0: the bf16 GEMM operand x̂ of a step under torch.autocast (docs/design.md, "Mixed precision").

Outside autocast the kernels never write x̂: kernel 1 divides its accumulator by the row divisor d and kernel 3 folds
1/d into the row coefficients. The mixed-precision contract rounds x̂ = x / d itself to bf16 (the GEMMs' operand), so
under autocast one pass writes it, and kernels 1 and 3 then run as for norm="none" on it (their ``GEMM`` constexpr):

    linear     a program per row of pos||neg: Σx² in fp64 (blocks, then one tree sum: a fixed order), d rounded once to
               fp32 (``row_denominator_f64``, as the CPU kernels' double row sum), x̂ = x / d in fp32 (``div_rn``)
               rounded to bf16 into a (sides·B, K) buffer. ``LABELED``: the labeled first layer's x~ (features
               [0, C) zeroed; the one-hot adds value² to Σx²) and lv_i = value / d_i rounded to bf16 (the explicit
               pair's label feature), an fp32 (B,) buffer that kernels 1L and 3 read.
    conv       elementwise over the images, with kernel C0's per-image d: x̂ = x / d (x for norm="none") rounded to
               bf16, (sides·B, C, H, W).

The rounding is ff_math.to_gemm: round to nearest even, torch's ``.to(torch.bfloat16)``.
"""
import torch
import triton
import triton.language as tl

from .ff_math import NORM_CODES, NORM_NONE, row_denominator_f64, round_gemm, to_gemm
from .launch import launchable

BLOCK = 1024


@triton.jit
def ff_gemm_normalize_kernel(xp_ptr, xn_ptr, out_ptr, lv_ptr, B, K, C, label_value, norm_eps, NORM: tl.constexpr,
                             LABELED: tl.constexpr, GEMM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    side = tl.program_id(1)
    if side == 0:
        x_ptr = xp_ptr
    else:
        x_ptr = xn_ptr
    row = x_ptr + i.to(tl.int64) * K
    out = out_ptr + (side * B + i).to(tl.int64) * K
    if NORM != NORM_NONE:
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            ok = ks < K
            if LABELED:
                ok = ok & (ks >= C)
            x = tl.load(row + ks, mask=ok, other=0.0).to(tl.float64)
            acc += x * x
        ss = tl.sum(acc, axis=0)
        if LABELED:
            lv64 = tl.full((), label_value, tl.float64)
            ss += lv64 * lv64  # the one-hot adds value^2 whatever the label
        d = row_denominator_f64(ss, K * 1.0, tl.full((), norm_eps, tl.float64), NORM)
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        ok = ks < K
        if LABELED:
            x = tl.load(row + ks, mask=ok & (ks >= C), other=0.0).to(tl.float32)
        else:
            x = tl.load(row + ks, mask=ok, other=0.0).to(tl.float32)
        if NORM != NORM_NONE:
            x = tl.div_rn(x, d)
        tl.store(out + ks, to_gemm(x, GEMM), mask=ok)
    if LABELED:
        lv = tl.full((), label_value, tl.float32)
        if NORM != NORM_NONE:
            lv = tl.div_rn(lv, d)
        tl.store(lv_ptr + i, round_gemm(lv, GEMM))


def launch_gemm_normalize(x_pos, x_neg, norm: str, norm_eps: float, gemm: int, labels=None):
    """Kernel 0 for the linear steps: (x̂ of x_pos, x̂ of x_neg) in bf16, each (B, K) (views of one buffer); for the
    labeled first layer (``labels`` = (num_classes, label_value); x_neg ignored): (x̂~ (B, K) bf16, lv (B,) fp32)."""
    B, K = x_pos.shape
    sides = 1 if labels is not None else 2
    C, value = labels if labels is not None else (0, 0.0)
    out = x_pos.new_empty((sides * B, K), dtype=torch.bfloat16)
    lv = x_pos.new_empty((B,), dtype=torch.float32) if labels is not None else None
    launchable(ff_gemm_normalize_kernel)[(B, sides)](
        x_pos, x_pos if x_neg is None else x_neg, out, lv, B, K, C, value, norm_eps, NORM=NORM_CODES[norm],
        LABELED=labels is not None, GEMM=gemm, BLOCK=min(BLOCK, triton.next_power_of_2(K)))
    if labels is not None:
        return out, lv
    return out[:B], out[B:]


@triton.jit
def ff_conv_gemm_normalize_kernel(xp_ptr, xn_ptr, den_ptr, out_ptr, B, numel, NORM: tl.constexpr,
                                  GEMM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(1)
    side = tl.program_id(2)
    if side == 0:
        x_ptr = xp_ptr
    else:
        x_ptr = xn_ptr
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(x_ptr + i.to(tl.int64) * numel + offs, mask=ok, other=0.0).to(tl.float32)
    if NORM != NORM_NONE:
        x = tl.div_rn(x, tl.load(den_ptr + side * B + i))
    tl.store(out_ptr + (side * B + i).to(tl.int64) * numel + offs, to_gemm(x, GEMM), mask=ok)


def launch_conv_gemm_normalize(x_pos, x_neg, den, norm: str, gemm: int):
    """Kernel C0b (conv steps under autocast): (x̂ of x_pos, x̂ of x_neg or None) in bf16, with kernel C0's ``den``."""
    B = x_pos.shape[0]
    sides = 1 if x_neg is None else 2
    numel = x_pos[0].numel()
    out = x_pos.new_empty((sides * B, *x_pos.shape[1:]), dtype=torch.bfloat16)
    block = min(BLOCK, triton.next_power_of_2(numel))
    launchable(ff_conv_gemm_normalize_kernel)[(triton.cdiv(numel, block), B, sides)](
        x_pos, x_pos if x_neg is None else x_neg, den, out, B, numel, NORM=NORM_CODES[norm], GEMM=gemm, BLOCK=block)
    return out[:B], (out[B:] if sides == 2 else None)

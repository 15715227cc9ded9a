"""Conv kernel C3: the weight gradient as an implicit GEMM, dW = (dL/dz)^T im2col(x̂), with the optimizer in its
epilogue.

Program (n, k, g S + s) owns the (BN, BK) tile of the weight viewed as (C_out, kg): BN output channels of conv group g
by BK of the group's kg = (C_in/groups) kH kW features, and reduces over the GEMM rows (output pixels of the images) of
split s of each side, pos then neg, in blocks of BLOCK_M rows (all rows without a split). Each block's prologue forms
dL/dz of its (rows, channels) from h (as stored) and kernel C2's coefficient of each element's goodness value (per
image, per pixel or per class group): k h (p = 2; k already holds 2s dL/dg) or k 1[h > 0] (p = 1), with the image's
row scale folded in as in the linear kernel 3 (k / d, ``div_rn``; the raw x is gathered by ``im2col_tile``), rounded
to the parameter dtype; the dot accumulates in fp32. The programs with k = 0 own a tile of b and also sum
db = sum dL/dz (unscaled, rounded to the dtype per element, as autograd's dL/dz) in fp32.

Epilogue as kernel 3 (weight_grad_kernel.py): store the gradient (ff_conv_grad), or read kernel C2b's loss and, when
it is finite, apply Adam/SGD (``apply_optimizer``) to the tile in place from the gradient in registers (ff_conv_step):
dW is never materialized. With a split over the rows (``settings.row_splits``: few W tiles, many pixels) each split
stores an fp32 partial and kernel 3b (``ff_split_reduce_kernel``) adds them in split order before the same epilogue.
Fixed reduction orders everywhere, no atomics.

Under torch.autocast (GEMM, a constexpr: with GEMM_PARAM none of this is compiled) x is kernel C0b's bf16 x̂ and NORM
"none": dL/dz = k h (or k 1[h > 0]) in fp32 is rounded to bf16 as the dot's operand, db sums the fp32 dL/dz (fp64),
and the fp32 accumulator (3b: the sum of the splits' partials) is rounded to bf16 and widened before the epilogue.
"""
import torch
import triton
import triton.language as tl

from . import settings
from .conv_im2col import h_offsets, im2col_tile, output_pixels
from .conv_problem import OVER_CODES, ConvProblem
from .ff_math import (
    GEMM_PARAM,
    NORM_CODES,
    NORM_NONE,
    OPTIM_CODES,
    OPTIM_NONE,
    apply_optimizer,
    dot_operand,
    is_finite,
    round_gemm,
    to_gemm,
)
from .launch import launchable
from .optim_args import NO_UPDATE, OptimArgs
from .weight_grad_kernel import _split_reduce

OVER_SAMPLE = tl.constexpr(OVER_CODES["sample"])
OVER_LOCATION = tl.constexpr(OVER_CODES["location"])


@triton.jit
def _reduce_side(acc, bacc, x_ptr, h_ptr, coef_ptr, den_ptr, first_image, r_lo, r_hi, C_in, H, W, C_out, Wo, P, KH, KW,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, cg_in, kg, ng, per_class, g, cols, col_ok, ks,
                 owns_bias, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, POWER: tl.constexpr, OVER: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, GEMM: tl.constexpr):
    """acc += (dL/dz / d)^T im2col(x) and, where ``owns_bias``, bacc += colsum(dL/dz), over rows [r_lo, r_hi) of one
    side, whose images are rows ``first_image`` + ... of the coefficients and divisors."""
    for r0 in range(r_lo, r_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_hi
        img, p, iy0, ix0 = output_pixels(rows, P, Wo, stride_h, stride_w, pad_h, pad_w)
        h = tl.load(h_ptr + h_offsets(img, p, cols, C_out, P), mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        hf = h.to(tl.float32)
        image = first_image + img
        if OVER == OVER_SAMPLE:
            k = tl.load(coef_ptr + image, mask=row_ok, other=0.0)[:, None]
        elif OVER == OVER_LOCATION:
            k = tl.load(coef_ptr + image * ng + p, mask=row_ok, other=0.0)[:, None]
        else:  # the class group of each channel
            k = tl.load(coef_ptr + image[:, None] * ng + (cols // per_class)[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if NORM != NORM_NONE:  # the row scale folded into the coefficient: dL/dz / d
            a = tl.div_rn(k, tl.load(den_ptr + image, mask=row_ok, other=1.0)[:, None])
        else:
            a = k
        if POWER == 2:
            dzs = a * hf
        else:
            dzs = tl.where(hf <= 0.0, 0.0, a)  # relu' = 0 where h <= 0; NaN passes, as in the CPU kernel
        x = im2col_tile(x_ptr, img, iy0, ix0, row_ok, ks, kg, g * cg_in, C_in, H, W, KH, KW, dil_h, dil_w)
        if GEMM == GEMM_PARAM:
            acc = tl.dot(tl.trans(dzs.to(h.dtype)), x, acc, input_precision=INPUT_PRECISION)
        else:  # dL/dz rounded to bf16, x̂ already bf16
            acc = tl.dot(tl.trans(dot_operand(to_gemm(dzs, GEMM), GEMM)), dot_operand(x, GEMM), acc,
                         input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            if owns_bias:  # uniform over the program: only the programs that own a tile of b pay for it
                if POWER == 2:
                    dz = k * hf
                else:
                    dz = tl.where(hf <= 0.0, 0.0, k)
                dz = tl.where(row_ok[:, None], dz, 0.0)
                bacc += tl.sum(dz.to(h.dtype).to(tl.float64), axis=0)
    return acc, bacc


@triton.jit
def ff_conv_weight_grad_kernel(
    xp_ptr, xn_ptr, hp_ptr, hn_ptr,  # x_pos, x_neg (B, C_in, H, W); h_pos, h_neg (B, C_out, Ho, Wo)
    coef_ptr, den_ptr, loss_ptr,  # from kernels C0-C2b: c (sides B, ng) fp32, d (sides B) fp32 or None, the loss
    w_ptr, b_ptr,  # weight (C_out, kg), bias or None: updated in place unless OPTIM_NONE (or SPLIT)
    gw_ptr, gb_ptr,  # out with OPTIM_NONE: grad_weight, grad_bias; with SPLIT: fp32 partials (S, C_out kg), (S, C_out)
    s1w_ptr, s2w_ptr, s1b_ptr, s2b_ptr,  # fp32 optimizer state (adam: exp_avg, exp_avg_sq; sgd: momentum_buffer)
    B, C_in, H, W, C_out, Wo, P, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    cg_in, cg_out, kg, ng, per_class, sides, splits, split_rows,
    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, POWER: tl.constexpr, OVER: tl.constexpr, OPTIM: tl.constexpr,
    MOMENTUM: tl.constexpr, SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GEMM: tl.constexpr,
):
    if OPTIM != OPTIM_NONE:
        if not is_finite(tl.load(loss_ptr).to(tl.float32)):
            return  # a non-finite loss changes nothing (with SPLIT, kernel 3b checks again before it writes)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2) // splits
    split = tl.program_id(2) - g * splits
    chn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = chn < cg_out
    cols = g * cg_out + chn
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_lo = split * split_rows
    r_hi = tl.minimum(r_lo + split_rows, B * P)
    owns_bias = pid_k == 0

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float64)  # as the CPU kernel: its pos and neg halves cancel
    acc, bacc = _reduce_side(acc, bacc, xp_ptr, hp_ptr, coef_ptr, den_ptr, 0, r_lo, r_hi, C_in, H, W, C_out, Wo, P,
                             KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, cg_in, kg, ng, per_class, g, cols,
                             col_ok, ks, owns_bias, NORM, HAS_BIAS, POWER, OVER, INPUT_PRECISION, BLOCK_M, GEMM)
    if sides == 2:
        acc, bacc = _reduce_side(acc, bacc, xn_ptr, hn_ptr, coef_ptr, den_ptr, B, r_lo, r_hi, C_in, H,
                                 W, C_out, Wo, P, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, cg_in, kg,
                                 ng, per_class, g, cols, col_ok, ks, owns_bias, NORM, HAS_BIAS, POWER, OVER,
                                 INPUT_PRECISION, BLOCK_M, GEMM)

    w_offs = cols.to(tl.int64)[:, None] * kg + ks[None, :]
    w_ok = col_ok[:, None] & (ks < kg)[None, :]
    if SPLIT:  # fp32 partials of split s; kernel 3b adds them and applies the epilogue
        part = split.to(tl.int64)
        tl.store(gw_ptr + part * C_out * kg + w_offs, acc, mask=w_ok)
        if HAS_BIAS:
            if owns_bias:
                tl.store(gb_ptr + part * C_out + cols, bacc.to(tl.float32), mask=col_ok)
    else:
        # the gradient as a materialized grad_weight would hold it (parameter dtype), then fp32 for the update
        if GEMM == GEMM_PARAM:
            gw = acc.to(w_ptr.dtype.element_ty)
        else:
            gw = round_gemm(acc, GEMM)  # the bf16 convolution's weight gradient, widened
        if OPTIM == OPTIM_NONE:
            tl.store(gw_ptr + w_offs, gw, mask=w_ok)
        else:
            apply_optimizer(w_ptr, s1w_ptr, s2w_ptr, w_offs, w_ok, gw.to(tl.float32), step_size, one_minus_beta1,
                            beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first, OPTIM, MOMENTUM)
        if HAS_BIAS:
            if owns_bias:
                gb = bacc.to(w_ptr.dtype.element_ty)
                if OPTIM == OPTIM_NONE:
                    tl.store(gb_ptr + cols, gb, mask=col_ok)
                else:
                    apply_optimizer(b_ptr, s1b_ptr, s2b_ptr, cols, col_ok, gb.to(tl.float32), step_size,
                                    one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay,
                                    first, OPTIM, MOMENTUM)


def launch_conv_weight_grad(x_pos, x_neg, h_pos, h_neg, coef, den, loss, weight, bias, pr: ConvProblem, norm: str,
                            power: int, update: OptimArgs = NO_UPDATE, states=(None, None, None, None), gemm: int = 0):
    """Run kernel C3 (and 3b with a split over the rows).

    With ``update`` NO_UPDATE: returns (grad_weight, grad_bias or None). Otherwise updates weight, bias and ``states``
    = (s1 of weight, s2 of weight, s1 of bias, s2 of bias; None where unused) in place, unless ``loss`` is not finite,
    and returns None. ``gemm`` (settings.gemm_code, under autocast): x_pos, x_neg are kernel C0b's bf16 x̂, ``norm``
    "none"; the tiles are bf16's."""
    rows = pr.B * pr.P
    cfg = settings.conv_weight_grad_config(torch.bfloat16 if gemm else weight.dtype, pr.cg_out, pr.kg, rows)
    bn, bk, bm = cfg["n"], cfg["k"], cfg["rows"]
    grid_nk = (triton.cdiv(pr.cg_out, bn), triton.cdiv(pr.kg, bk))
    splits, split_rows = settings.row_splits(grid_nk[0] * grid_nk[1] * pr.groups, rows, bm, weight.device)
    no_update = update.optim == OPTIM_CODES["none"]
    grad_weight = grad_bias = None
    if no_update:
        grad_weight = torch.empty_like(weight)
        grad_bias = torch.empty_like(bias) if bias is not None else None
    if splits > 1:
        out_w = weight.new_empty((splits, pr.C_out, pr.kg), dtype=torch.float32)
        out_b = weight.new_empty((splits, pr.C_out), dtype=torch.float32) if bias is not None else None
    else:
        out_w, out_b = grad_weight, grad_bias
    # without negatives the neg side is not reduced (sides = 1): the pos tensors stand in for its pointers
    launchable(ff_conv_weight_grad_kernel)[(*grid_nk, pr.groups * splits)](
        x_pos, x_pos if x_neg is None else x_neg, h_pos, h_pos if h_neg is None else h_neg, coef, den, loss, weight,
        bias, out_w, out_b, *states, pr.B, **pr.geometry_args(), cg_in=pr.cg_in, cg_out=pr.cg_out, kg=pr.kg, ng=pr.ng,
        per_class=pr.per_class, sides=pr.sides, splits=splits, split_rows=split_rows, **update.scalars,
        NORM=NORM_CODES[norm], HAS_BIAS=bias is not None, POWER=power, OVER=OVER_CODES[pr.over], OPTIM=update.optim,
        MOMENTUM=update.momentum_buffer, SPLIT=splits > 1,
        INPUT_PRECISION=settings.dot_precision(torch.bfloat16 if gemm else weight.dtype), BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_M=bm, GEMM=gemm, num_warps=cfg["warps"])
    if splits > 1:
        _split_reduce(out_w, splits, weight, grad_weight, states[:2], loss, update, gemm=gemm)
        if bias is not None:
            _split_reduce(out_b, splits, bias, grad_bias, states[2:], loss, update)
    return (grad_weight, grad_bias) if no_update else None

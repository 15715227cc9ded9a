"""Kernel 1L: the forward GEMM of the labeled first layer, B rows shared by the positive and the negative.

The positive and the negative of pair i are x_i with the label y+_i or y-_i written one-hot (times ``value``) into
features [0, C) (docs/design.md, "The labeled first layer"). They share the row divisor d_i (the one-hot adds value^2
to the sum of squares whatever the label) and every feature but the label columns, so with x~_i = x_i with features
[0, C) zeroed and lv_i = value / d_i:

    z+_i = (x~_i W^T) / d_i + lv_i W[:, y+_i] + b,    z-_i = (x~_i W^T) / d_i + lv_i W[:, y-_i] + b

Program (m, n) owns rows [m*BM, ...) of x and columns [n*BN, ...) of the output: one K loop for x~ W^T and
sum_{k>=C} x_k^2 serves both sides; the epilogue gathers the two label columns of W per row and stores h+ and h-,
their partial goodness per row into the (N-tiles, 2B) buffer of kernel 1 (pos rows then neg rows), so kernel 2
runs unchanged, and (program n = 0) d. With peer normalization (PEER) it stores the column sums of h+ over its rows
like kernel 1. Labels are clamped to [0, C) before the gather (the op checks them; under torch.compile, where it
cannot read them, an out-of-range label reads a wrong column instead of foreign memory).

Under torch.autocast (GEMM, a constexpr: with GEMM_PARAM none of this is compiled) x is kernel 0's bf16 x~ / d, W its
bf16 copy and NORM "none": x~ W^T is rounded to bf16 (autocast's mm), the label term lv_i W[:, y] reads the bf16 W
with kernel 0's lv_i (value / d_i rounded to bf16, as the explicit pair's label feature; from ``den_ptr``, an input
then) and is added in fp32 after that rounding, as the cpu kernel does; d is not stored.
"""
import torch
import triton
import triton.language as tl

from . import settings
from .ff_math import GEMM_PARAM, NORM_CODES, NORM_NONE, dot_operand, round_gemm, row_denominator
from .launch import launchable


@triton.jit
def _relu_store(z, h_ptr, rows, cols, row_ok, col_ok, N):
    """h = relu(z) (NaN passes) stored; returns h as stored in fp32, zero outside the tile."""
    h = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL).to(h_ptr.dtype.element_ty)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], h, mask=ok)
    return tl.where(ok, h.to(tl.float32), 0.0)


@triton.jit
def ff_forward_labeled_kernel(
    x_ptr, yp_ptr, yn_ptr, w_ptr, b_ptr,  # x (B, K); labels (B,) int64; weight (N, K); bias (N,) or None
    hp_ptr, hn_ptr,  # out: h_pos, h_neg (B, N)
    ss_part_ptr,  # out: (num N-tiles, 2B) fp32, sum of h^2 over the tile's columns, pos rows then neg rows
    den_ptr,  # out: (B,) fp32, the row divisor d; in with GEMM: (B,) fp32, kernel 0's lv
    colsum_part_ptr,  # out with PEER: (num M-tiles, N) fp32, sum of h+ over the tile's rows; else None
    B, N, K, C, label_value, norm_eps,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, PEER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GEMM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (k_ok & (ks >= C))[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if GEMM == GEMM_PARAM:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(dot_operand(x, GEMM), tl.trans(dot_operand(w, GEMM)), acc, input_precision=INPUT_PRECISION)
        if NORM != NORM_NONE:
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)

    d = row_denominator(sum_sq + label_value * label_value, K, norm_eps, NORM)
    if NORM != NORM_NONE:
        z = tl.div_rn(acc, d[:, None])
        lv = tl.div_rn(label_value + tl.zeros_like(d), d)
    else:
        z = acc
        lv = label_value + tl.zeros_like(d)
    if GEMM == GEMM_PARAM:
        lv = lv.to(hp_ptr.dtype.element_ty).to(tl.float32)  # the label feature as x_hat would store it
    else:
        z = round_gemm(z, GEMM)  # the bf16 GEMM's output
        lv = tl.load(den_ptr + rows, mask=row_ok, other=0.0)  # kernel 0's bf16 label feature
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    yp = tl.minimum(tl.maximum(tl.load(yp_ptr + rows, mask=row_ok, other=0), 0), C - 1)
    yn = tl.minimum(tl.maximum(tl.load(yn_ptr + rows, mask=row_ok, other=0), 0), C - 1)
    if GEMM == GEMM_PARAM:
        w_pos = tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + yp[:, None], mask=ok, other=0.0).to(tl.float32)
        w_neg = tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + yn[:, None], mask=ok, other=0.0).to(tl.float32)
    else:  # exact widenings of the bf16 W
        w_pos = dot_operand(tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + yp[:, None], mask=ok, other=0.0),
                            GEMM).to(tl.float32)
        w_neg = dot_operand(tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + yn[:, None], mask=ok, other=0.0),
                            GEMM).to(tl.float32)
    hp = _relu_store(z + lv[:, None] * w_pos, hp_ptr, rows, cols, row_ok, col_ok, N)
    hn = _relu_store(z + lv[:, None] * w_neg, hn_ptr, rows, cols, row_ok, col_ok, N)

    tl.store(ss_part_ptr + pid_n * (2 * B) + rows, tl.sum(hp * hp, axis=1), mask=row_ok)
    tl.store(ss_part_ptr + pid_n * (2 * B) + B + rows, tl.sum(hn * hn, axis=1), mask=row_ok)
    if GEMM == GEMM_PARAM:
        if pid_n == 0:
            tl.store(den_ptr + rows, d, mask=row_ok)
    if PEER:  # peer normalization: the column sums of h+ over this tile's rows
        tl.store(colsum_part_ptr + pid_m * N + cols, tl.sum(hp, axis=0), mask=col_ok)


def launch_forward_labeled(x, label_pos, label_neg, num_classes: int, label_value: float, weight, bias, norm: str,
                           norm_eps: float, peer: bool = False, gemm: int = 0, lv=None):
    """Run kernel 1L. Returns h_pos, h_neg, the partial goodness sums (tiles, 2B), the row divisors (B,) and, with
    ``peer``, the partial column sums of h_pos (M-tiles, N) (else None). ``gemm`` (settings.gemm_code, under
    autocast): x is kernel 0's bf16 x~, ``lv`` its label features, weight the bf16 W, ``norm`` "none"; h is float32
    and there are no divisors (None)."""
    B, K = x.shape
    N = weight.shape[0]
    cfg = settings.forward_config(weight.dtype, N, K, B, settings.is_aligned(x, weight, sizes=(N, K)), labeled=True)
    bm, bn, bk = cfg["m"], cfg["n"], cfg["k"]
    h_dtype = torch.float32 if gemm else x.dtype
    h_pos = x.new_empty((B, N), dtype=h_dtype)
    h_neg = x.new_empty((B, N), dtype=h_dtype)
    n_tiles = triton.cdiv(N, bn)
    ss_part = x.new_empty((n_tiles, 2 * B), dtype=torch.float32)
    den = lv if gemm else x.new_empty((B,), dtype=torch.float32)
    m_tiles = triton.cdiv(B, bm)
    colsum_part = x.new_empty((m_tiles, N), dtype=torch.float32) if peer else None
    launchable(ff_forward_labeled_kernel)[(m_tiles, n_tiles)](
        x, label_pos, label_neg, weight, bias, h_pos, h_neg, ss_part, den, colsum_part,
        B, N, K, num_classes, label_value, norm_eps,
        NORM=NORM_CODES[norm], HAS_BIAS=bias is not None, PEER=peer,
        INPUT_PRECISION=settings.dot_precision(weight.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GEMM=gemm, num_warps=cfg["warps"])
    return h_pos, h_neg, ss_part, None if gemm else den, colsum_part

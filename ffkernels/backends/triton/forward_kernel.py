"""Kernel 1: the forward GEMM over the 2B rows of pos||neg with the FF epilogue.

Program (m, n, side) owns rows [m*BM, (m+1)*BM) of x_pos (side 0) or x_neg (side 1) and columns
[n*BN, (n+1)*BN) of the output. While it streams x through the K loop for z = x W^T it also sums x^2
per row, so the input normalization (a per-row divisor d, x_hat = x / d) is folded into the epilogue:
z = (x W^T) / d + b, h = relu(z). x_hat is never written. The epilogue stores h and the tile's partial
goodness sum_j h_j^2 for its rows; the partials of the N-tiles are combined in a fixed order by kernel 2
(deterministic, no atomics). Program n = 0 also stores d for the weight-gradient kernel.

With peer normalization (PEER, a constexpr: without it none of this is compiled) the positive programs
(side 0) also store their tile's column sums of h, sum_i h+_ij over their rows, into a (num M-tiles, N)
buffer: kernel 2 adds the M-tiles in order for the column mean m_j (one column reduction, no atomics).

Under torch.autocast (GEMM, a constexpr: with GEMM_PARAM none of this is compiled) x is kernel 0's bf16 x̂ and W its
bf16 copy, NORM is "none" (x̂ is already divided), and z = x̂ W^T is rounded to bf16 before the fp32 epilogue (+ b,
relu, goodness), as autocast's mm outputs it; d is not stored (kernel 3 reads x̂ too).
"""
import torch
import triton
import triton.language as tl

from . import settings
from .ff_math import GEMM_PARAM, NORM_CODES, NORM_NONE, dot_operand, round_gemm, row_denominator
from .launch import launchable


@triton.jit
def ff_forward_kernel(
    xp_ptr, xn_ptr, w_ptr, b_ptr,  # x_pos, x_neg (B, K); weight (N, K); bias (N,) or None
    hp_ptr, hn_ptr,  # out: h_pos, h_neg (B, N)
    ss_part_ptr,  # out: (num N-tiles, 2B) fp32, sum of h^2 over the tile's columns, pos rows then neg rows
    den_ptr,  # out: (2B,) fp32, the row divisor d of pos rows then neg rows
    colsum_part_ptr,  # out with PEER: (num M-tiles, N) fp32, sum of h over the tile's pos rows; else None
    B, N, K, norm_eps,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, PEER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GEMM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    side = tl.program_id(2)
    if side == 0:
        x_ptr = xp_ptr
        h_ptr = hp_ptr
    else:
        x_ptr = xn_ptr
        h_ptr = hn_ptr

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
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if GEMM == GEMM_PARAM:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(dot_operand(x, GEMM), tl.trans(dot_operand(w, GEMM)), acc, input_precision=INPUT_PRECISION)
        if NORM != NORM_NONE:
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)

    d = row_denominator(sum_sq, K, norm_eps, NORM)
    if NORM != NORM_NONE:
        z = tl.div_rn(acc, d[:, None])
    else:
        z = acc
    if GEMM != GEMM_PARAM:
        z = round_gemm(z, GEMM)  # the bf16 GEMM's output
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL).to(h_ptr.dtype.element_ty)  # relu(NaN) = NaN
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], h, mask=ok)

    hq = tl.where(ok, h.to(tl.float32), 0.0)  # goodness from h as stored, like the reference
    row_out = side * B + rows
    tl.store(ss_part_ptr + pid_n * (2 * B) + row_out, tl.sum(hq * hq, axis=1), mask=row_ok)
    if GEMM == GEMM_PARAM:
        if pid_n == 0:
            tl.store(den_ptr + row_out, d, mask=row_ok)
    if PEER:
        if side == 0:  # peer normalization: the column sums of h over this tile's positive rows
            tl.store(colsum_part_ptr + pid_m * N + cols, tl.sum(hq, axis=0), mask=col_ok)


def launch_forward(x_pos, x_neg, weight, bias, norm: str, norm_eps: float, peer: bool = False, gemm: int = 0):
    """Run kernel 1. Returns h_pos, h_neg, the partial goodness sums (tiles, 2B), the row divisors (2B,) and,
    with ``peer``, the partial column sums of h_pos (M-tiles, N) (else None). ``gemm`` (settings.gemm_code, under
    autocast): x_pos, x_neg are kernel 0's bf16 x̂ and weight the bf16 W, h is float32, there are no divisors
    (None) and ``norm`` must be "none"."""
    B, K = x_pos.shape
    N = weight.shape[0]
    cfg = settings.forward_config(weight.dtype, N, K, B, settings.is_aligned(x_pos, x_neg, weight, sizes=(N, K)))
    bm, bn, bk = cfg["m"], cfg["n"], cfg["k"]
    h_dtype = torch.float32 if gemm else x_pos.dtype
    h_pos = x_pos.new_empty((B, N), dtype=h_dtype)
    h_neg = x_pos.new_empty((B, N), dtype=h_dtype)
    n_tiles = triton.cdiv(N, bn)
    ss_part = x_pos.new_empty((n_tiles, 2 * B), dtype=torch.float32)
    den = None if gemm else x_pos.new_empty((2 * B,), dtype=torch.float32)
    m_tiles = triton.cdiv(B, bm)
    colsum_part = x_pos.new_empty((m_tiles, N), dtype=torch.float32) if peer else None
    grid = (m_tiles, n_tiles, 2)
    launchable(ff_forward_kernel)[grid](
        x_pos, x_neg, weight, bias, h_pos, h_neg, ss_part, den, colsum_part,
        B, N, K, norm_eps,
        NORM=NORM_CODES[norm], HAS_BIAS=bias is not None, PEER=peer,
        INPUT_PRECISION=settings.dot_precision(weight.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GEMM=gemm, num_warps=cfg["warps"])
    return h_pos, h_neg, ss_part, den, colsum_part

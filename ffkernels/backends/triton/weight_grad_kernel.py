"""Kernel 3: the weight-gradient GEMM, reduced over the 2B rows, with the optimizer in its epilogue.

dW = sum_i (c_i h_i)^T x_hat_i and db = sum_i c_i h_i (docs/design.md). Program (n, k) owns the
(BN, BK) tile of W at rows [n*BN, ...) and columns [k*BK, ...) and reduces over all 2B rows of
pos||neg: the prologue of each step forms dL/dz = c * h and x_hat = x / d for a block of rows (both
rounded to the parameter dtype, as autograd forms them), the dot accumulates in fp32. Programs with
k = 0 also reduce db for their columns.

Epilogue, by ``OPTIM``:
  * OPTIM_NONE: store the gradient tile (ff_grad).
  * OPTIM_ADAM / OPTIM_SGD: apply the optimizer to the W tile (and the b tile) this program owns, in
    place, from the gradient still in registers: dW is never materialized (ff_step). The loss written
    by kernel 2 is read first; if it is not finite the program returns before touching anything.

Peer normalization (PEER, a constexpr: without it none of this is compiled): the prologue of the positive
rows forms dL/dz = c h + v with kernel 2's per-unit v_j (for every positive row and unit, also where
h = 0), so dW gains v (x) sum_i x_hat+_i and db gains B v inside the same GEMM -- no extra pass over x.
With an update, the programs with k = 0 also commit r <- r' for their units after the loss check, so a
non-finite loss leaves r unchanged too.
"""
import torch
import triton
import triton.language as tl

from . import settings
from .ff_math import (
    NORM_CODES,
    NORM_NONE,
    OPTIM_CODES,
    OPTIM_NONE,
    apply_optimizer,
    is_finite,
)
from .launch import launchable
from .optim_args import NO_UPDATE, OptimArgs


@triton.jit
def _reduce_rows(acc, bacc, x_ptr, h_ptr, coef_ptr, den_ptr, v_ptr, B, N, K, cols, ks,
                 NORM: tl.constexpr, PEER: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr):
    """acc += (dL/dz)^T x_hat and bacc += colsum(dL/dz) over the B rows of one side (pos or neg), with
    dL/dz = c h, plus v for every (row, unit) with PEER (the positive side of peer normalization)."""
    col_ok = cols < N
    k_ok = ks < K
    if PEER:
        v = tl.load(v_ptr + cols, mask=col_ok, other=0.0)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r64 = rows.to(tl.int64)[:, None]
        c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        h = tl.load(h_ptr + r64 * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if PEER:
            dz = tl.where(row_ok[:, None], c[:, None] * h.to(tl.float32) + v[None, :], 0.0).to(h.dtype)
        else:
            dz = (c[:, None] * h.to(tl.float32)).to(h.dtype)
        x = tl.load(x_ptr + r64 * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM != NORM_NONE:
            d = tl.load(den_ptr + rows, mask=row_ok, other=1.0)
            x = tl.div_rn(x.to(tl.float32), d[:, None]).to(h.dtype)
        acc = tl.dot(tl.trans(dz), x, acc, input_precision=INPUT_PRECISION)
        bacc += tl.sum(dz.to(tl.float32), axis=0)
    return acc, bacc


@triton.jit
def ff_weight_grad_kernel(
    xp_ptr, xn_ptr, hp_ptr, hn_ptr,  # x_pos, x_neg (B, K); h_pos, h_neg (B, N)
    coef_ptr, den_ptr, loss_ptr,  # from kernels 1 and 2: c and d of the 2B rows (fp32); the loss
    v_ptr, r_new_ptr, r_ptr,  # with PEER: v and r' (N,) fp32 from kernel 2; r (peer_mean), committed with an update
    w_ptr, b_ptr,  # weight (N, K), bias (N,) or None: updated in place unless OPTIM_NONE
    gw_ptr, gb_ptr,  # out with OPTIM_NONE: grad_weight, grad_bias
    s1w_ptr, s2w_ptr, s1b_ptr, s2b_ptr,  # fp32 optimizer state (adam: exp_avg, exp_avg_sq; sgd: momentum_buffer)
    B, N, K,
    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, PEER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    if OPTIM != OPTIM_NONE:
        if not is_finite(tl.load(loss_ptr).to(tl.float32)):
            return  # a non-finite loss changes nothing
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc, bacc = _reduce_rows(acc, bacc, xp_ptr, hp_ptr, coef_ptr, den_ptr, v_ptr, B, N, K, cols, ks,
                             NORM, PEER, INPUT_PRECISION, BLOCK_B)
    acc, bacc = _reduce_rows(acc, bacc, xn_ptr, hn_ptr, coef_ptr + B, den_ptr + B, v_ptr, B, N, K, cols, ks,
                             NORM, False, INPUT_PRECISION, BLOCK_B)

    col_ok = cols < N
    w_offs = cols.to(tl.int64)[:, None] * K + ks[None, :]
    w_ok = col_ok[:, None] & (ks < K)[None, :]
    # the gradient as a materialized grad_weight would hold it (parameter dtype), then fp32 for the update
    gw = acc.to(w_ptr.dtype.element_ty)
    if OPTIM == OPTIM_NONE:
        tl.store(gw_ptr + w_offs, gw, mask=w_ok)
    else:
        apply_optimizer(w_ptr, s1w_ptr, s2w_ptr, w_offs, w_ok, gw.to(tl.float32), step_size, one_minus_beta1,
                        beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first, OPTIM, MOMENTUM)
    if HAS_BIAS:
        if pid_k == 0:
            gb = bacc.to(w_ptr.dtype.element_ty)
            if OPTIM == OPTIM_NONE:
                tl.store(gb_ptr + cols, gb, mask=col_ok)
            else:
                apply_optimizer(b_ptr, s1b_ptr, s2b_ptr, cols, col_ok, gb.to(tl.float32), step_size,
                                one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay,
                                first, OPTIM, MOMENTUM)
    if PEER:
        if OPTIM != OPTIM_NONE:
            if pid_k == 0:  # the loss is finite (checked above): r <- r' for this program's units
                tl.store(r_ptr + cols, tl.load(r_new_ptr + cols, mask=col_ok, other=0.0), mask=col_ok)


def launch_weight_grad(x_pos, x_neg, h_pos, h_neg, coef, den, loss, weight, bias, norm: str,
                       update: OptimArgs = NO_UPDATE, states=(None, None, None, None), peer=None):
    """Run kernel 3.

    With ``update`` NO_UPDATE: returns (grad_weight, grad_bias or None). Otherwise updates weight, bias
    and ``states`` = (s1 of weight, s2 of weight, s1 of bias, s2 of bias; None where unused) in place,
    unless ``loss`` is not finite, and returns None. ``peer`` = (v, r', r) with peer normalization: v enters
    dL/dz of the positive rows; with an update, r <- r' unless the loss is not finite.
    """
    v, r_new, r = peer if peer is not None else (None, None, None)
    B, K = x_pos.shape
    N = weight.shape[0]
    tiles = settings.max_tiles(weight.dtype)
    bn, bk, bb = settings.block(N, tiles["n"]), settings.block(K, tiles["k"]), settings.block(B, tiles["rows"])
    grad_weight = grad_bias = None
    if update.optim == OPTIM_CODES["none"]:
        grad_weight = torch.empty_like(weight)
        grad_bias = torch.empty_like(bias) if bias is not None else None
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    launchable(ff_weight_grad_kernel)[grid](
        x_pos, x_neg, h_pos, h_neg, coef, den, loss, v, r_new, r, weight, bias, grad_weight, grad_bias, *states,
        B, N, K, **update.scalars,
        NORM=NORM_CODES[norm], HAS_BIAS=bias is not None, OPTIM=update.optim, MOMENTUM=update.momentum_buffer,
        PEER=peer is not None,
        INPUT_PRECISION=settings.dot_precision(weight.dtype), BLOCK_N=bn, BLOCK_K=bk, BLOCK_B=bb,
        num_warps=settings.NUM_WARPS)
    return (grad_weight, grad_bias) if update.optim == OPTIM_CODES["none"] else None

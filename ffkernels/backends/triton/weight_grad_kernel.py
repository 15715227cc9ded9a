"""Kernel 3: the weight-gradient GEMM, reduced over the 2B rows, with the optimizer in its epilogue.

dW = sum_i (c_i h_i)^T x_hat_i and db = sum_i c_i h_i (docs/design.md). Program (n, k, s) owns the
(BN, BK) tile of W at rows [n*BN, ...) and columns [k*BK, ...) and reduces over the rows of split s of
pos||neg (all of them without a split). The row scale is folded into the per-row coefficient, as the
identity x_hat_i = x_i / d_i allows: dW = sum_i ((c_i / d_i) h_i)^T x_i, so the raw x feeds the dot and each
row block costs one division per row (c_i / d_i, ``div_rn``), not one per element of x. The prologue of each
step forms the scaled dL/dz = (c_i / d_i) h_i rounded to the parameter dtype, the dot accumulates in fp32.
Only the programs with k = 0 (the ones that own a tile of b) reduce db: sum_i c_i h_i rounded to the dtype per
row, as autograd's dL/dz, summed in fp32.

Epilogue, by ``OPTIM`` (without a split):
  * OPTIM_NONE: store the gradient tile (ff_grad).
  * OPTIM_ADAM / OPTIM_SGD: apply the optimizer to the W tile (and the b tile) this program owns, in
    place, from the gradient still in registers: dW is never materialized (ff_step). The loss written
    by kernel 2 is read first; if it is not finite the program returns before touching anything.

Split over the rows (``settings.row_splits``: small layers, whose W tiles are fewer than the GPU's SMs): program
(n, k, s) stores its fp32 partial tile (and partial db) into a (S, N, K) buffer (and (S, N)); then kernel 3b,
``ff_split_reduce_kernel``, elementwise, adds the S partials in split order, rounds to the dtype (the gradient as
materialized) and stores it or applies the optimizer, with the same loss check. No atomics: fixed order.

Peer normalization (PEER, a constexpr: without it none of this is compiled): the prologue of the positive
rows forms dL/dz = c h + v with kernel 2's per-unit v_j (for every positive row and unit, also where
h = 0), so dW gains v (x) sum_i x_hat+_i and db gains B v inside the same GEMM -- no extra pass over x.
With an update, the programs with k = 0 (the reduce kernel without a split) also commit r <- r' for their units
after the loss check, so a non-finite loss leaves r unchanged too.

Under torch.autocast (GEMM, a constexpr: with GEMM_PARAM none of this is compiled) x is kernel 0's bf16 x̂ and NORM
is "none": dL/dz = c h (+ v) in fp32 is rounded to bf16 as the dot's operand (no row scale: x̂ is already divided), db
sums the fp32 dL/dz, and the fp32 accumulator is rounded to bf16 and widened before the epilogue (kernel 3b rounds
the sum of the splits' partials): the bf16 GEMM's dW, which the fp32 optimizer reads or ff_grad returns. The labeled
first layer's label columns take the explicit rows with kernel 0's lv_i (bf16 value / d_i, read from ``den_ptr``).
"""
import torch
import triton
import triton.language as tl

from . import settings
from .ff_math import (
    NORM_CODES,
    NORM_NONE,
    OPTIM_CODES,
    GEMM_PARAM,
    OPTIM_NONE,
    apply_optimizer,
    dot_operand,
    is_finite,
    round_gemm,
    to_gemm,
)
from .launch import launchable
from .optim_args import NO_UPDATE, OptimArgs


@triton.jit
def _reduce_rows(acc, bacc, x_ptr, h_ptr, coef_ptr, den_ptr, v_ptr, r_lo, r_hi, N, K, cols, ks, owns_bias,
                 NORM: tl.constexpr, HAS_BIAS: tl.constexpr, PEER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, GEMM: tl.constexpr):
    """acc += (dL/dz / d)^T x and, with HAS_BIAS where ``owns_bias``, bacc += colsum(dL/dz) over rows [r_lo, r_hi) of one side
    (pos or neg), with dL/dz = c h, plus v for every (row, unit) with PEER (the positive side of peer
    normalization)."""
    col_ok = cols < N
    k_ok = ks < K
    if PEER:
        v = tl.load(v_ptr + cols, mask=col_ok, other=0.0)
    for r0 in range(r_lo, r_hi, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < r_hi
        r64 = rows.to(tl.int64)[:, None]
        c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        h = tl.load(h_ptr + r64 * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        hf = h.to(tl.float32)
        if NORM != NORM_NONE:  # the row scale, folded into the row's coefficient: (c h + v) / d
            d = tl.load(den_ptr + rows, mask=row_ok, other=1.0)
            a = tl.div_rn(c, d)
            if PEER:
                dzs = tl.where(row_ok[:, None], a[:, None] * hf + v[None, :] * tl.div_rn(1.0, d)[:, None], 0.0)
            else:
                dzs = a[:, None] * hf
        else:
            if PEER:
                dzs = tl.where(row_ok[:, None], c[:, None] * hf + v[None, :], 0.0)
            else:
                dzs = c[:, None] * hf
        x = tl.load(x_ptr + r64 * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if GEMM == GEMM_PARAM:
            acc = tl.dot(tl.trans(dzs.to(h.dtype)), x, acc, input_precision=INPUT_PRECISION)
        else:  # dL/dz rounded to bf16, x̂ already bf16
            acc = tl.dot(tl.trans(dot_operand(to_gemm(dzs, GEMM), GEMM)), dot_operand(x, GEMM), acc,
                         input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            if owns_bias:  # uniform over the program: only the programs that own a tile of b pay for it
                if PEER:
                    dz = tl.where(row_ok[:, None], c[:, None] * hf + v[None, :], 0.0)
                else:
                    dz = c[:, None] * hf
                bacc += tl.sum(dz.to(h.dtype).to(tl.float32), axis=0)
    return acc, bacc


@triton.jit
def _reduce_rows_labeled(acc, bacc, x_ptr, hp_ptr, hn_ptr, yp_ptr, yn_ptr, coef_ptr, den_ptr, v_ptr, r_lo, r_hi, B, N,
                         K, C, label_value, cols, ks, owns_bias, label_tile, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                         PEER: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                         GEMM: tl.constexpr):
    """The labeled first layer over rows [r_lo, r_hi) of x, both sides at once: row i's positive and negative are
    x~_i (x with features [0, C) zeroed) plus the one-hot value e_{y_i}, both divided by d_i. Outside the label
    columns they share x~, so one dot of ((dL/dz+ + dL/dz-) / d)^T x~ serves both; a tile with label columns
    (``label_tile``) takes the two explicit rows, (dL/dz+ / d)^T x+ + (dL/dz- / d)^T x-. db: sum of
    dL/dz+ + dL/dz- rounded to the dtype per row (as the shared row's dL/dz)."""
    col_ok = cols < N
    k_ok = ks < K
    if PEER:
        v = tl.load(v_ptr + cols, mask=col_ok, other=0.0)
    for r0 in range(r_lo, r_hi, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < r_hi
        r64 = rows.to(tl.int64)[:, None]
        cp = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        cn = tl.load(coef_ptr + B + rows, mask=row_ok, other=0.0)
        h_ok = row_ok[:, None] & col_ok[None, :]
        hp = tl.load(hp_ptr + r64 * N + cols[None, :], mask=h_ok, other=0.0)
        hn = tl.load(hn_ptr + r64 * N + cols[None, :], mask=h_ok, other=0.0).to(tl.float32)
        dt = hp.dtype
        hp = hp.to(tl.float32)
        if NORM != NORM_NONE:
            d = tl.load(den_ptr + rows, mask=row_ok, other=1.0)
            ap = tl.div_rn(cp, d)
            an = tl.div_rn(cn, d)
        else:
            ap = cp
            an = cn
        dzp = ap[:, None] * hp
        if PEER:
            if NORM != NORM_NONE:
                dzp = tl.where(row_ok[:, None], dzp + v[None, :] * tl.div_rn(1.0, d)[:, None], 0.0)
            else:
                dzp = tl.where(row_ok[:, None], dzp + v[None, :], 0.0)
        dzn = an[:, None] * hn
        x = tl.load(x_ptr + r64 * K + ks[None, :], mask=row_ok[:, None] & (k_ok & (ks >= C))[None, :], other=0.0)
        if GEMM == GEMM_PARAM:
            if label_tile:  # uniform over the program
                yp = tl.load(yp_ptr + rows, mask=row_ok, other=0)
                yn = tl.load(yn_ptr + rows, mask=row_ok, other=0)
                xp = tl.where(ks[None, :] == yp[:, None], label_value, x.to(tl.float32)).to(dt)
                xn = tl.where(ks[None, :] == yn[:, None], label_value, x.to(tl.float32)).to(dt)
                acc = tl.dot(tl.trans(dzp.to(dt)), xp, acc, input_precision=INPUT_PRECISION)
                acc = tl.dot(tl.trans(dzn.to(dt)), xn, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(tl.trans((dzp + dzn).to(dt)), x, acc, input_precision=INPUT_PRECISION)
        else:  # x is kernel 0's bf16 x~ (label columns zero); den_ptr holds lv_i, the bf16 label feature
            if label_tile:
                yp = tl.load(yp_ptr + rows, mask=row_ok, other=0)
                yn = tl.load(yn_ptr + rows, mask=row_ok, other=0)
                lv = tl.load(den_ptr + rows, mask=row_ok, other=0.0)[:, None]
                xw = dot_operand(x, GEMM).to(tl.float32)  # exact: bf16 values
                xp = dot_operand(to_gemm(tl.where(ks[None, :] == yp[:, None], lv, xw), GEMM), GEMM)
                xn = dot_operand(to_gemm(tl.where(ks[None, :] == yn[:, None], lv, xw), GEMM), GEMM)
                acc = tl.dot(tl.trans(dot_operand(to_gemm(dzp, GEMM), GEMM)), xp, acc, input_precision=INPUT_PRECISION)
                acc = tl.dot(tl.trans(dot_operand(to_gemm(dzn, GEMM), GEMM)), xn, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(tl.trans(dot_operand(to_gemm(dzp + dzn, GEMM), GEMM)), dot_operand(x, GEMM), acc,
                             input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            if owns_bias:
                dz = cp[:, None] * hp
                if PEER:
                    dz = tl.where(row_ok[:, None], dz + v[None, :], 0.0)
                bacc += tl.sum((dz + cn[:, None] * hn).to(dt).to(tl.float32), axis=0)
    return acc, bacc


@triton.jit
def ff_weight_grad_kernel(
    xp_ptr, xn_ptr, hp_ptr, hn_ptr,  # x_pos, x_neg (B, K); h_pos, h_neg (B, N)
    coef_ptr, den_ptr, loss_ptr,  # from kernels 1 and 2: c and d of the 2B rows (fp32); the loss
    v_ptr, r_new_ptr, r_ptr,  # with PEER: v and r' (N,) fp32 from kernel 2; r (peer_mean), committed with an update
    w_ptr, b_ptr,  # weight (N, K), bias (N,) or None: updated in place unless OPTIM_NONE (or SPLIT)
    gw_ptr, gb_ptr,  # out with OPTIM_NONE: grad_weight, grad_bias; with SPLIT: fp32 partials (S, N, K), (S, N)
    s1w_ptr, s2w_ptr, s1b_ptr, s2b_ptr,  # fp32 optimizer state (adam: exp_avg, exp_avg_sq; sgd: momentum_buffer)
    yp_ptr, yn_ptr,  # with LABELED: the labels (B,) int64 (xp_ptr is x, xn_ptr unused, den_ptr (B,)); else None
    B, N, K, split_rows,  # split_rows: rows per side of one split (a multiple of BLOCK_B; >= B without a split)
    C, label_value,  # with LABELED: the classes (label features [0, C)) and the one-hot's value
    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, PEER: tl.constexpr,
    SPLIT: tl.constexpr, LABELED: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, GEMM: tl.constexpr,
):
    if OPTIM != OPTIM_NONE:
        if not is_finite(tl.load(loss_ptr).to(tl.float32)):
            return  # a non-finite loss changes nothing (with SPLIT, kernel 3b checks again before it writes)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if SPLIT:
        r_lo = tl.program_id(2) * split_rows
        r_hi = tl.minimum(r_lo + split_rows, B)
    else:
        r_lo = 0
        r_hi = B
    owns_bias = pid_k == 0

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if LABELED:
        acc, bacc = _reduce_rows_labeled(acc, bacc, xp_ptr, hp_ptr, hn_ptr, yp_ptr, yn_ptr, coef_ptr, den_ptr, v_ptr,
                                         r_lo, r_hi, B, N, K, C, label_value, cols, ks, owns_bias,
                                         pid_k * BLOCK_K < C, NORM, HAS_BIAS, PEER, INPUT_PRECISION, BLOCK_B, GEMM)
    else:
        acc, bacc = _reduce_rows(acc, bacc, xp_ptr, hp_ptr, coef_ptr, den_ptr, v_ptr, r_lo, r_hi, N, K, cols, ks,
                                 owns_bias, NORM, HAS_BIAS, PEER, INPUT_PRECISION, BLOCK_B, GEMM)
        acc, bacc = _reduce_rows(acc, bacc, xn_ptr, hn_ptr, coef_ptr + B, den_ptr + B, v_ptr, r_lo, r_hi, N, K,
                                 cols, ks, owns_bias, NORM, HAS_BIAS, False, INPUT_PRECISION, BLOCK_B, GEMM)

    col_ok = cols < N
    w_offs = cols.to(tl.int64)[:, None] * K + ks[None, :]
    w_ok = col_ok[:, None] & (ks < K)[None, :]
    if SPLIT:  # fp32 partials of split s; kernel 3b adds them and applies the epilogue
        part = tl.program_id(2).to(tl.int64)
        tl.store(gw_ptr + part * N * K + w_offs, acc, mask=w_ok)
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(gb_ptr + part * N + cols, bacc, mask=col_ok)
    else:
        # the gradient as a materialized grad_weight would hold it (parameter dtype), then fp32 for the update
        if GEMM == GEMM_PARAM:
            gw = acc.to(w_ptr.dtype.element_ty)
        else:
            gw = round_gemm(acc, GEMM)  # the bf16 GEMM's output, widened
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


@triton.jit
def ff_split_reduce_kernel(
    part_ptr, splits, numel,  # (splits, numel) fp32 partial gradients of one parameter
    p_ptr, g_ptr, s1_ptr, s2_ptr,  # the parameter; out with OPTIM_NONE: its gradient (else None); fp32 state
    loss_ptr, r_new_ptr, r_ptr, n_r,  # the loss; with PEER_COMMIT: r <- r' for the first n_r elements
    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first,
    OPTIM: tl.constexpr, MOMENTUM: tl.constexpr, PEER_COMMIT: tl.constexpr, BLOCK: tl.constexpr, GEMM: tl.constexpr,
):
    """Kernel 3b: the gradient = the splits' partials added in split order, rounded to the parameter dtype (to bf16
    and widened, GEMM: the weight's under autocast); stored (OPTIM_NONE) or applied in place (after the loss check,
    as kernel 3 does)."""
    if OPTIM != OPTIM_NONE:
        if not is_finite(tl.load(loss_ptr).to(tl.float32)):
            return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(splits):  # advancing the pointers (64-bit) by numel: no int32 product s * numel
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += numel
    if GEMM == GEMM_PARAM:
        g = acc.to(p_ptr.dtype.element_ty)  # the gradient as a materialized grad would hold it
    else:
        g = round_gemm(acc, GEMM)
    if OPTIM == OPTIM_NONE:
        tl.store(g_ptr + offs, g, mask=ok)
    else:
        apply_optimizer(p_ptr, s1_ptr, s2_ptr, offs, ok, g.to(tl.float32), step_size, one_minus_beta1, beta2,
                        one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay, first, OPTIM, MOMENTUM)
    if PEER_COMMIT:
        r_ok = offs < n_r
        tl.store(r_ptr + offs, tl.load(r_new_ptr + offs, mask=r_ok, other=0.0), mask=r_ok)


REDUCE_BLOCK = 1024


def _split_reduce(part, splits: int, param, grad, states, loss, update: OptimArgs, peer_commit=None,
                  gemm: int = 0) -> None:
    """Kernel 3b over one parameter: ``grad`` out (OPTIM_NONE), else ``param`` and its ``states`` in place; ``gemm``:
    the gradient of a bf16 GEMM (the weight's under autocast), rounded to bf16."""
    numel = param.numel()
    r_new, r = peer_commit if peer_commit is not None else (None, None)
    launchable(ff_split_reduce_kernel)[(triton.cdiv(numel, REDUCE_BLOCK),)](
        part, splits, numel, param, grad, *states, loss, r_new, r,
        r.numel() if r is not None else 0, **update.scalars,
        OPTIM=update.optim, MOMENTUM=update.momentum_buffer, PEER_COMMIT=peer_commit is not None,
        BLOCK=REDUCE_BLOCK, GEMM=gemm)


def launch_weight_grad(x_pos, x_neg, h_pos, h_neg, coef, den, loss, weight, bias, norm: str,
                       update: OptimArgs = NO_UPDATE, states=(None, None, None, None), peer=None, labels=None,
                       gemm: int = 0):
    """Run kernel 3 (and 3b with a split over the rows).

    With ``update`` NO_UPDATE: returns (grad_weight, grad_bias or None). Otherwise updates weight, bias
    and ``states`` = (s1 of weight, s2 of weight, s1 of bias, s2 of bias; None where unused) in place,
    unless ``loss`` is not finite, and returns None. ``peer`` = (v, r', r) with peer normalization: v enters
    dL/dz of the positive rows; with an update, r <- r' unless the loss is not finite. ``labels`` = (label_pos,
    label_neg, num_classes, label_value) for the labeled first layer: x_pos is x, x_neg is ignored, den is (B,).
    ``gemm`` (settings.gemm_code, under autocast): x_pos, x_neg are kernel 0's bf16 x̂, ``norm`` must be "none", den
    is None (labeled: kernel 0's lv); the tiles are bf16's.
    """
    v, r_new, r = peer if peer is not None else (None, None, None)
    y_pos, y_neg, num_classes, label_value = labels if labels is not None else (None, None, 0, 0.0)
    B, K = x_pos.shape
    N = weight.shape[0]
    aligned = settings.is_aligned(x_pos, x_neg, h_pos, h_neg, weight, sizes=(N, K))
    cfg = settings.weight_grad_config(torch.bfloat16 if gemm else weight.dtype, N, K, B, aligned,
                                      labeled=labels is not None, autocast=bool(gemm))
    bn, bk, bb = cfg["n"], cfg["k"], cfg["rows"]
    grid_nk = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    splits, split_rows = settings.row_splits(grid_nk[0] * grid_nk[1], B, bb, weight.device)
    no_update = update.optim == OPTIM_CODES["none"]
    grad_weight = grad_bias = None
    if no_update:
        grad_weight = torch.empty_like(weight)
        grad_bias = torch.empty_like(bias) if bias is not None else None
    if splits > 1:
        out_w = weight.new_empty((splits, N, K), dtype=torch.float32)
        out_b = weight.new_empty((splits, N), dtype=torch.float32) if bias is not None else None
    else:
        out_w, out_b = grad_weight, grad_bias
    if den is None:  # autocast, x̂ given: no divisors, and den_ptr + B is not read (norm "none"); coef stands in
        den = coef
    launchable(ff_weight_grad_kernel)[(*grid_nk, splits)](
        x_pos, x_neg, h_pos, h_neg, coef, den, loss, v, r_new, r, weight, bias, out_w, out_b, *states, y_pos, y_neg,
        B, N, K, split_rows, num_classes, label_value, **update.scalars,
        NORM=NORM_CODES[norm], HAS_BIAS=bias is not None, OPTIM=update.optim, MOMENTUM=update.momentum_buffer,
        PEER=peer is not None, SPLIT=splits > 1, LABELED=labels is not None,
        INPUT_PRECISION=settings.dot_precision(torch.bfloat16 if gemm else weight.dtype), BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_B=bb, GEMM=gemm, num_warps=cfg["warps"])
    if splits > 1:
        commit = (r_new, r) if peer is not None and not no_update else None
        _split_reduce(out_w, splits, weight, grad_weight, states[:2], loss, update, commit, gemm)
        if bias is not None:
            _split_reduce(out_b, splits, bias, grad_bias, states[2:], loss, update)
    return (grad_weight, grad_bias) if no_update else None

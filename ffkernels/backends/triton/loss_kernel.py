"""Kernel 2: goodness, the per-row dL/dz coefficient and the loss.

One program walks the B pos/neg pairs in blocks: it sums the partial goodness of the N-tiles of
kernel 1 (in tile order), writes g_pos/g_neg, evaluates the pair's loss terms (symba couples row i of
x_pos with row i of x_neg) and writes the coefficients c (dL/dz = c * h) of the 2B rows. The loss is
summed in a fixed order: the result does not depend on the launch.

With peer normalization (PEER, a constexpr: without it none of this is compiled) the same program then
walks the N units twice: it adds kernel 1's per-M-tile column sums of h_pos in tile order for m_j, forms
r'_j = mu r_j + (1 - mu) m_j and their mean rbar' (first pass), then writes r' and the per-unit term
v_j = lambda (2/N) (r'_j - rbar') (1 - mu) / B that kernel 3 adds to dL/dz of the positive rows, and
adds L_peer = lambda mean_j (rbar' - r'_j)^2 to the loss before storing it (second pass; r' is recomputed
bit-identically rather than read back). Kernel 3 reads that loss to decide whether to update, so the
non-finite rule covers L_peer. r itself is only read here.
"""
import torch
import triton
import triton.language as tl

from ...config import FFConfig

from .ff_math import (
    GOODNESS_CODES,
    LOSS_CODES,
    coef_from_dg,
    goodness_scale,
    pair_terms,
    peer_dz,
    peer_running_mean,
)
from .launch import launchable


@triton.jit
def _peer_r_new(colsum_part_ptr, r_ptr, units, ok, B, N, num_m_tiles, mu, one_minus_mu):
    """r' of ``units``: the M-tiles' column sums of h_pos added in tile order, then the running mean."""
    colsum = tl.zeros(units.shape, dtype=tl.float32)
    for t in range(num_m_tiles):
        colsum += tl.load(colsum_part_ptr + t * N + units, mask=ok, other=0.0)
    r = tl.load(r_ptr + units, mask=ok, other=0.0).to(tl.float32)
    return peer_running_mean(r, colsum, B, mu, one_minus_mu)


@triton.jit
def ff_loss_kernel(
    ss_part_ptr,  # (num_tiles, 2B) fp32 from kernel 1
    gp_ptr, gn_ptr,  # out: g_pos, g_neg (B,)
    coef_ptr,  # out: (2B,) fp32, c of pos rows then neg rows
    loss_ptr,  # out: () the loss, in the dtype of g
    colsum_part_ptr,  # with PEER: (num_m_tiles, N) fp32 from kernel 1, column sums of h_pos per M-tile
    r_ptr,  # with PEER: (N,) fp32, the running mean r (peer_mean), read only
    r_new_ptr, v_ptr,  # out with PEER: (N,) fp32, r' and the dL/dz term v of the positive rows
    B, N, num_tiles, threshold, threshold_neg, symba_alpha, scff_lambda,
    num_m_tiles, peer_norm, mu, one_minus_mu, v_scale,  # used with PEER only
    GOODNESS: tl.constexpr, LOSS: tl.constexpr, PEER: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_UNITS: tl.constexpr,
):
    s = goodness_scale(N, GOODNESS)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        ok = rows < B
        ss_pos = tl.zeros((BLOCK,), dtype=tl.float32)
        ss_neg = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(num_tiles):
            ss_pos += tl.load(ss_part_ptr + t * (2 * B) + rows, mask=ok, other=0.0)
            ss_neg += tl.load(ss_part_ptr + t * (2 * B) + B + rows, mask=ok, other=0.0)
        # g as stored (in the output dtype) is what the loss sees, like the reference
        g_pos = (s * ss_pos).to(gp_ptr.dtype.element_ty)
        g_neg = (s * ss_neg).to(gn_ptr.dtype.element_ty)
        tl.store(gp_ptr + rows, g_pos, mask=ok)
        tl.store(gn_ptr + rows, g_neg, mask=ok)
        loss, dg_pos, dg_neg = pair_terms(g_pos.to(tl.float32), g_neg.to(tl.float32), threshold, threshold_neg,
                                          symba_alpha, scff_lambda, B, LOSS)
        tl.store(coef_ptr + rows, coef_from_dg(dg_pos, s), mask=ok)
        tl.store(coef_ptr + B + rows, coef_from_dg(dg_neg, s), mask=ok)
        total += tl.where(ok, loss, 0.0)
    loss_total = tl.sum(total, axis=0)
    if PEER:
        r_sum = tl.zeros((BLOCK_UNITS,), dtype=tl.float32)
        for j0 in range(0, N, BLOCK_UNITS):
            units = j0 + tl.arange(0, BLOCK_UNITS)
            ok = units < N
            r_new = _peer_r_new(colsum_part_ptr, r_ptr, units, ok, B, N, num_m_tiles, mu, one_minus_mu)
            r_sum += tl.where(ok, r_new, 0.0)
        r_bar = tl.div_rn(tl.sum(r_sum, axis=0), N * 1.0)
        dev_sq = tl.zeros((BLOCK_UNITS,), dtype=tl.float32)
        for j0 in range(0, N, BLOCK_UNITS):
            units = j0 + tl.arange(0, BLOCK_UNITS)
            ok = units < N
            r_new = _peer_r_new(colsum_part_ptr, r_ptr, units, ok, B, N, num_m_tiles, mu, one_minus_mu)
            tl.store(r_new_ptr + units, r_new, mask=ok)
            tl.store(v_ptr + units, peer_dz(r_new, r_bar, v_scale), mask=ok)
            dev = tl.where(ok, r_bar - r_new, 0.0)
            dev_sq += dev * dev
        loss_total += peer_norm * tl.div_rn(tl.sum(dev_sq, axis=0), N * 1.0)
    tl.store(loss_ptr, loss_total.to(loss_ptr.dtype.element_ty))


def peer_scalars(B: int, N: int, peer_norm: float, peer_momentum: float) -> dict:
    """Kernel 2's peer-normalization scalars, computed on the host in double like the optimizer constants."""
    return {"peer_norm": peer_norm, "mu": peer_momentum, "one_minus_mu": 1.0 - peer_momentum,
            "v_scale": peer_norm * 2.0 * (1.0 - peer_momentum) / (N * B)}


def launch_loss(ss_part, B: int, N: int, dtype: torch.dtype, cfg: FFConfig, peer=None):
    """Run kernel 2 with the goodness and loss options of ``cfg``. Returns loss (0-d), g_pos, g_neg (B,) in ``dtype``,
    the row coefficients (2B,) fp32 and, with ``peer`` = (colsum_part, r, peer_norm, peer_momentum), r' and v (N,)
    fp32 (else None, None)."""
    g_pos = ss_part.new_empty((B,), dtype=dtype)
    g_neg = ss_part.new_empty((B,), dtype=dtype)
    coef = ss_part.new_empty((2 * B,))
    loss_out = ss_part.new_empty((), dtype=dtype)
    block = min(triton.next_power_of_2(B), 1024)
    colsum_part = r = r_new = v = None
    scalars = peer_scalars(B, N, 0.0, 0.0)
    if peer is not None:
        colsum_part, r, peer_norm, peer_momentum = peer
        r_new = ss_part.new_empty((N,))
        v = ss_part.new_empty((N,))
        scalars = peer_scalars(B, N, peer_norm, peer_momentum)
    launchable(ff_loss_kernel)[(1,)](
        ss_part, g_pos, g_neg, coef, loss_out, colsum_part, r, r_new, v, B, N, ss_part.shape[0], cfg.threshold,
        cfg.threshold_neg, cfg.symba_alpha, cfg.scff_lambda, colsum_part.shape[0] if peer is not None else 0, **scalars,
        GOODNESS=GOODNESS_CODES[cfg.goodness], LOSS=LOSS_CODES[cfg.loss], PEER=peer is not None, BLOCK=block,
        BLOCK_UNITS=min(triton.next_power_of_2(N), 1024) if peer is not None else 16)  # unused without peer: fixed
    return loss_out, g_pos, g_neg, coef, r_new, v

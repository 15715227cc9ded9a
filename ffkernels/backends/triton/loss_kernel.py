"""Kernel 2: goodness, the per-row dL/dz coefficient and the loss.

One program walks the B pos/neg pairs in blocks: it sums the partial goodness of the N-tiles of
kernel 1 (in tile order), writes g_pos/g_neg, evaluates the pair's loss terms (symba couples row i of
x_pos with row i of x_neg) and writes the coefficients c (dL/dz = c * h) of the 2B rows. The loss is
summed in a fixed order: the result does not depend on the launch.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .ff_math import GOODNESS_CODES, LOSS_CODES, coef_from_dg, goodness_scale, pair_terms


@triton.jit
def ff_loss_kernel(
    ss_part_ptr,  # (num_tiles, 2B) fp32 from kernel 1
    gp_ptr, gn_ptr,  # out: g_pos, g_neg (B,)
    coef_ptr,  # out: (2B,) fp32, c of pos rows then neg rows
    loss_ptr,  # out: () the loss, in the dtype of g
    B, N, num_tiles, threshold, symba_alpha,
    GOODNESS: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr,
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
        loss, dg_pos, dg_neg = pair_terms(g_pos.to(tl.float32), g_neg.to(tl.float32), threshold, symba_alpha, B,
                                          LOSS)
        tl.store(coef_ptr + rows, coef_from_dg(dg_pos, s), mask=ok)
        tl.store(coef_ptr + B + rows, coef_from_dg(dg_neg, s), mask=ok)
        total += tl.where(ok, loss, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0).to(loss_ptr.dtype.element_ty))


def launch_loss(ss_part, B: int, N: int, dtype: torch.dtype, goodness: str, threshold: float, loss: str,
                symba_alpha: float):
    """Run kernel 2. Returns loss (0-d), g_pos, g_neg (B,) in ``dtype`` and the row coefficients (2B,) fp32."""
    g_pos = ss_part.new_empty((B,), dtype=dtype)
    g_neg = ss_part.new_empty((B,), dtype=dtype)
    coef = ss_part.new_empty((2 * B,))
    loss_out = ss_part.new_empty((), dtype=dtype)
    block = min(triton.next_power_of_2(B), 1024)
    wrap_triton(ff_loss_kernel)[(1,)](
        ss_part, g_pos, g_neg, coef, loss_out, B, N, ss_part.shape[0], threshold, symba_alpha,
        GOODNESS=GOODNESS_CODES[goodness], LOSS=LOSS_CODES[loss], BLOCK=block)
    return loss_out, g_pos, g_neg, coef

"""Conv kernels C2 and C2b: the goodness, the per-goodness dL/dz coefficients and the loss.

C2: program i owns image i of each side (the pair pos i / neg i, or image i alone for the competitive loss). It adds
kernel C1's fp64 partial goodness in a fixed order (N-tiles in order, then the pixels in blocks: an fp64 vector, one
tree sum), scales by s (1 or 1 / the number of summed values, fp32, the product in fp64, as the CPU kernel's
``row_goodness``), rounds g to the dtype (g as stored is what the loss sees,
like the reference) and stores it. Then, per goodness value, the loss terms and the coefficient k with
dL/dz = k * (2h if p = 2, else 1) * 1[h > 0]: stored as c = (2s or s) dL/dg, per (image, goodness value):
  * hinton / symba ("sample": one value per image; "location": one per output pixel, in blocks): every value of the
    positive image paired with the same value of the negative one, ``pair_terms`` (ff_math.py) over B ng pairs;
  * competitive ("group"): the cross-entropy of g / temperature over the class groups with the target class (labels
    clamped on the host side), log-sum-exp, softmax - onehot over tau B; fp32 as every loss term of the Triton kernels.
Each program stores its image's share of the loss; C2b (one program) adds the B shares in image order and stores the
loss in the dtype. No atomics anywhere: the result does not depend on the launch.
"""
import torch
import triton
import triton.language as tl

from .conv_problem import OVER_CODES, ConvProblem
from .ff_math import GOODNESS_CODES, LOSS_CODES, goodness_scale, pair_terms
from .launch import launchable

OVER_SAMPLE = tl.constexpr(OVER_CODES["sample"])
OVER_LOCATION = tl.constexpr(OVER_CODES["location"])


@triton.jit
def _add_pixels(acc, base, P, BLOCK_P: tl.constexpr):
    """acc + P consecutive partials from ``base``, in blocks of BLOCK_P (lane by lane: a fixed order)."""
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(base + ps, mask=ps < P, other=0.0)
    return acc


@triton.jit
def _image_sum(part_ptr, r, P, rp, tiles, BLOCK_P: tl.constexpr):
    """Sample goodness before scaling: image r's partials over every N-tile (J = 1) and pixel (tiles in order, the
    pixels in blocks, one vector of partial sums, then a tree sum)."""
    acc = tl.zeros((BLOCK_P,), dtype=tl.float64)
    for t in range(tiles):
        acc = _add_pixels(acc, part_ptr + tl.cast(t, tl.int64) * rp + r * P, P, BLOCK_P)
    return tl.sum(acc, axis=0)


@triton.jit
def _class_sum(part_ptr, r, c, P, rp, per_class, cg_out, tiles_per_group, tile_n, J, BLOCK_P: tl.constexpr):
    """Group goodness before scaling: image r's partials of class group c, from the N-tiles that hold its channels
    (in tile order; each tile's slot j = c - the tile's first class), the pixels in blocks, then a tree sum."""
    lo = c * per_class
    hi = lo + per_class - 1
    t_lo = (lo // cg_out) * tiles_per_group + (lo % cg_out) // tile_n
    t_hi = (hi // cg_out) * tiles_per_group + (hi % cg_out) // tile_n
    acc = tl.zeros((BLOCK_P,), dtype=tl.float64)
    for t in range(t_lo, t_hi + 1):
        g = t // tiles_per_group
        first_class = (g * cg_out + (t - g * tiles_per_group) * tile_n) // per_class
        acc = _add_pixels(acc, part_ptr + tl.cast(t * J + c - first_class, tl.int64) * rp + r * P, P, BLOCK_P)
    return tl.sum(acc, axis=0)


@triton.jit
def _pair_block(part_ptr, gp_ptr, gn_ptr, coef_ptr, i, j0, B, P, ng, rp, tiles, s, coef_scale, threshold,
                threshold_neg, symba_alpha, scff_lambda, OVER: tl.constexpr, LOSS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    """Goodness values [j0, j0 + BLOCK_G) of pair i: stores g and the coefficients, returns the block's loss terms."""
    jj = j0 + tl.arange(0, BLOCK_G)
    ok = jj < ng
    if OVER == OVER_SAMPLE:
        ss_pos = tl.where(jj == 0, _image_sum(part_ptr, i, P, rp, tiles, BLOCK_P), 0.0)
        ss_neg = tl.where(jj == 0, _image_sum(part_ptr, B + i, P, rp, tiles, BLOCK_P), 0.0)
    else:  # location: value j is pixel j
        ss_pos = tl.zeros((BLOCK_G,), dtype=tl.float64)
        ss_neg = tl.zeros((BLOCK_G,), dtype=tl.float64)
        for t in range(tiles):
            base = part_ptr + tl.cast(t, tl.int64) * rp
            ss_pos += tl.load(base + i * P + jj, mask=ok, other=0.0)
            ss_neg += tl.load(base + (B + i) * P + jj, mask=ok, other=0.0)
    g_pos = (s * ss_pos).to(gp_ptr.dtype.element_ty)
    g_neg = (s * ss_neg).to(gn_ptr.dtype.element_ty)
    tl.store(gp_ptr + i * ng + jj, g_pos, mask=ok)
    tl.store(gn_ptr + i * ng + jj, g_neg, mask=ok)
    loss, dg_pos, dg_neg = pair_terms(g_pos.to(tl.float32), g_neg.to(tl.float32), threshold, threshold_neg, symba_alpha,
                                     scff_lambda, B * ng, LOSS)
    tl.store(coef_ptr + i * ng + jj, coef_scale * dg_pos, mask=ok)
    tl.store(coef_ptr + (B + i) * ng + jj, coef_scale * dg_neg, mask=ok)
    return tl.where(ok, loss, 0.0)


@triton.jit
def ff_conv_loss_kernel(
    part_ptr,  # (T, J, sides B P) fp64 partial goodness from kernel C1
    gp_ptr, gn_ptr,  # out: g_pos, g_neg (B, ng) (gn_ptr unused for competitive)
    coef_ptr,  # out: (sides B, ng) fp32, c of every goodness value, pos images then neg images
    target_ptr,  # competitive: (B,) int64 labels in [0, ng); else None
    loss_part_ptr,  # out: (B,) fp32, each image's (pair's) loss terms
    B, P, ng, rp, tiles, summed, threshold, threshold_neg, symba_alpha, scff_lambda, temperature,
    per_class, cg_out, tiles_per_group, tile_n, J,  # the class groups' tiles (competitive)
    OVER: tl.constexpr, GOODNESS: tl.constexpr, LOSS: tl.constexpr, POWER: tl.constexpr, COMPETITIVE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i = tl.program_id(0)
    s = goodness_scale(summed, GOODNESS)
    if POWER == 2:
        coef_scale = 2.0 * s
    else:
        coef_scale = s
    if COMPETITIVE:
        cs = tl.arange(0, BLOCK_G)
        ok = cs < ng
        ss = tl.zeros((BLOCK_G,), dtype=tl.float64)
        for c in range(ng):
            ss = tl.where(cs == c, _class_sum(part_ptr, i, c, P, rp, per_class, cg_out, tiles_per_group, tile_n, J,
                                       BLOCK_P),
                          ss)
        g = (s * ss).to(gp_ptr.dtype.element_ty)
        tl.store(gp_ptr + i * ng + cs, g, mask=ok)
        # cross-entropy of g / tau with the target class y, mean over the B images, as log_softmax computes it: the
        # shifted logits z - max, ls = log sum exp(z - max), log p = z - max - ls (never max + ls, whose rounding at
        # the logits' magnitude would reach p)
        zt = tl.where(ok, tl.div_rn(g.to(tl.float32), temperature), -float("inf"))
        sh = zt - tl.max(zt, axis=0)
        ls = tl.log(tl.sum(tl.where(ok, tl.exp(sh), 0.0), axis=0))
        y = tl.load(target_ptr + i)
        loss = tl.div_rn(ls - tl.sum(tl.where(cs == y, sh, 0.0), axis=0), B * 1.0)
        dg = tl.div_rn(tl.exp(sh - ls) - tl.where(cs == y, 1.0, 0.0), temperature * B)
        tl.store(coef_ptr + i * ng + cs, coef_scale * dg, mask=ok)
    else:
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        for j0 in range(0, ng, BLOCK_G):
            total += _pair_block(part_ptr, gp_ptr, gn_ptr, coef_ptr, i, j0, B, P, ng, rp, tiles, s, coef_scale,
                                 threshold, threshold_neg, symba_alpha, scff_lambda, OVER, LOSS, BLOCK_G, BLOCK_P)
        loss = tl.sum(total, axis=0)
    tl.store(loss_part_ptr + i, loss)


@triton.jit
def ff_conv_loss_sum_kernel(loss_part_ptr, loss_ptr, B, BLOCK: tl.constexpr):
    """C2b: the loss = the images' shares added in image order (blocks, then a tree sum), stored in the dtype."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, B, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        acc += tl.load(loss_part_ptr + rows, mask=rows < B, other=0.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0).to(loss_ptr.dtype.element_ty))


def launch_conv_loss(part, layout, pr: ConvProblem, dtype, cfg, target):
    """Run kernels C2 and C2b on kernel C1's partials (``layout`` = its (tiles per group, T, J, tile N)). Returns the
    loss (0-d), g_pos, g_neg (None without negatives) in ``dtype`` and the coefficients (sides B, ng) fp32."""
    per_group, tiles, J, tile_n = layout
    B, ng = pr.B, pr.ng
    g_pos = part.new_empty(pr.g_shape, dtype=dtype)
    g_neg = part.new_empty(pr.g_shape, dtype=dtype) if pr.sides == 2 else None
    coef = part.new_empty((pr.sides * B, ng), dtype=torch.float32)
    loss_part = part.new_empty((B,), dtype=torch.float32)
    loss = part.new_empty((), dtype=dtype)
    competitive = cfg.loss == "competitive"
    block_g = max(16, triton.next_power_of_2(ng)) if competitive else (
        16 if pr.over == "sample" else min(max(16, triton.next_power_of_2(ng)), 1024))
    launchable(ff_conv_loss_kernel)[(B,)](
        part, g_pos, g_pos if g_neg is None else g_neg, coef, target, loss_part,
        B, pr.P, ng, pr.sides * B * pr.P, tiles, pr.summed, cfg.threshold, cfg.threshold_neg, cfg.symba_alpha,
        cfg.scff_lambda, cfg.temperature,
        pr.per_class, pr.cg_out, per_group, tile_n, J,
        OVER=OVER_CODES[pr.over], GOODNESS=GOODNESS_CODES[cfg.goodness], LOSS=LOSS_CODES.get(cfg.loss, 0),
        POWER=cfg.goodness_power, COMPETITIVE=competitive, BLOCK_G=block_g,
        BLOCK_P=min(max(16, triton.next_power_of_2(pr.P)), 1024))
    launchable(ff_conv_loss_sum_kernel)[(1,)](loss_part, loss, B, BLOCK=min(max(16, triton.next_power_of_2(B)), 1024))
    return loss, g_pos, g_neg, coef

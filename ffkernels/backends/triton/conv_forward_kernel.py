"""Conv kernel C1: the convolution as an implicit GEMM with the FF epilogue fused.

Program (m, t, side) owns GEMM rows [m BM, (m + 1) BM) of one side (pos images, or neg images; a row is one output pixel
of one image) and N-tile t: BN output channels of one conv group g. Its K loop walks the group's (C_in/groups) kH kW
features in BK steps, gathering the x tile through ``im2col_tile`` (stride, padding, dilation as masks) and the weight
tile (the weight's rows are contiguous), z += x W^T in fp32 (``tl.dot``, ``input_precision`` as the linear kernels).
Epilogue: z / d (the image's divisor from kernel C0, ``div_rn``; x̂ is never written), + b, h = relu(z) (NaN passes)
stored in NCHW, and the tile's partial goodness: per row, the sum of h^p (h as stored, p = 1 or 2) over the tile's
channels -- for "group" goodness one sum per class group the tile touches (J slots), in fp64. The partials go to an fp64
(T, J, sides B P) buffer, every (tile, slot, row) written by exactly one program; kernel C2 adds them in a fixed order
(no atomics), so nothing depends on scheduling.

Under torch.autocast (GEMM, a constexpr: with GEMM_PARAM none of this is compiled) x is kernel C0b's bf16 x̂, W its
bf16 copy and NORM "none": z = conv(x̂, W) is rounded to bf16 before the fp32 epilogue (autocast's conv2d output).
"""
import torch
import triton
import triton.language as tl

from . import settings
from .conv_im2col import h_offsets, im2col_tile, output_pixels
from .conv_problem import ConvProblem
from .ff_math import GEMM_PARAM, NORM_CODES, NORM_NONE, dot_operand, round_gemm
from .launch import launchable


@triton.jit
def ff_conv_forward_kernel(
    xp_ptr, xn_ptr, w_ptr, b_ptr, den_ptr,  # x_pos, x_neg (B, C_in, H, W); weight (C_out, kg); bias or None; d or None
    hp_ptr, hn_ptr,  # out: h_pos, h_neg (B, C_out, Ho, Wo)
    part_ptr,  # out: (T, J, sides B P) fp64 partial goodness
    B, C_in, H, W, C_out, Wo, P, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    cg_in, cg_out, kg, tiles_per_group, J, per_class, sides,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, POWER: tl.constexpr, GROUPED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GEMM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    t = tl.program_id(1)
    side = tl.program_id(2)
    if side == 0:
        x_ptr = xp_ptr
        h_ptr = hp_ptr
    else:
        x_ptr = xn_ptr
        h_ptr = hn_ptr
    g = t // tiles_per_group
    first = (t - g * tiles_per_group) * BLOCK_N  # the tile's first channel within its conv group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * P
    img, p, iy0, ix0 = output_pixels(rows, P, Wo, stride_h, stride_w, pad_h, pad_w)
    chn = first + tl.arange(0, BLOCK_N)
    col_ok = chn < cg_out
    cols = g * cg_out + chn  # output channels
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * kg

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, kg, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = im2col_tile(x_ptr, img, iy0, ix0, row_ok, ks, kg, g * cg_in, C_in, H, W, KH, KW, dil_h, dil_w)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < kg)[None, :], other=0.0)
        if GEMM == GEMM_PARAM:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(dot_operand(x, GEMM), tl.trans(dot_operand(w, GEMM)), acc, input_precision=INPUT_PRECISION)

    if NORM != NORM_NONE:
        d = tl.load(den_ptr + side * B + img, mask=row_ok, other=1.0)
        z = tl.div_rn(acc, d[:, None])
    else:
        z = acc
    if GEMM != GEMM_PARAM:
        z = round_gemm(z, GEMM)  # the bf16 convolution's output
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL).to(h_ptr.dtype.element_ty)  # relu(NaN) = NaN
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(h_ptr + h_offsets(img, p, cols, C_out, P), h, mask=ok)

    # the goodness from h as stored, like the reference, summed in fp64 as the CPU kernel does: one goodness value sums
    # up to C_out H W terms (the linear kernels' rows sum N), and its rounding reaches dL/dz through the loss
    hq = tl.where(ok, h.to(tl.float64), 0.0)
    if POWER == 2:
        term = hq * hq
    else:
        term = hq
    rp = sides * B * P
    out = part_ptr + (t * J).to(tl.int64) * rp + side * B * P + rows
    if GROUPED:  # one partial per class group the tile touches: slot j = class - the tile's first class
        local = cols // per_class - (g * cg_out + first) // per_class
        for j in range(J):
            tl.store(out + j * rp, tl.sum(tl.where(local[None, :] == j, term, 0.0), axis=1), mask=row_ok)
    else:
        tl.store(out, tl.sum(term, axis=1), mask=row_ok)


def launch_conv_forward(x_pos, x_neg, weight, bias, den, pr: ConvProblem, norm: str, power: int, gemm: int = 0):
    """Run kernel C1. Returns h_pos, h_neg (None without negatives), the partial goodness (T, J, sides B P) and the
    layout (tiles per conv group, T, J, tile N) kernel C2 reads it with. ``gemm`` (settings.gemm_code, under
    autocast): x_pos, x_neg are kernel C0b's bf16 x̂, weight the bf16 W, ``norm`` "none"; h is float32."""
    cfg = settings.conv_forward_config(weight.dtype, pr.cg_out, pr.kg, pr.B * pr.P)
    bm, bn, bk = cfg["m"], cfg["n"], cfg["k"]
    per_group, tiles, J = pr.partial_layout(bn)
    h_dtype = torch.float32 if gemm else x_pos.dtype
    h_pos = x_pos.new_empty((pr.B, pr.C_out, pr.Ho, pr.Wo), dtype=h_dtype)
    h_neg = x_pos.new_empty((pr.B, pr.C_out, pr.Ho, pr.Wo), dtype=h_dtype) if pr.sides == 2 else None
    part = x_pos.new_empty((tiles, J, pr.sides * pr.B * pr.P), dtype=torch.float64)
    grid = (triton.cdiv(pr.B * pr.P, bm), tiles, pr.sides)
    # without negatives side 1 is not launched: the pos tensors stand in for its pointers (one type per pointer)
    launchable(ff_conv_forward_kernel)[grid](
        x_pos, x_pos if x_neg is None else x_neg, weight, bias, den, h_pos, h_pos if h_neg is None else h_neg, part,
        pr.B, **pr.geometry_args(), cg_in=pr.cg_in, cg_out=pr.cg_out, kg=pr.kg, tiles_per_group=per_group, J=J,
        per_class=pr.per_class, sides=pr.sides,
        NORM=NORM_CODES[norm], HAS_BIAS=bias is not None, POWER=power, GROUPED=pr.over == "group",
        INPUT_PRECISION=settings.dot_precision(weight.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GEMM=gemm,
        num_warps=cfg["warps"])
    return h_pos, h_neg, part, (per_group, tiles, J, bn)

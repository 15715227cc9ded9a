"""The implicit GEMM's addressing, shared by the conv forward and weight-gradient kernels (@triton.jit helpers).

A GEMM row is one output pixel of one image: row m of a side = image m // P, pixel p = m % P, at (oy, ox) =
(p // Wo, p % Wo). A GEMM column k of a conv group is its input channel ci = k // (kH kW) and kernel offset
(ky, kx); the input it reads is x[image, g C_in/groups + ci, oy s_h - pad_h + ky d_h, ox s_w - pad_w + kx d_w], zero
outside the image (nn.Conv2d's zero padding): ``im2col_tile`` loads a (rows, k) tile of that matrix with masks, so
im2col(x) is never written. Offsets inside one image are int32 (C_in H W < 2^31); image bases are int64.
"""
import triton
import triton.language as tl


@triton.jit
def output_pixels(rows, P, Wo, stride_h, stride_w, pad_h, pad_w):
    """(image, pixel p, top row, left column of the receptive field) of GEMM rows ``rows`` of one side."""
    img = rows // P
    p = rows - img * P
    oy = p // Wo
    ox = p - oy * Wo
    return img, p, oy * stride_h - pad_h, ox * stride_w - pad_w


@triton.jit
def im2col_tile(x_ptr, img, iy0, ix0, row_ok, ks, kg, c_base, C_in, H, W, KH, KW, dil_h, dil_w):
    """The (rows, ks) tile of im2col(x) of the conv group whose first input channel is ``c_base``; 0 outside the
    image, past the rows (``row_ok``) and past the group's kg = (C_in/groups) kH kW columns."""
    taps = KH * KW
    ci = ks // taps
    kr = ks - ci * taps
    ky = kr // KW
    kx = kr - ky * KW
    iy = iy0[:, None] + (ky * dil_h)[None, :]
    ix = ix0[:, None] + (kx * dil_w)[None, :]
    ok = row_ok[:, None] & (ks < kg)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    image = x_ptr + img.to(tl.int64) * (C_in * H * W) + c_base * (H * W)
    return tl.load(image[:, None] + ((ci * (H * W))[None, :] + iy * W + ix), mask=ok, other=0.0)


@triton.jit
def h_offsets(img, p, cols, C_out, P):
    """Offsets of h (images, C_out, Ho, Wo) at GEMM rows (img, p) and channels ``cols``: a (rows, cols) tile."""
    return img.to(tl.int64)[:, None] * (C_out * P) + (cols * P)[None, :] + p[:, None]

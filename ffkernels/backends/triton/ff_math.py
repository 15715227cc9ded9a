"""The FF math of csrc/ff_math.h as Triton device functions, plus the optimizer applied to one tile.

Same formulas and the same names as the C++ header (which is the one the CPU and CUDA kernels use);
change them together. Only plain ``tl`` math is used -- no libdevice, which the interpreter lacks:
``log1p`` is built from ``tl.log`` in the classic accurate form, ``softplus``/``sigmoid`` never
exponentiate a positive number. The norm/goodness/loss codes match the C++ enums.

Rounding on a GPU: a plain ``/`` on fp32 compiles to the approximate ``div.full.f32`` (up to 2 ulp) and
``tl.exp``/``tl.log`` to ``ex2.approx``/``lg2.approx``, while the interpreter computes everything exactly
rounded. Every division here is ``tl.div_rn`` and every square root ``tl.sqrt_rn`` (IEEE, as in the C++
kernels), so the row divisor, the goodness scale, the loss terms and the coefficients c_i differ from the
interpreter's only through exp and log: a relative error of about 2^-22 in e^-|t| and log(1 + u), which
softplus and sigmoid pass on without amplification (tests/tolerance.py states the GPU rule).
"""
import triton
import triton.language as tl

# option codes: kernel constexprs chosen on the host by name ("none" optimizer: write the gradient instead)
NORM_CODES = {"none": 0, "l2": 1, "rms": 2}
GOODNESS_CODES = {"sum": 0, "mean": 1}
LOSS_CODES = {"hinton": 0, "symba": 1, "scff": 3}  # 2 is the conv ops' competitive loss (no Triton kernel)
OPTIM_CODES = {"none": 0, "adam": 1, "sgd": 2}
# the same codes as globals a kernel may read (Triton kernels can only read constexpr globals)
NORM_NONE = tl.constexpr(NORM_CODES["none"])
NORM_L2 = tl.constexpr(NORM_CODES["l2"])
NORM_RMS = tl.constexpr(NORM_CODES["rms"])
GOODNESS_MEAN = tl.constexpr(GOODNESS_CODES["mean"])
LOSS_SYMBA = tl.constexpr(LOSS_CODES["symba"])
LOSS_SCFF = tl.constexpr(LOSS_CODES["scff"])
OPTIM_NONE = tl.constexpr(OPTIM_CODES["none"])
OPTIM_ADAM = tl.constexpr(OPTIM_CODES["adam"])
# the GEMM operands (FFConfig.gemm_dtype; docs/design.md, "Mixed precision"), a kernel constexpr ``GEMM`` chosen on the
# host (settings.gemm_code): the parameters' dtype (the kernels exactly as before autocast existed), bf16 operands fed
# to tl.dot (GPUs), or bf16 values fed to an fp32 "ieee" tl.dot (the interpreter, whose bf16 dot is wrong and whose
# fp32 -> bf16 cast truncates; products of bf16 values are exact in fp32, so the dot is the same up to its sum order)
GEMM_PARAM = tl.constexpr(0)
GEMM_BF16 = tl.constexpr(1)
GEMM_BF16_EMULATED = tl.constexpr(2)


# ---- numerically stable scalar helpers -------------------------------------------------------------

@triton.jit
def log1p(u):
    """log(1 + u) for u >= 0, accurate for tiny u: log(w) * u / (w - 1) with w = 1 + u (Goldberg)."""
    w = 1.0 + u
    d = w - 1.0
    return tl.where(d == 0.0, u, tl.log(w) * tl.div_rn(u, tl.where(d == 0.0, 1.0, d)))


@triton.jit
def softplus(x):
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sign(x):
    """torch.sign: -1, 0 or 1 (0 keeps its sign; NaN stays NaN)."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x))


@triton.jit
def sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.div_rn(tl.where(x >= 0.0, 1.0, e), 1.0 + e)


@triton.jit
def is_finite(x):
    return tl.abs(x) < float("inf")  # False for +-inf and NaN


# ---- bf16 GEMM operands under torch.autocast ("Mixed precision") -----------------------------------------

@triton.jit
def _bf16_bits(x):
    """The bits of fp32 ``x`` rounded to the nearest bf16, ties to even, in the high half of a uint32 (low half 0):
    c10's round_to_nearest_even, torch's ``.to(torch.bfloat16)``; NaN becomes the quiet NaN 0x7FC0, infinities stay."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return tl.where(x != x, 0x7FC00000, bits).to(tl.uint32)


@triton.jit
def to_gemm(x, GEMM: tl.constexpr):
    """fp32 ``x`` rounded to bf16 (to nearest, ties to even) as a bf16 tensor, to store or to feed ``dot_operand``. On
    a GPU Triton's cast (cvt.rn.bf16.f32); under the interpreter, whose cast truncates, integer arithmetic."""
    if GEMM == GEMM_BF16_EMULATED:
        return (_bf16_bits(x) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def dot_operand(t, GEMM: tl.constexpr):
    """A bf16 tensor as tl.dot takes it: itself on a GPU; its exact fp32 value under the interpreter."""
    if GEMM == GEMM_BF16_EMULATED:
        return (t.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return t


@triton.jit
def round_gemm(x, GEMM: tl.constexpr):
    """fp32 ``x`` rounded to bf16 and widened back to fp32 (a GEMM's bf16 output as the fp32 epilogue reads it)."""
    if GEMM == GEMM_BF16_EMULATED:
        return _bf16_bits(x).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16).to(tl.float32)


# ---- input normalization: x_hat = x / d per row ------------------------------------------------------

@triton.jit
def row_denominator(sum_sq, K, eps, NORM: tl.constexpr):
    """d with x_hat = x / d: ||x|| + eps ("l2"), sqrt(mean x^2) + eps ("rms"): row_divisor of ff_math.h and of the
    oracle (backends/reference.py), with IEEE division and square root."""
    if NORM == NORM_L2:
        d = tl.sqrt_rn(sum_sq) + eps
    elif NORM == NORM_RMS:
        d = tl.sqrt_rn(tl.div_rn(sum_sq, K * 1.0)) + eps
    else:
        d = tl.full(sum_sq.shape, 1.0, tl.float32)
    return d


@triton.jit
def row_denominator_f64(sum_sq, K, eps, NORM: tl.constexpr):
    """``row_denominator`` in fp64 from an fp64 sum of squares, rounded once to fp32: row_divisor<double> of ff_math.h,
    as the CPU kernels compute it (the conv step's images sum C H W squares). fp64 square roots and divisions are
    IEEE-rounded on GPUs too (sqrt.rn.f64, div.rn.f64: PTX has no approximate fp64 forms)."""
    if NORM == NORM_L2:
        d = tl.sqrt(sum_sq) + eps
    elif NORM == NORM_RMS:
        d = tl.sqrt(sum_sq / K) + eps
    else:
        d = tl.full(sum_sq.shape, 1.0, tl.float64)
    return d.to(tl.float32)


# ---- goodness, loss terms, dL/dz coefficient ------------------------------------------------------------

@triton.jit
def goodness_scale(N, GOODNESS: tl.constexpr):
    """g = s * sum_j h_j^2: s = 1 ("sum") or 1/N ("mean")."""
    if GOODNESS == GOODNESS_MEAN:
        s = tl.div_rn(1.0, N * 1.0)
    else:
        s = 1.0
    return s


@triton.jit
def pair_terms(g_pos, g_neg, threshold, threshold_neg, symba_alpha, scff_lambda, B, LOSS: tl.constexpr):
    """Contribution of pair i to L, and dL/dg_pos_i, dL/dg_neg_i (the batch reduction included). Each loss reads its
    own scalars (hinton: threshold; scff: threshold = theta+, threshold_neg = theta-, scff_lambda; symba: alpha)."""
    if LOSS == LOSS_SYMBA:
        # L = sum_i softplus(-alpha (g+ - g-)) / B
        inv_b = tl.div_rn(1.0, B * 1.0)
        a = -symba_alpha * (g_pos - g_neg)
        d = symba_alpha * sigmoid(a) * inv_b
        loss = softplus(a) * inv_b
        dg_pos = -d
        dg_neg = d
    else:
        # hinton: L = [sum_i softplus(theta - g+) + sum_i softplus(g- - theta)] / (2B)
        # scff:   L = [sum_i softplus(theta+ - g+) + softplus(g- - theta-) + lambda |g+|] / (2B): hinton's expressions
        #         with theta- on the negative side, and the penalty only where lambda != 0, so that theta- = theta+ and
        #         lambda = 0 compute hinton's bits
        inv_2b = tl.div_rn(1.0, 2.0 * B)
        ap = threshold - g_pos
        if LOSS == LOSS_SCFF:
            an = g_neg - threshold_neg
        else:
            an = g_neg - threshold
        terms = softplus(ap) + softplus(an)
        dpos = -sigmoid(ap)
        if LOSS == LOSS_SCFF:
            if scff_lambda != 0.0:
                terms += scff_lambda * tl.abs(g_pos)
                dpos += scff_lambda * sign(g_pos)
        loss = terms * inv_2b
        dg_pos = dpos * inv_2b
        dg_neg = sigmoid(an) * inv_2b
    return loss, dg_pos, dg_neg


@triton.jit
def coef_from_dg(dg, s):
    """dL/dz_ij = c_i * h_ij with c_i = 2 s dL/dg_i (relu' = 1 exactly where h > 0)."""
    return 2.0 * s * dg


# ---- peer normalization (docs/design.md, "The math"): lambda = peer_norm, mu = peer_momentum -------------

@triton.jit
def peer_running_mean(r, colsum, B, mu, one_minus_mu):
    """r'_j = mu r_j + (1 - mu) m_j with m_j = (1/B) sum_i h+_ij, the column mean of the positive rows."""
    return mu * r + one_minus_mu * tl.div_rn(colsum, B * 1.0)


@triton.jit
def peer_dz(r_new, r_bar, v_scale):
    """v_j = lambda (2/N) (r'_j - rbar') (1 - mu) / B, added to dL/dz+_ij of every positive row i (also where
    z <= 0); ``v_scale`` = lambda 2 (1 - mu) / (N B), computed on the host in double."""
    return v_scale * (r_new - r_bar)


# ---- optimizers, elementwise in fp32, exactly torch.optim's single-tensor formulas ----------------------

@triton.jit
def lerp_like_torch(a, b, w):
    """torch.lerp's formula: exact at both ends."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def adam_update(p, g, m, v, step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, weight_decay):
    if weight_decay != 0.0:
        g = g + weight_decay * p
    m = lerp_like_torch(m, g, one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + (-step_size) * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def sgd_update(p, g, buf, lr, momentum, weight_decay, first, MOMENTUM: tl.constexpr):
    """dampening 0, no nesterov; the momentum buffer starts as the first gradient (``first`` != 0)."""
    if weight_decay != 0.0:
        g = g + weight_decay * p
    if MOMENTUM:
        buf = tl.where(first != 0, g, buf * momentum + g)
        g = buf
    p = p + (-lr) * g
    return p, buf


@triton.jit
def apply_optimizer(p_ptr, s1_ptr, s2_ptr, offs, mask, g,
                    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, momentum, weight_decay,
                    first, OPTIM: tl.constexpr, MOMENTUM: tl.constexpr):
    """Update the parameter elements at ``offs`` from their fp32 gradient ``g``, in place.

    Adam: s1 = exp_avg, s2 = exp_avg_sq. SGD: s1 = momentum_buffer (read only with MOMENTUM).
    ``step_size`` is lr / (1 - beta1^step) for Adam and lr for SGD. State is fp32.
    """
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OPTIM == OPTIM_ADAM:
        m = tl.load(s1_ptr + offs, mask=mask, other=0.0)
        v = tl.load(s2_ptr + offs, mask=mask, other=0.0)
        p, m, v = adam_update(p, g, m, v, step_size, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt,
                              weight_decay)
        tl.store(s1_ptr + offs, m, mask=mask)
        tl.store(s2_ptr + offs, v, mask=mask)
    else:
        if MOMENTUM:
            buf = tl.load(s1_ptr + offs, mask=mask, other=0.0)
            p, buf = sgd_update(p, g, buf, step_size, momentum, weight_decay, first, True)
            tl.store(s1_ptr + offs, buf, mask=mask)
        else:
            p, _ = sgd_update(p, g, g, step_size, momentum, weight_decay, first, False)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

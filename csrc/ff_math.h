// The Forward-Forward math, written once for every compiled backend.
//
// Everything here is a small inline function on scalars, usable from host C++ (the CPU kernels) and
// from CUDA device code (FF_HD expands to __host__ __device__ there). The kernels only decide how to
// walk memory; what is computed per element or per row lives here. The formulas are those of
// docs/design.md ("The math"); ffkernels/backends/reference.py is the autograd oracle they are checked against.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif

namespace ffk {

enum class Norm : int { None = 0, L2 = 1, RMS = 2 };
enum class Goodness : int { Sum = 0, Mean = 1 };
// Competitive: the conv ops only (cross-entropy of the class groups' goodness; the linear ops' parser refuses it).
// Scff: hinton with its own negative threshold and a penalty lambda |g+| (SCFF, Chen et al. 2024).
enum class Loss : int { Hinton = 0, Symba = 1, Competitive = 2, Scff = 3 };
// What one goodness value sums over (the conv ops; the linear ops compute Sample): a whole image, the channels at one
// output location, or one class's group of consecutive channels (with the competitive loss only).
enum class GoodnessOver : int { Sample = 0, Location = 1, Group = 2 };
enum class Optim : int { Adam = 0, SGD = 1 };
// The GEMM operands' dtype (docs/design.md, "Mixed precision"): the parameters' own, or cast once to bf16/fp16
// (torch.autocast), with fp32 accumulation and everything else in the parameters' dtype.
enum class GemmDtype : int { Param = 0, BFloat16 = 1, Float16 = 2 };
// Each option's names, indexed by its enum value: the binding parses options by these (ffkernels/config.py lists
// the same names for Python), so a new variant is declared here once, beside its enum.
constexpr const char* kNormNames[] = {"none", "l2", "rms"};
constexpr const char* kGoodnessNames[] = {"sum", "mean"};
constexpr const char* kLossNames[] = {"hinton", "symba", "competitive", "scff"};
constexpr const char* kGoodnessOverNames[] = {"sample", "location", "group"};
constexpr const char* kOptimNames[] = {"adam", "sgd"};
constexpr const char* kGemmDtypeNames[] = {"param", "bfloat16", "float16"};

// ---- numerically stable scalar helpers -------------------------------------------------------------

template <typename T>
FF_HD T softplus(T x) {
  // log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)
  using std::exp;
  using std::log1p;
  return x > T(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

// torch.sign: -1, 0 or 1 (0 keeps its sign; NaN stays NaN)
template <typename T>
FF_HD T sign(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x);
}

template <typename T>
FF_HD T sigmoid(T x) {
  using std::exp;
  if (x >= T(0)) {
    return T(1) / (T(1) + exp(-x));
  }
  const T e = exp(x);
  return e / (T(1) + e);
}

// ---- input normalization: a per-row divisor d, so that x_hat = x / d ---------------------------------
// Exactly the oracle's formula (ffkernels/backends/reference.py, row_divisor): "l2" sqrt(sum x^2) + eps,
// "rms" sqrt(sum x^2 / K) + eps, "none" 1. Every kernel divides by d (never multiplies by a reciprocal), so
// x_hat rounds like the reference's x / d and nothing overflows or turns into NaN for tiny rows with eps = 0.

template <typename T>
FF_HD T row_divisor(T sum_sq, int64_t K, Norm norm, T eps) {
  using std::sqrt;
  switch (norm) {
    case Norm::L2:
      return sqrt(sum_sq) + eps;
    case Norm::RMS:
      return sqrt(sum_sq / T(K)) + eps;
    default:
      return T(1);
  }
}

// ---- activation --------------------------------------------------------------------------------------

// relu as torch.relu computes it: NaN stays NaN (so a NaN input gives a NaN loss, which stops the
// update, instead of h = 0 and a finite loss with a NaN gradient)
template <typename T>
FF_HD T relu(T x) {
  return x <= T(0) ? T(0) : x;
}

// ---- goodness: g = s * sum_j h_j^2 with s = 1 ("sum") or 1/N ("mean") ------------------------------

template <typename T>
FF_HD T goodness_scale(int64_t N, Goodness goodness) {
  return goodness == Goodness::Mean ? T(1) / T(N) : T(1);
}

// ---- per-row loss terms ------------------------------------------------------------------------------
// The loss of a batch of B pos/neg pairs is a sum of per-row (hinton, scff) or per-pair (symba) terms.
// Each function returns the term's contribution to the loss and to dL/dg (already divided by the
// batch reduction). The coefficient c with dL/dz = c * h is then coef_from_dg(dL/dg, s).

template <typename T>
struct PairTerms {
  T loss;    // contribution of the pair (row i of pos, row i of neg) to L
  T dg_pos;  // dL/dg_pos_i
  T dg_neg;  // dL/dg_neg_i
};

// The scalar options of the pair losses, in the accumulation type: every kernel passes all of them, each loss reads
// its own (hinton: threshold; scff: threshold = theta+, threshold_neg = theta-, scff_lambda; symba: symba_alpha).
template <typename T>
struct LossScalars {
  T threshold, threshold_neg, symba_alpha, scff_lambda;
};

template <typename T>
FF_HD PairTerms<T> pair_terms(T g_pos, T g_neg, Loss loss, const LossScalars<T>& k, int64_t B) {
  using std::fabs;
  PairTerms<T> t;
  if (loss == Loss::Symba) {
    // L = sum_i softplus(-alpha (g+ - g-)) / B
    const T inv_b = T(1) / T(B);
    const T a = -k.symba_alpha * (g_pos - g_neg);
    const T d = k.symba_alpha * sigmoid(a) * inv_b;
    t.loss = softplus(a) * inv_b;
    t.dg_pos = -d;
    t.dg_neg = d;
  } else {
    // hinton: L = [sum_i softplus(theta - g+) + sum_i softplus(g- - theta)] / (2B)
    // scff:   L = [sum_i softplus(theta+ - g+) + softplus(g- - theta-) + lambda |g+|] / (2B): hinton's expressions
    //         with theta- on the negative side, and the penalty only where lambda != 0, so that theta- = theta+ and
    //         lambda = 0 compute hinton's bits
    const bool scff = loss == Loss::Scff;
    const T inv_2b = T(1) / (T(2) * T(B));
    const T ap = k.threshold - g_pos;
    const T an = g_neg - (scff ? k.threshold_neg : k.threshold);
    T terms = softplus(ap) + softplus(an);
    T dpos = -sigmoid(ap);
    if (scff && k.scff_lambda != T(0)) {
      terms += k.scff_lambda * fabs(g_pos);
      dpos += k.scff_lambda * sign(g_pos);
    }
    t.loss = terms * inv_2b;
    t.dg_pos = dpos * inv_2b;
    t.dg_neg = sigmoid(an) * inv_2b;
  }
  return t;
}

// dL/dz_ij = c_i * h_ij: dg/dh_j = 2 s h_j and relu' = 1 exactly where h_j > 0 (h_j = 0 elsewhere).
template <typename T>
FF_HD T coef_from_dg(T dg, T goodness_scale_s) {
  return T(2) * goodness_scale_s * dg;
}

// ---- peer normalization (docs/design.md, "The math"): lambda = peer_norm, mu = peer_momentum --------------
// r is a running mean per unit j of the positive rows' activations: with m_j = (1/B) sum_i h+_ij (weights
// before the update), r'_j = mu r_j + (1 - mu) m_j and rbar' = (1/N) sum_j r'_j. The loss gains
// L_peer = lambda (1/N) sum_j (rbar' - r'_j)^2, and dL/dz+_ij of every positive row i gains v_j (for every
// unit, also where z <= 0: straight-through for this term only). Negative rows are unchanged.

template <typename T>
FF_HD T peer_running_mean(T r, T m, T mu) {
  return mu * r + (T(1) - mu) * m;
}

// unit j's term of L_peer
template <typename T>
FF_HD T peer_loss_term(T r_new, T r_bar, T lambda, int64_t N) {
  const T d = r_bar - r_new;
  return lambda * d * d / T(N);
}

// v_j = lambda (2/N) (r'_j - rbar') (1 - mu) / B, added to dL/dz+_ij of every positive row i
template <typename T>
FF_HD T peer_dz(T r_new, T r_bar, T lambda, T mu, int64_t N, int64_t B) {
  return lambda * (T(2) / T(N)) * (r_new - r_bar) * ((T(1) - mu) / T(B));
}

// ---- optimizer updates, one element at a time (fp32 state; double for double params) ----------------
// Adam exactly as torch.optim.Adam's single-tensor path (coupled L2, bias-corrected, no amsgrad):
//   g += wd * p; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// The step-dependent constants are computed once on the host (AdamConsts).

template <typename T>
struct AdamConsts {
  T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt;
};

template <typename T>
FF_HD T lerp_like_torch(T self, T end, T weight) {
  // torch.lerp's formula (ATen/native/Lerp.h): exact at both ends, stable in between
  return (weight < T(0.5)) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

template <typename T>
FF_HD void adam_update(T& p, T g, T& m, T& v, const AdamConsts<T>& c) {
  using std::sqrt;
  if (c.weight_decay != T(0)) g = g + c.weight_decay * p;
  m = lerp_like_torch(m, g, c.one_minus_beta1);
  v = v * c.beta2 + c.one_minus_beta2 * (g * g);
  const T denom = sqrt(v) / c.bc2_sqrt + c.eps;
  p = p + (-c.step_size) * (m / denom);
}

// SGD exactly as torch.optim.SGD (dampening 0, no nesterov): the momentum buffer starts as the
// first gradient (first == true on the first step), then buf = momentum * buf + g.
template <typename T>
struct SGDConsts {
  T lr, momentum, weight_decay;
  bool first;
};

template <typename T>
FF_HD void sgd_update(T& p, T g, T* buf, const SGDConsts<T>& c) {
  if (c.weight_decay != T(0)) g = g + c.weight_decay * p;
  if (c.momentum != T(0)) {
    const T b = c.first ? g : (*buf) * c.momentum + g;
    *buf = b;
    g = b;
  }
  p = p + (-c.lr) * g;
}

}  // namespace ffk

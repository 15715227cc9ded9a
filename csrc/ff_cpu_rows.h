// Row-level helpers shared by the CPU kernels (ff_grad_cpu.cpp, ff_grad_labeled_cpu.cpp), and the peer-norm
// column reduction.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ff_math.h"

namespace ffk {

// Sums of squares accumulate in double: a serial fp32 sum over thousands of terms would be visibly less
// accurate than torch's blocked reductions in the reference.

// sum_k x_k^2 over [begin, end)
template <typename scalar_t>
inline double sum_squares(const scalar_t* x, int64_t begin, int64_t end) {
  double ss = 0;
  for (int64_t k = begin; k < end; ++k) ss += static_cast<double>(x[k]) * static_cast<double>(x[k]);
  return ss;
}

// x_hat = x / d_i row by row (rows of K: a (B, K) batch, or the images of a (B, C, H, W) batch with K = C*H*W),
// written as out_t (the parameters' dtype, or the GEMM dtype under autocast).
template <typename scalar_t, typename out_t>
void normalize_rows(const scalar_t* x, out_t* out, int64_t rows, int64_t K, Norm norm, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t* xr = x + i * K;
      out_t* orow = out + i * K;
      if (norm == Norm::None) {
        for (int64_t k = 0; k < K; ++k) orow[k] = static_cast<out_t>(xr[k]);
        continue;
      }
      // x / d (ff_math.h row_divisor, the oracle's formula): divide, as the reference does; under autocast the
      // quotient (in acc_t) is rounded once to the GEMM dtype
      const acc_t d = static_cast<acc_t>(row_divisor(sum_squares(xr, 0, K), K, norm, eps));
      for (int64_t k = 0; k < K; ++k)
        orow[k] = static_cast<out_t>(static_cast<scalar_t>(static_cast<acc_t>(xr[k]) / d));
    }
  });
}

// h = relu(z + a * col + b) over one row of N (col and b may be null); returns sum h^2. z and col are in the GEMM
// dtype z_t (scalar_t, or bf16 under autocast: read exactly into acc_t), b and h in the parameters' dtype.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>, typename z_t = scalar_t>
inline double relu_row(const z_t* z, const z_t* col, acc_t a, const scalar_t* b, scalar_t* h, int64_t N) {
  double ss = 0;
  for (int64_t j = 0; j < N; ++j) {
    acc_t v = static_cast<acc_t>(z[j]);
    if (col) v += a * static_cast<acc_t>(col[j]);
    if (b) v += static_cast<acc_t>(b[j]);
    const scalar_t hv = static_cast<scalar_t>(relu(v));
    h[j] = hv;
    ss += static_cast<double>(hv) * static_cast<double>(hv);
  }
  return ss;
}

// The goodness of a row from its sum of squares, rounded to the tensor's dtype like the reference's.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t row_goodness(double sum_sq, acc_t scale) {
  return static_cast<acc_t>(static_cast<scalar_t>(static_cast<double>(scale) * sum_sq));
}

// Peer normalization (ff_math.h) from the positive rows' h (B, N) and the running mean r: writes r' (rounded to
// the state dtype, as stored) and v_j = dL_peer/dz+_ij (the same for every positive row i); returns L_peer.
// m_j sums in double over the rows in order, each thread owning a range of columns, so nothing depends on the
// thread count; r-bar and L_peer are fixed-order sums of the stored r'.
template <typename scalar_t, typename state_t, typename acc_t>
double peer_terms(const scalar_t* h, int64_t B, int64_t N, const state_t* r, state_t* r_new, acc_t* v,
                  double lambda, double mu) {
  std::vector<double> m(static_cast<size_t>(N), 0.0);
  at::parallel_for(0, N, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < B; ++i) {
      const scalar_t* hr = h + i * N;
      for (int64_t j = lo; j < hi; ++j) m[j] += static_cast<double>(hr[j]);
    }
  });
  double r_sum = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    r_new[j] = static_cast<state_t>(peer_running_mean<double>(static_cast<double>(r[j]), m[j] / double(B), mu));
    r_sum += static_cast<double>(r_new[j]);
  }
  const double r_bar = r_sum / double(N);
  double loss = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    const double rj = static_cast<double>(r_new[j]);
    loss += peer_loss_term<double>(rj, r_bar, lambda, N);
    v[j] = static_cast<acc_t>(peer_dz<double>(rj, r_bar, lambda, mu, N, B));
  }
  return loss;
}

// The GEMM operand type of a kernel on scalar_t parameters: scalar_t itself, or bf16 under autocast (low = true).
template <typename scalar_t, bool low>
using gemm_type = std::conditional_t<low, c10::BFloat16, scalar_t>;

// Writes dL/dz = v into the GEMM operand (z_t) and, where given, into the parameter-dtype copy the bias gradient is
// summed from (only when z_t is a lower precision: otherwise the operand is that copy).
template <typename scalar_t, typename z_t, typename acc_t>
inline void store_dz(z_t* dz, scalar_t* dz_full, int64_t j, acc_t v) {
  if constexpr (std::is_same_v<z_t, scalar_t>) {
    dz[j] = static_cast<scalar_t>(v);
  } else {
    dz[j] = static_cast<z_t>(static_cast<scalar_t>(v));
    if (dz_full) dz_full[j] = static_cast<scalar_t>(v);
  }
}

// The batch loss from per-pair terms: a fixed-order sum, deterministic whatever the thread count.
inline double sum_in_order(const std::vector<double>& terms) {
  double total = 0.0;
  for (double v : terms) total += v;
  return total;
}

}  // namespace ffk

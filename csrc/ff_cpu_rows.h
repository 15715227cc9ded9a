// Row-level helpers shared by the CPU kernels (ff_grad_cpu.cpp, ff_grad_labeled_cpu.cpp).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "ff_math.h"

namespace ffk {

// h = relu(z + a * col + b) over one row of N (col and b may be null); returns sum h^2.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t relu_row(const scalar_t* z, const scalar_t* col, acc_t a, const scalar_t* b, scalar_t* h, int64_t N) {
  acc_t ss = 0;
  for (int64_t j = 0; j < N; ++j) {
    acc_t v = static_cast<acc_t>(z[j]);
    if (col) v += a * static_cast<acc_t>(col[j]);
    if (b) v += static_cast<acc_t>(b[j]);
    const scalar_t hv = static_cast<scalar_t>(relu(v));
    h[j] = hv;
    ss += static_cast<acc_t>(hv) * static_cast<acc_t>(hv);
  }
  return ss;
}

// The goodness of a row from its sum of squares, rounded to the tensor's dtype like the reference's.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t row_goodness(acc_t sum_sq, acc_t scale) {
  return static_cast<acc_t>(static_cast<scalar_t>(scale * sum_sq));
}

// The batch loss from per-pair terms: a fixed-order sum, deterministic whatever the thread count.
inline double sum_in_order(const std::vector<double>& terms) {
  double total = 0.0;
  for (double v : terms) total += v;
  return total;
}

}  // namespace ffk

// Host-side option structs shared by the CPU and CUDA kernels (parsed and checked in python_api/).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ff_math.h"

namespace ffk {

// The optimizer-state (and peer running mean) element type for parameters of type T: double for double, else
// float (python_api/ff_api.cpp's state_dtype and ffkernels/backends/contract.py's state_dtype say the same).
template <typename T>
using state_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct LossOptions {
  Norm norm = Norm::RMS;
  double norm_eps = 1e-8;
  Goodness goodness = Goodness::Sum;
  double threshold = 1.0;
  double threshold_neg = 1.0;  // scff's theta- (FFConfig resolves None to threshold before the string is written)
  Loss loss = Loss::Hinton;
  double symba_alpha = 4.0;
  double scff_lambda = 0.0;    // scff's penalty on |g+|
  double peer_norm = 0.0;      // lambda; 0: no peer normalization (nothing of it runs)
  double peer_momentum = 0.9;  // mu of the running mean r (peer_mean)
  GemmDtype gemm = GemmDtype::Param;  // the GEMM operands' dtype (the binding admits bfloat16 for float weights)
  // the conv ops' keys (FFConfig.conv_op_options); the linear ops' parser leaves these defaults, which they compute
  GoodnessOver goodness_over = GoodnessOver::Sample;
  int goodness_power = 2;    // g = s * sum h^p, p in {1, 2}
  double temperature = 1.0;  // competitive: cross-entropy of g / temperature over the class groups

  // the pair losses' scalars (ff_math.h pair_terms) in the accumulation type T
  template <typename T>
  LossScalars<T> scalars() const {
    return LossScalars<T>{static_cast<T>(threshold), static_cast<T>(threshold_neg), static_cast<T>(symba_alpha),
                          static_cast<T>(scff_lambda)};
  }
};

struct OptimOptions {
  Optim optimizer = Optim::Adam;
  double lr = 3e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double momentum = 0.0;
  double weight_decay = 0.0;
  int64_t step = 1;  // the 1-based number of the update being applied
};

// The step-dependent constants of Adam, computed in double on the host as torch.optim.Adam does.
template <typename T>
AdamConsts<T> make_adam_consts(const OptimOptions& o) {
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(o.step));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(o.step));
  AdamConsts<T> c;
  c.one_minus_beta1 = static_cast<T>(1.0 - o.beta1);
  c.beta2 = static_cast<T>(o.beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - o.beta2);
  c.eps = static_cast<T>(o.eps);
  c.weight_decay = static_cast<T>(o.weight_decay);
  c.step_size = static_cast<T>(o.lr / bc1);
  c.bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  return c;
}

template <typename T>
SGDConsts<T> make_sgd_consts(const OptimOptions& o) {
  SGDConsts<T> c;
  c.lr = static_cast<T>(o.lr);
  c.momentum = static_cast<T>(o.momentum);
  c.weight_decay = static_cast<T>(o.weight_decay);
  c.first = o.step == 1;
  return c;
}

}  // namespace ffk

// Fused optimizer update on the CPU: one parallel pass over a parameter, its gradient and its fp32
// optimizer state. The per-element math is ffk::adam_update / ffk::sgd_update (ff_math.h). The gradient is in the
// parameter's dtype, or bf16 for float parameters (the fused step under autocast hands its bf16 dW GEMM output
// over as is; it is read exactly into fp32).
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <type_traits>

#include "ff_kernels.h"

namespace ffk {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename scalar_t, typename grad_t>
void adam_pass(const ParamState& ps, const OptimOptions& opt) {
  using state_t = state_type<scalar_t>;
  const AdamConsts<state_t> c = make_adam_consts<state_t>(opt);
  scalar_t* p = ps.param.data_ptr<scalar_t>();
  const grad_t* g = ps.grad.const_data_ptr<grad_t>();
  state_t* m = ps.state1.data_ptr<state_t>();
  state_t* v = ps.state2.data_ptr<state_t>();
  at::parallel_for(0, ps.param.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      state_t pi = static_cast<state_t>(p[i]);
      adam_update<state_t>(pi, static_cast<state_t>(g[i]), m[i], v[i], c);
      p[i] = static_cast<scalar_t>(pi);
    }
  });
}

template <typename scalar_t, typename grad_t>
void sgd_pass(const ParamState& ps, const OptimOptions& opt) {
  using state_t = state_type<scalar_t>;
  const SGDConsts<state_t> c = make_sgd_consts<state_t>(opt);
  scalar_t* p = ps.param.data_ptr<scalar_t>();
  const grad_t* g = ps.grad.const_data_ptr<grad_t>();
  state_t* buf = c.momentum != state_t(0) ? ps.state1.data_ptr<state_t>() : nullptr;
  at::parallel_for(0, ps.param.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      state_t pi = static_cast<state_t>(p[i]);
      sgd_update<state_t>(pi, static_cast<state_t>(g[i]), buf ? buf + i : nullptr, c);
      p[i] = static_cast<scalar_t>(pi);
    }
  });
}

}  // namespace

void ff_update_cpu(const ParamState& ps, const at::Tensor& loss, const OptimOptions& opt) {
  if (loss.defined() && !std::isfinite(loss.item<double>())) return;  // nothing is touched
  const bool bf16_grad = ps.grad.scalar_type() == at::kBFloat16 && ps.param.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES(ps.param.scalar_type(), "ff_update_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (bf16_grad) {
        if (opt.optimizer == Optim::Adam) {
          adam_pass<float, c10::BFloat16>(ps, opt);
        } else {
          sgd_pass<float, c10::BFloat16>(ps, opt);
        }
        return;
      }
    }
    if (opt.optimizer == Optim::Adam) {
      adam_pass<scalar_t, scalar_t>(ps, opt);
    } else {
      sgd_pass<scalar_t, scalar_t>(ps, opt);
    }
  });
}

}  // namespace ffk

// Fused optimizer update on a CUDA GPU: one grid-stride pass over a parameter, its gradient and its
// optimizer state (fp32; fp64 for fp64 parameters). The per-element math is ffk::adam_update /
// ffk::sgd_update (ff_math.h), as in ff_update_cpu.cpp. The gradient is in the parameter's dtype, or bf16/fp16 for
// float parameters (the fused step under autocast hands its dW GEMM output over as is; it is read exactly into fp32).
//
// The non-finite-loss guard runs on the device: every thread reads the loss and returns when it is
// NaN or infinite, so a bad step touches nothing and the host never waits for the GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "../ff_kernels.h"

namespace ffk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

// A loss value in device memory, of any floating dtype; `ptr == nullptr` means "no loss given".
struct LossRef {
  const void* ptr;
  at::ScalarType dtype;

  __device__ __forceinline__ bool finite() const {
    if (ptr == nullptr) return true;
    switch (dtype) {
      case at::ScalarType::Double:
        return isfinite(*static_cast<const double*>(ptr));
      case at::ScalarType::Half:
        return isfinite(static_cast<float>(*static_cast<const at::Half*>(ptr)));
      case at::ScalarType::BFloat16:
        return isfinite(static_cast<float>(*static_cast<const at::BFloat16*>(ptr)));
      default:  // float; the host converts every other dtype to double
        return isfinite(*static_cast<const float*>(ptr));
    }
  }
};

// The loss in a dtype LossRef reads (other dtypes converted to double), or undefined when none is given.
at::Tensor device_readable_loss(const at::Tensor& loss) {
  if (!loss.defined()) return loss;
  const auto st = loss.scalar_type();
  const bool direct = st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
  return direct ? loss : loss.to(at::kDouble);
}

template <typename scalar_t, typename state_t, typename grad_t = scalar_t>
__global__ void adam_kernel(scalar_t* __restrict__ p, const grad_t* __restrict__ g, state_t* __restrict__ m,
                            state_t* __restrict__ v, int64_t n, AdamConsts<state_t> c, LossRef loss) {
  if (!loss.finite()) return;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    state_t pi = static_cast<state_t>(p[i]);
    adam_update<state_t>(pi, static_cast<state_t>(g[i]), m[i], v[i], c);
    p[i] = static_cast<scalar_t>(pi);
  }
}

template <typename scalar_t, typename state_t, typename grad_t = scalar_t>
__global__ void sgd_kernel(scalar_t* __restrict__ p, const grad_t* __restrict__ g, state_t* __restrict__ buf,
                           int64_t n, SGDConsts<state_t> c, LossRef loss) {
  if (!loss.finite()) return;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    state_t pi = static_cast<state_t>(p[i]);
    sgd_update<state_t>(pi, static_cast<state_t>(g[i]), buf ? buf + i : nullptr, c);
    p[i] = static_cast<scalar_t>(pi);
  }
}

// One pass over a parameter of scalar_t with a gradient of grad_t.
template <typename scalar_t, typename grad_t>
void launch_update(const ParamState& ps, const OptimOptions& opt, LossRef lref, int64_t n, int64_t blocks,
                   cudaStream_t stream) {
  using state_t = state_type<scalar_t>;
  scalar_t* p = ps.param.data_ptr<scalar_t>();
  const grad_t* g = ps.grad.const_data_ptr<grad_t>();
  if (opt.optimizer == Optim::Adam) {
    adam_kernel<scalar_t, state_t, grad_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, g, ps.state1.data_ptr<state_t>(), ps.state2.data_ptr<state_t>(), n, make_adam_consts<state_t>(opt), lref);
  } else {
    const SGDConsts<state_t> c = make_sgd_consts<state_t>(opt);
    state_t* buf = c.momentum != state_t(0) ? ps.state1.data_ptr<state_t>() : nullptr;
    sgd_kernel<scalar_t, state_t, grad_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, g, buf, n, c,
                                                                                                   lref);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void ff_update_cuda(const ParamState& ps, const at::Tensor& loss, const OptimOptions& opt) {
  const int64_t n = ps.param.numel();
  if (n == 0) return;
  const at::Tensor l = device_readable_loss(loss);  // alive until the kernel is enqueued
  const LossRef lref{l.defined() ? l.const_data_ptr() : nullptr, l.defined() ? l.scalar_type() : at::kFloat};
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto gt = ps.grad.scalar_type();
  const bool low_grad = ps.param.scalar_type() == at::kFloat && (gt == at::kBFloat16 || gt == at::kHalf);
  if (low_grad) {  // the fused step under autocast: float parameters, the bf16/fp16 dW of its GEMM
    if (gt == at::kBFloat16) {
      launch_update<float, c10::BFloat16>(ps, opt, lref, n, blocks, stream);
    } else {
      launch_update<float, c10::Half>(ps, opt, lref, n, blocks, stream);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ps.param.scalar_type(), "ff_update_cuda", [&] {
    launch_update<scalar_t, scalar_t>(ps, opt, lref, n, blocks, stream);
  });
}

}  // namespace ffk

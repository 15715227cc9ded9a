// Fused FF forward + exact local gradient on a CUDA GPU: the algorithm of ff_grad_cpu.cpp.
//
// One 2B-row problem (pos rows first, then neg rows), everything on the current stream, no host sync:
//   1. normalize_kernel   block per row: sum of squares by block reduction, xhat = x / d   (2B, K)
//   2. GEMM               z = xhat W^T through cuBLAS (at::mm; fp32 accumulation)          (2B, N)
//   3. epilogue_kernel    block per pos/neg pair i: h = relu(z + b), g = s * sum h^2 (block reduction
//                         in the accumulation type), the pair's loss terms and c = dL/dg * 2s; writes
//                         h_pos/h_neg/g and overwrites z with c * h (= dL/dz); the pair's loss goes
//                         into a per-pair array
//   4. sum_pairs_kernel   loss = the per-pair array summed in a fixed order (one block, no atomics)
//   5. GEMM               grad_W = (dL/dz)^T xhat                                          (N, K)
//   6. grad_b = column sums of dL/dz (at::sum, fp32 accumulation for half/bfloat16)
// The per-element and per-row math is ff_math.h's; results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../ff_kernels.h"
#include "block_reduce.cuh"

namespace ffk {
namespace {

using cuda::block_sum;
using cuda::kWarpSize;

template <typename scalar_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x_pos, const scalar_t* __restrict__ x_neg,
                                 scalar_t* __restrict__ xhat, int64_t B, int64_t K, Norm norm,
                                 at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const scalar_t* x = row < B ? x_pos + row * K : x_neg + (row - B) * K;
  scalar_t* out = xhat + row * K;
  if (norm == Norm::None) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[k] = x[k];
    return;
  }
  acc_t ss = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[k]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  // x / d with d = 1 / row_scale: divide (not multiply) to round like the reference does
  const acc_t d = acc_t(1) / row_scale<acc_t>(ss, K, norm, eps);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[k] = static_cast<scalar_t>(static_cast<acc_t>(x[k]) / d);
}

template <typename acc_t>
struct LossArgs {
  acc_t goodness_scale, threshold, symba_alpha;
  Loss loss;
};

// h = relu(z + b) into h; returns this thread's part of sum h^2 (of h as stored, like the CPU kernel)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t relu_row_part(const scalar_t* __restrict__ z, const scalar_t* __restrict__ b,
                                               scalar_t* __restrict__ h, int64_t N) {
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    acc_t v = static_cast<acc_t>(z[j]);
    if (b) v += static_cast<acc_t>(b[j]);
    const scalar_t hv = static_cast<scalar_t>(relu(v));
    h[j] = hv;
    ss += static_cast<acc_t>(hv) * static_cast<acc_t>(hv);
  }
  return ss;
}

template <typename scalar_t>
__global__ void epilogue_kernel(scalar_t* __restrict__ z, const scalar_t* __restrict__ b, scalar_t* __restrict__ h_pos,
                                scalar_t* __restrict__ h_neg, scalar_t* __restrict__ g_pos,
                                scalar_t* __restrict__ g_neg, double* __restrict__ pair_loss, int64_t B, int64_t N,
                                LossArgs<at::opmath_type<scalar_t>> args) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize];
  const int64_t i = blockIdx.x;
  scalar_t* zp = z + i * N;
  scalar_t* zn = z + (B + i) * N;
  scalar_t* hp = h_pos + i * N;
  scalar_t* hn = h_neg + i * N;
  const acc_t s = args.goodness_scale;
  const acc_t ssp = block_sum(relu_row_part<scalar_t, acc_t>(zp, b, hp, N), scratch);
  const acc_t ssn = block_sum(relu_row_part<scalar_t, acc_t>(zn, b, hn, N), scratch);
  // g is rounded to the output dtype before it enters the loss, as in the CPU kernel
  const acc_t gp = static_cast<acc_t>(static_cast<scalar_t>(s * ssp));
  const acc_t gn = static_cast<acc_t>(static_cast<scalar_t>(s * ssn));
  const PairTerms<acc_t> t = pair_terms<acc_t>(gp, gn, args.loss, args.threshold, args.symba_alpha, B);
  if (threadIdx.x == 0) {
    g_pos[i] = static_cast<scalar_t>(gp);
    g_neg[i] = static_cast<scalar_t>(gn);
    pair_loss[i] = static_cast<double>(t.loss);
  }
  const acc_t cp = coef_from_dg<acc_t>(t.dg_pos, s);
  const acc_t cn = coef_from_dg<acc_t>(t.dg_neg, s);
  // each thread reads back the h it wrote itself: no synchronization needed
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) zp[j] = static_cast<scalar_t>(cp * static_cast<acc_t>(hp[j]));
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) zn[j] = static_cast<scalar_t>(cn * static_cast<acc_t>(hn[j]));
}

constexpr int kSumThreads = 256;

// loss = sum of the per-pair terms, in an order fixed by the launch shape (one block)
template <typename scalar_t>
__global__ void sum_pairs_kernel(const double* __restrict__ pair_loss, int64_t B, scalar_t* __restrict__ loss) {
  __shared__ double scratch[kWarpSize];
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) part += pair_loss[i];
  const double total = block_sum(part, scratch);
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(total);
}

}  // namespace

GradResult ff_grad_cuda(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                        const at::Tensor& bias, const LossOptions& opt) {
  const int64_t B = x_pos.size(0), K = x_pos.size(1), N = weight.size(0);
  TORCH_CHECK(2 * B <= INT32_MAX, "ffkernels: batch too large for the CUDA kernels (2B = ", 2 * B,
              " rows, at most ", INT32_MAX, ")");
  const bool has_bias = bias.defined();
  const auto opts = x_pos.options();
  auto xhat = at::empty({2 * B, K}, opts);
  auto h_pos = at::empty({B, N}, opts);
  auto h_neg = at::empty({B, N}, opts);
  auto g_pos = at::empty({B}, opts);
  auto g_neg = at::empty({B}, opts);
  auto pair_loss = at::empty({B}, opts.dtype(at::kDouble));
  auto loss = at::empty({}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GradResult r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_pos.scalar_type(), "ff_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_kernel<scalar_t><<<static_cast<unsigned>(2 * B), cuda::threads_for_row(K), 0, stream>>>(
        x_pos.const_data_ptr<scalar_t>(), x_neg.const_data_ptr<scalar_t>(), xhat.data_ptr<scalar_t>(), B, K,
        opt.norm, static_cast<acc_t>(opt.norm_eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto z = at::mm(xhat, weight.t());

    const LossArgs<acc_t> args{goodness_scale<acc_t>(N, opt.goodness), static_cast<acc_t>(opt.threshold),
                               static_cast<acc_t>(opt.symba_alpha), opt.loss};
    epilogue_kernel<scalar_t><<<static_cast<unsigned>(B), cuda::threads_for_row(N), 0, stream>>>(
        z.data_ptr<scalar_t>(), has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, h_pos.data_ptr<scalar_t>(),
        h_neg.data_ptr<scalar_t>(), g_pos.data_ptr<scalar_t>(), g_neg.data_ptr<scalar_t>(),
        pair_loss.data_ptr<double>(), B, N, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_pairs_kernel<scalar_t><<<1, kSumThreads, 0, stream>>>(pair_loss.const_data_ptr<double>(), B,
                                                             loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // z now holds dL/dz
    r.grad_weight = at::mm(z.t(), xhat);
    if (has_bias) r.grad_bias = z.sum(0);
  });
  r.loss = loss;
  std::tie(r.h_pos, r.h_neg, r.g_pos, r.g_neg) = std::tie(h_pos, h_neg, g_pos, g_neg);
  return r;
}

}  // namespace ffk

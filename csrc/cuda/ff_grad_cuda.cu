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
// With peer normalization (opt.peer_norm > 0; otherwise none of this is launched), between 2 and 3:
//   2a. peer_colsum_kernel  block per (256 units, 64 positive rows): the column sums of h+ = relu(z+ + b), as the
//                           epilogue will store it, over its rows, in a fixed row order -> (row chunks, N) partials
//   2b. peer_kernel         one block: m_j = the partials added in chunk order / B, r'_j (written: GradResult's
//                           peer_mean), rbar' (block reduction), v_j and L_peer (block reduction in double)
//   and the epilogue (3) adds v_j to dL/dz of every positive row (c_i h_ij + v_j, also where h = 0); the
//   loss (4) is the pair terms plus L_peer. The binding commits peer_mean <- r' on the device when the loss
//   is finite. No atomics: the column reduction has a fixed order too.
// The per-element and per-row math is ff_math.h's; results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

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

// h_j = relu(z_j + b_j) as stored (rounded to the dtype)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t relu_of(const scalar_t* __restrict__ z, const scalar_t* __restrict__ b, int64_t j) {
  acc_t v = static_cast<acc_t>(z[j]);
  if (b) v += static_cast<acc_t>(b[j]);
  return static_cast<scalar_t>(relu(v));
}

// h = relu(z + b) into h; returns this thread's part of sum h^2 (of h as stored, like the CPU kernel)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t relu_row_part(const scalar_t* __restrict__ z, const scalar_t* __restrict__ b,
                                               scalar_t* __restrict__ h, int64_t N) {
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const scalar_t hv = relu_of<scalar_t, acc_t>(z, b, j);
    h[j] = hv;
    ss += static_cast<acc_t>(hv) * static_cast<acc_t>(hv);
  }
  return ss;
}

// ---- peer normalization ---------------------------------------------------------------------------------

constexpr int kColThreads = 256;     // units per block of peer_colsum_kernel
constexpr int64_t kColRows = 64;     // positive rows per block of peer_colsum_kernel (one row chunk), at least
constexpr int64_t kMaxChunks = 65535;  // gridDim.y limit

// Block (u, c): thread t sums h+_ij = relu(z+_ij + b_j) over the `rows` rows of chunk c, in row order, for unit
// j = u * kColThreads + t (consecutive threads read consecutive units: coalesced), into part[c * N + j].
template <typename scalar_t>
__global__ void peer_colsum_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ b,
                                   at::opmath_type<scalar_t>* __restrict__ part, int64_t B, int64_t N, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const int64_t c = blockIdx.y;
  const int64_t end = (c + 1) * rows < B ? (c + 1) * rows : B;
  acc_t s = 0;
  for (int64_t i = c * rows; i < end; ++i) s += static_cast<acc_t>(relu_of<scalar_t, acc_t>(z + i * N, b, j));
  part[c * N + j] = s;
}

template <typename acc_t>
struct PeerArgs {
  acc_t lambda, mu;
};

// One block: r'_j = mu r_j + (1 - mu) m_j with m_j = (sum of the chunk partials, in chunk order) / B, written to
// r_new; rbar' by block reduction; then v_j = peer_dz(...) and L_peer = sum_j peer_loss_term(...) (summed in
// double, fixed order). Each thread reads back only the r'_j it wrote itself.
template <typename acc_t>
__global__ void peer_kernel(const acc_t* __restrict__ part, int64_t chunks, const acc_t* __restrict__ r,
                            acc_t* __restrict__ r_new, acc_t* __restrict__ v, double* __restrict__ peer_loss, int64_t B,
                            int64_t N, PeerArgs<acc_t> args) {
  __shared__ acc_t scratch[kWarpSize];
  __shared__ double scratch_d[kWarpSize];
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    acc_t colsum = 0;
    for (int64_t c = 0; c < chunks; ++c) colsum += part[c * N + j];
    const acc_t rj = peer_running_mean<acc_t>(r[j], colsum / static_cast<acc_t>(B), args.mu);
    r_new[j] = rj;
    sum += rj;
  }
  const acc_t r_bar = block_sum(sum, scratch) / static_cast<acc_t>(N);
  double loss = 0.0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc_t rj = r_new[j];
    v[j] = peer_dz<acc_t>(rj, r_bar, args.lambda, args.mu, N, B);
    loss += static_cast<double>(peer_loss_term<acc_t>(rj, r_bar, args.lambda, N));
  }
  const double total = block_sum(loss, scratch_d);
  if (threadIdx.x == 0) *peer_loss = total;
}

// ---- the pair epilogue and the loss ------------------------------------------------------------------------

// peer_v: null, or v_j (with peer normalization) added to dL/dz of the positive row
template <typename scalar_t>
__global__ void epilogue_kernel(scalar_t* __restrict__ z, const scalar_t* __restrict__ b, scalar_t* __restrict__ h_pos,
                                scalar_t* __restrict__ h_neg, scalar_t* __restrict__ g_pos,
                                scalar_t* __restrict__ g_neg, double* __restrict__ pair_loss, int64_t B, int64_t N,
                                LossArgs<at::opmath_type<scalar_t>> args,
                                const at::opmath_type<scalar_t>* __restrict__ peer_v) {
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
  if (peer_v) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x)
      zp[j] = static_cast<scalar_t>(cp * static_cast<acc_t>(hp[j]) + peer_v[j]);
  } else {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) zp[j] = static_cast<scalar_t>(cp * static_cast<acc_t>(hp[j]));
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) zn[j] = static_cast<scalar_t>(cn * static_cast<acc_t>(hn[j]));
}

constexpr int kSumThreads = 256;

// loss = sum of the per-pair terms, in an order fixed by the launch shape (one block), plus L_peer when given
template <typename scalar_t>
__global__ void sum_pairs_kernel(const double* __restrict__ pair_loss, int64_t B, const double* __restrict__ peer_loss,
                                 scalar_t* __restrict__ loss) {
  __shared__ double scratch[kWarpSize];
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) part += pair_loss[i];
  double total = block_sum(part, scratch);
  if (peer_loss) total += *peer_loss;
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(total);
}

}  // namespace

GradResult ff_grad_cuda(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt) {
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
  const bool peer = opt.peer_norm > 0.0;
  TORCH_CHECK(!peer || peer_mean.defined(), "ffkernels: peer_norm > 0 needs peer_mean");
  TORCH_CHECK(!peer || peer_mean.scalar_type() == (x_pos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "ffkernels: peer_mean must have the optimizer-state dtype (float32; float64 for float64 weights)");
  // peer normalization: r (the state dtype, which is the accumulation type), r', v, L_peer
  const at::Tensor r = peer ? peer_mean.contiguous() : at::Tensor();
  const int64_t chunk_rows = std::max(kColRows, (B + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (B + chunk_rows - 1) / chunk_rows;
  at::Tensor r_new, peer_v, peer_part, peer_loss;
  if (peer) {
    r_new = at::empty({N}, r.options());
    peer_v = at::empty({N}, r.options());
    peer_part = at::empty({chunks, N}, r.options());
    peer_loss = at::empty({}, opts.dtype(at::kDouble));
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GradResult res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_pos.scalar_type(), "ff_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_kernel<scalar_t><<<static_cast<unsigned>(2 * B), cuda::threads_for_row(K), 0, stream>>>(
        x_pos.const_data_ptr<scalar_t>(), x_neg.const_data_ptr<scalar_t>(), xhat.data_ptr<scalar_t>(), B, K,
        opt.norm, static_cast<acc_t>(opt.norm_eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto z = at::mm(xhat, weight.t());
    const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;

    if (peer) {
      const dim3 grid(static_cast<unsigned>((N + kColThreads - 1) / kColThreads), static_cast<unsigned>(chunks));
      peer_colsum_kernel<scalar_t><<<grid, kColThreads, 0, stream>>>(z.const_data_ptr<scalar_t>(), b,
                                                                      peer_part.data_ptr<acc_t>(), B, N, chunk_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const PeerArgs<acc_t> pargs{static_cast<acc_t>(opt.peer_norm), static_cast<acc_t>(opt.peer_momentum)};
      peer_kernel<acc_t><<<1, cuda::threads_for_row(N), 0, stream>>>(
          peer_part.const_data_ptr<acc_t>(), chunks, r.const_data_ptr<acc_t>(), r_new.data_ptr<acc_t>(),
          peer_v.data_ptr<acc_t>(), peer_loss.data_ptr<double>(), B, N, pargs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    const LossArgs<acc_t> args{goodness_scale<acc_t>(N, opt.goodness), static_cast<acc_t>(opt.threshold),
                               static_cast<acc_t>(opt.symba_alpha), opt.loss};
    epilogue_kernel<scalar_t><<<static_cast<unsigned>(B), cuda::threads_for_row(N), 0, stream>>>(
        z.data_ptr<scalar_t>(), b, h_pos.data_ptr<scalar_t>(), h_neg.data_ptr<scalar_t>(), g_pos.data_ptr<scalar_t>(),
        g_neg.data_ptr<scalar_t>(), pair_loss.data_ptr<double>(), B, N, args,
        peer ? peer_v.const_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_pairs_kernel<scalar_t><<<1, kSumThreads, 0, stream>>>(pair_loss.const_data_ptr<double>(), B,
                                                             peer ? peer_loss.const_data_ptr<double>() : nullptr,
                                                             loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // z now holds dL/dz
    res.grad_weight = at::mm(z.t(), xhat);
    if (has_bias) res.grad_bias = z.sum(0);
  });
  res.loss = loss;
  std::tie(res.h_pos, res.h_neg, res.g_pos, res.g_neg) = std::tie(h_pos, h_neg, g_pos, g_neg);
  res.peer_mean = r_new;  // r' (undefined without peer normalization); the binding commits it
  return res;
}

}  // namespace ffk

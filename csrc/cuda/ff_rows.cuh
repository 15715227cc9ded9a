// The row kernels shared by the CUDA FF step (ff_grad_cuda.cu) and its labeled first layer
// (ff_grad_labeled_cuda.cu): normalization, the peer-normalization column reduction, the pair epilogue (which
// also reduces the bias gradient), the loss sum. The per-element and per-row math is ff_math.h's; every
// reduction has a fixed order set by the launch shape (no atomics), so results are bitwise reproducible.
//
// The labeled variants take a LabelRows: the positive and the negative row of pair i share the pre-activation
// row z_i = x~_i W^T (x~: x / d with the label features zeroed) and differ by lv_i * W[:, y_i] (lv_i = value / d_i),
// so h+_ij = relu(z_ij + lv_i wl[y+_i, j] + b_j), h-_ij = relu(z_ij + lv_i wl[y-_i, j] + b_j) with wl = W[:, :C]^T.
//
// Mixed precision (docs/design.md, "Mixed precision"): the kernels take the GEMM operand type z_t besides the
// parameters' scalar_t (z_t = scalar_t, the default, outside autocast: the same code as without it; bf16 or fp16 for
// float parameters under autocast). x_hat (and lv) are rounded to z_t; z, the label columns wl and the dL/dz written
// over z are z_t; h, g, b and the bias gradient stay scalar_t and everything is computed in acc_t, as the CPU kernels
// (ff_cpu_rows.h: normalize_rows, relu_row, store_dz).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "../ff_options.h"
#include "block_reduce.cuh"

namespace ffk {
namespace cuda {

// ---- the GEMM operand type ---------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<z_t>{}) with z_t the GEMM operand type that `gemm` (LossOptions::gemm) asks of parameters of
// scalar_t: scalar_t itself (GemmDtype::Param), else c10::BFloat16 or c10::Half for float parameters (torch.autocast;
// the binding admits lower-precision GEMMs for float32 weights only). The kernels' <scalar_t, scalar_t> instances are
// the code without mixed precision.
template <typename scalar_t, typename F>
void with_gemm_type(GemmDtype gemm, F&& f) {
  if (gemm == GemmDtype::Param) {
    f(TypeTag<scalar_t>{});
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (gemm == GemmDtype::BFloat16) {
      f(TypeTag<c10::BFloat16>{});
    } else {
      f(TypeTag<c10::Half>{});
    }
  } else {
    TORCH_CHECK(false, "ffkernels: lower-precision GEMMs (autocast) need float32 weights");
  }
}

// ---- normalization --------------------------------------------------------------------------------------

// Block per row of pos||neg: the row's sum of squares by block reduction, d = row_divisor (ff_math.h, the oracle's
// formula), x_hat = x / d into the (2B, K) buffer, in the GEMM dtype z_t (the quotient rounded to scalar_t, then to
// z_t: once, for float parameters).
template <typename scalar_t, typename z_t = scalar_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x_pos, const scalar_t* __restrict__ x_neg,
                                 z_t* __restrict__ xhat, int64_t B, int64_t K, Norm norm,
                                 at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const scalar_t* x = row < B ? x_pos + row * K : x_neg + (row - B) * K;
  z_t* out = xhat + row * K;
  if (norm == Norm::None) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[k] = static_cast<z_t>(x[k]);
    return;
  }
  acc_t ss = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[k]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const acc_t d = row_divisor<acc_t>(ss, K, norm, eps);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    out[k] = static_cast<z_t>(static_cast<scalar_t>(static_cast<acc_t>(x[k]) / d));
}

// Block per row of x (labeled first layer): the sum of squares of x with the label one-hot written in,
// value^2 + sum_{k >= C} x_k^2 (the same whatever the label), d = row_divisor; x~ = x / d with features [0, C)
// zeroed into xhat (B, K); lv_i = value / d as x_hat would store the label feature (rounded to the dtype, then to
// the GEMM dtype z_t).
template <typename scalar_t, typename z_t = scalar_t>
__global__ void normalize_labeled_kernel(const scalar_t* __restrict__ x, z_t* __restrict__ xhat,
                                         at::opmath_type<scalar_t>* __restrict__ lv, int64_t K, int64_t C,
                                         at::opmath_type<scalar_t> value, Norm norm, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * K;
  z_t* out = xhat + row * K;
  acc_t ss = 0;
  for (int64_t k = C + threadIdx.x; k < K; k += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[k]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch) + value * value;  // the one-hot adds value^2
  const acc_t d = row_divisor<acc_t>(ss, K, norm, eps);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    out[k] = k < C ? z_t(0) : static_cast<z_t>(static_cast<scalar_t>(static_cast<acc_t>(xr[k]) / d));
  if (threadIdx.x == 0) lv[row] = static_cast<acc_t>(static_cast<z_t>(static_cast<scalar_t>(value / d)));
}

// ---- the rows of a pair ------------------------------------------------------------------------------------

// The labeled first layer's label term of a row (wl == nullptr: the plain step, no label term).
template <typename scalar_t, typename z_t = scalar_t>
struct LabelRows {
  const z_t* wl = nullptr;                     // (C, N): label column c of W (its GEMM-dtype copy) as row c
  const int64_t* y_pos = nullptr;              // (B) labels of the positive rows
  const int64_t* y_neg = nullptr;              // (B) labels of the negative rows
  const at::opmath_type<scalar_t>* lv = nullptr;  // (B) value / d_i
};

// h_j = relu(z_j + a col_j + b_j) as stored (rounded to the dtype); col (the row's label column of W, scaled by
// a = lv_i) and b may be null; z and col in the GEMM dtype z_t, read exactly into acc_t. The order of the additions
// is the CPU kernels' (ff_cpu_rows.h relu_row).
template <typename scalar_t, typename acc_t, typename z_t = scalar_t>
__device__ __forceinline__ scalar_t relu_of(const z_t* __restrict__ z, const z_t* __restrict__ col, acc_t a,
                                            const scalar_t* __restrict__ b, int64_t j) {
  acc_t v = static_cast<acc_t>(z[j]);
  if (col) v += a * static_cast<acc_t>(col[j]);
  if (b) v += static_cast<acc_t>(b[j]);
  return static_cast<scalar_t>(relu(v));
}

// h = relu(z + a col + b) into h; returns this thread's part of sum h^2 (of h as stored, like the CPU kernel)
template <typename scalar_t, typename acc_t, typename z_t = scalar_t>
__device__ __forceinline__ acc_t relu_row_part(const z_t* __restrict__ z, const z_t* __restrict__ col, acc_t a,
                                               const scalar_t* __restrict__ b, scalar_t* __restrict__ h, int64_t N) {
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const scalar_t hv = relu_of<scalar_t, acc_t, z_t>(z, col, a, b, j);
    h[j] = hv;
    ss += static_cast<acc_t>(hv) * static_cast<acc_t>(hv);
  }
  return ss;
}

// ---- peer normalization ---------------------------------------------------------------------------------

constexpr int kColThreads = 256;       // units per block of peer_colsum_kernel
constexpr int64_t kColRows = 64;       // positive rows per block of peer_colsum_kernel (one row chunk), at least
constexpr int64_t kMaxChunks = 65535;  // gridDim.y limit

// Block (u, c): thread t sums h+_ij = relu(z+_ij (+ lv_i wl[y+_i, j]) + b_j) over the `rows` rows of chunk c, in row
// order, for unit j = u * kColThreads + t (consecutive threads read consecutive units: coalesced), into
// part[c * N + j]. z+ row i is z + i * N (the positive rows come first; the labeled layer's rows are shared).
template <typename scalar_t, typename z_t = scalar_t>
__global__ void peer_colsum_kernel(const z_t* __restrict__ z, const scalar_t* __restrict__ b,
                                   LabelRows<scalar_t, z_t> label, at::opmath_type<scalar_t>* __restrict__ part,
                                   int64_t B, int64_t N, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const int64_t c = blockIdx.y;
  const int64_t end = (c + 1) * rows < B ? (c + 1) * rows : B;
  acc_t s = 0;
  for (int64_t i = c * rows; i < end; ++i) {
    const z_t* col = label.wl ? label.wl + label.y_pos[i] * N : nullptr;
    const acc_t a = label.wl ? label.lv[i] : acc_t(0);
    s += static_cast<acc_t>(relu_of<scalar_t, acc_t, z_t>(z + i * N, col, a, b, j));
  }
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

// The peer-normalization buffers and launches of one step: r', v, L_peer from the positive rows (docs/cuda.md 2a/2b).
template <typename acc_t>
struct PeerBuffers {
  at::Tensor r, r_new, v, part, loss;
  int64_t chunk_rows = 0, chunks = 0;

  PeerBuffers(const at::Tensor& peer_mean, int64_t B, int64_t N, const at::TensorOptions& opts) {
    r = peer_mean.contiguous();
    chunk_rows = std::max(kColRows, (B + kMaxChunks - 1) / kMaxChunks);
    chunks = (B + chunk_rows - 1) / chunk_rows;
    r_new = at::empty({N}, r.options());
    v = at::empty({N}, r.options());
    part = at::empty({chunks, N}, r.options());
    loss = at::empty({}, opts.dtype(at::kDouble));
  }

  template <typename scalar_t, typename z_t = scalar_t>
  void launch(const at::Tensor& z, const scalar_t* b, LabelRows<scalar_t, z_t> label, int64_t B, int64_t N,
              const LossOptions& opt, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((N + kColThreads - 1) / kColThreads), static_cast<unsigned>(chunks));
    peer_colsum_kernel<scalar_t, z_t><<<grid, kColThreads, 0, stream>>>(z.const_data_ptr<z_t>(), b, label,
                                                                         part.data_ptr<acc_t>(), B, N, chunk_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const PeerArgs<acc_t> pargs{static_cast<acc_t>(opt.peer_norm), static_cast<acc_t>(opt.peer_momentum)};
    peer_kernel<acc_t><<<1, threads_for_row(N), 0, stream>>>(part.const_data_ptr<acc_t>(), chunks,
                                                             r.const_data_ptr<acc_t>(), r_new.data_ptr<acc_t>(),
                                                             v.data_ptr<acc_t>(), loss.data_ptr<double>(), B, N, pargs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// ---- the pair epilogue, with the bias gradient ------------------------------------------------------------

constexpr int64_t kMaxPairsPerBlock = 64;
constexpr int64_t kEpilogueBlocks = 512;  // about this many blocks once B is large enough

// Pairs per block of epilogue_kernel: one pair per block up to B = 512 pairs, then about 512 blocks (at most 64
// pairs each). It depends on B only (not on the GPU), so results are the same on every device.
inline int64_t pairs_per_block(int64_t B) {
  return std::min(kMaxPairsPerBlock, std::max<int64_t>(1, (B + kEpilogueBlocks - 1) / kEpilogueBlocks));
}

template <typename acc_t>
struct LossArgs {
  acc_t goodness_scale;
  LossScalars<acc_t> scalars;
  Loss loss;
};

template <typename scalar_t, typename z_t = scalar_t>
struct EpilogueArgs {
  using acc_t = at::opmath_type<scalar_t>;
  z_t* z;                       // in: z without the bias, (2B, N) pos rows then neg rows, or (B, N) shared rows
                                // (labeled); out: dL/dz, (2B, N), or dL/dz+ + dL/dz- (B, N) (labeled); GEMM dtype
  const scalar_t* b;            // (N) or null
  LabelRows<scalar_t, z_t> label;  // label.wl null: the plain step
  scalar_t *h_pos, *h_neg, *g_pos, *g_neg;  // out: (B, N), (B, N), (B), (B)
  double* pair_loss;            // out: (B), each pair's loss terms
  acc_t* coef;                  // out, or null: (2B) c_i of the pos rows then the neg rows (dL/dz_i = c_i h_i)
  acc_t* db_part;               // out, or null (no bias): (blocks, N) the block's column sums of dL/dz
  const acc_t* peer_v;          // null, or v_j (peer normalization), added to dL/dz of the positive rows
  int64_t B, N, pairs;          // pairs per block
  LossArgs<acc_t> loss;
};

// Block per `pairs` consecutive pos/neg pairs. Phase 1, pair by pair: h = relu(z + b) (+ the label term) for both
// rows, g = s * sum h^2 by block reduction, the pair's loss terms, c = dL/dg * 2s (ff_math.h). Phase 2, unit by
// unit (each thread over the units whose h it wrote itself, so no synchronization beyond the c in shared memory):
// dL/dz = c h (+ v_j for the positive row) rounded to the dtype, written over z, and the block's column sum of the
// stored dL/dz (pair order; pos then neg) into db_part: the bias gradient needs no pass of its own over dL/dz.
// Under autocast (z_t lower than scalar_t) the dL/dz rounded to scalar_t is rounded once more to z_t for the dW GEMM,
// and db sums the scalar_t values (the fp32 dL/dz, as the CPU kernel's dz_full).
template <typename scalar_t, typename z_t = scalar_t>
__global__ void epilogue_kernel(EpilogueArgs<scalar_t, z_t> e) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize];
  __shared__ acc_t coefs[2 * kMaxPairsPerBlock];
  const int64_t B = e.B, N = e.N;
  const bool labeled = e.label.wl != nullptr;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * e.pairs;
  const int64_t last = first + e.pairs < B ? first + e.pairs : B;
  const acc_t s = e.loss.goodness_scale;
  for (int64_t i = first; i < last; ++i) {
    const z_t* zp = e.z + i * N;
    const z_t* zn = labeled ? zp : e.z + (B + i) * N;
    const z_t* colp = labeled ? e.label.wl + e.label.y_pos[i] * N : nullptr;
    const z_t* coln = labeled ? e.label.wl + e.label.y_neg[i] * N : nullptr;
    const acc_t a = labeled ? e.label.lv[i] : acc_t(0);
    const acc_t ssp = block_sum(relu_row_part<scalar_t, acc_t, z_t>(zp, colp, a, e.b, e.h_pos + i * N, N), scratch);
    const acc_t ssn = block_sum(relu_row_part<scalar_t, acc_t, z_t>(zn, coln, a, e.b, e.h_neg + i * N, N), scratch);
    // g is rounded to the output dtype before it enters the loss, as in the CPU kernel
    const acc_t gp = static_cast<acc_t>(static_cast<scalar_t>(s * ssp));
    const acc_t gn = static_cast<acc_t>(static_cast<scalar_t>(s * ssn));
    const PairTerms<acc_t> t = pair_terms<acc_t>(gp, gn, e.loss.loss, e.loss.scalars, B);
    if (threadIdx.x == 0) {
      e.g_pos[i] = static_cast<scalar_t>(gp);
      e.g_neg[i] = static_cast<scalar_t>(gn);
      e.pair_loss[i] = static_cast<double>(t.loss);
      const acc_t cp = coef_from_dg<acc_t>(t.dg_pos, s), cn = coef_from_dg<acc_t>(t.dg_neg, s);
      coefs[2 * (i - first)] = cp;
      coefs[2 * (i - first) + 1] = cn;
      if (e.coef) {
        e.coef[i] = cp;
        e.coef[B + i] = cn;
      }
    }
  }
  __syncthreads();  // coefs
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc_t vj = e.peer_v ? e.peer_v[j] : acc_t(0);
    acc_t db = 0;
    for (int64_t i = first; i < last; ++i) {
      const acc_t cp = coefs[2 * (i - first)], cn = coefs[2 * (i - first) + 1];
      acc_t dzp = cp * static_cast<acc_t>(e.h_pos[i * N + j]);
      if (e.peer_v) dzp += vj;  // for every unit, also where h = 0
      const acc_t dzn = cn * static_cast<acc_t>(e.h_neg[i * N + j]);
      if (labeled) {  // the shared row sees both: dL/dz+ + dL/dz-, one rounding
        const scalar_t d = static_cast<scalar_t>(dzp + dzn);
        e.z[i * N + j] = static_cast<z_t>(d);
        db += static_cast<acc_t>(d);
      } else {
        const scalar_t dp = static_cast<scalar_t>(dzp), dn = static_cast<scalar_t>(dzn);
        e.z[i * N + j] = static_cast<z_t>(dp);
        e.z[(B + i) * N + j] = static_cast<z_t>(dn);
        db += static_cast<acc_t>(dp);
        db += static_cast<acc_t>(dn);
      }
    }
    if (e.db_part) e.db_part[static_cast<int64_t>(blockIdx.x) * N + j] = db;
  }
}

// grad_bias_j = the blocks' column sums of dL/dz added in block order (thread per unit; coalesced), in the dtype.
template <typename scalar_t>
__global__ void bias_grad_kernel(const at::opmath_type<scalar_t>* __restrict__ part, int64_t blocks, int64_t N,
                                 scalar_t* __restrict__ grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  acc_t s = 0;
  for (int64_t c = 0; c < blocks; ++c) s += part[c * N + j];
  grad_bias[j] = static_cast<scalar_t>(s);
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

// The pair epilogue (h, g, the loss terms, dL/dz over z, the bias gradient's block partials), the loss sum and the
// bias gradient: one step's kernels after the forward GEMM. `e` has every pointer but db_part set; returns
// grad_bias (undefined without a bias).
template <typename scalar_t, typename z_t = scalar_t>
at::Tensor launch_epilogue(EpilogueArgs<scalar_t, z_t> e, const double* peer_loss, scalar_t* loss,
                           const at::TensorOptions& opts, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  e.pairs = pairs_per_block(e.B);
  const int64_t blocks = (e.B + e.pairs - 1) / e.pairs;
  at::Tensor db_part, grad_bias;
  if (e.b) {
    db_part = at::empty({blocks, e.N}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    grad_bias = at::empty({e.N}, opts);
    e.db_part = db_part.data_ptr<acc_t>();
  }
  epilogue_kernel<scalar_t, z_t><<<static_cast<unsigned>(blocks), threads_for_row(e.N), 0, stream>>>(e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_pairs_kernel<scalar_t><<<1, kSumThreads, 0, stream>>>(e.pair_loss, e.B, peer_loss, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (e.b) {
    bias_grad_kernel<scalar_t><<<static_cast<unsigned>((e.N + kColThreads - 1) / kColThreads), kColThreads, 0,
                                 stream>>>(db_part.const_data_ptr<acc_t>(), blocks, e.N, grad_bias.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_bias;
}

}  // namespace cuda
}  // namespace ffk

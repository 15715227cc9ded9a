// Fused FF forward + exact local gradient on a CUDA GPU: the algorithm of ff_grad_cpu.cpp.
//
// One 2B-row problem (pos rows first, then neg rows), everything on the current stream, no host sync:
//   1. normalize_kernel   block per row: sum of squares by block reduction, d = row_divisor, xhat = x / d (2B, K)
//   2. GEMM               z = xhat W^T through cuBLAS (at::mm; fp32 accumulation)          (2B, N)
//   3. epilogue_kernel    block per run of pos/neg pairs: h = relu(z + b), g = s * sum h^2 (block reduction in the
//                         accumulation type), the pair's loss terms and c = dL/dg * 2s; writes h_pos/h_neg/g and
//                         overwrites z with c * h (= dL/dz); the pair's loss goes into a per-pair array; the
//                         block's column sums of dL/dz (the bias gradient's partials) into a (blocks, N) buffer
//   4. sum_pairs_kernel   loss = the per-pair array summed in a fixed order (one block, no atomics)
//   5. bias_grad_kernel   grad_b = the partials added in block order (thread per unit): no pass over dL/dz
//   6. GEMM               grad_W = (dL/dz)^T xhat                                          (N, K)
// With peer normalization (opt.peer_norm > 0; otherwise none of this is launched), between 2 and 3:
//   2a. peer_colsum_kernel  block per (256 units, 64 positive rows): the column sums of h+ = relu(z+ + b), as the
//                           epilogue will store it, over its rows, in a fixed row order -> (row chunks, N) partials
//   2b. peer_kernel         one block: m_j = the partials added in chunk order / B, r'_j (written: GradResult's
//                           peer_mean), rbar' (block reduction), v_j and L_peer (block reduction in double)
//   and the epilogue (3) adds v_j to dL/dz of every positive row (c_i h_ij + v_j, also where h = 0); the
//   loss (4) is the pair terms plus L_peer. The binding commits peer_mean <- r' on the device when the loss
//   is finite. No atomics: the column reductions have a fixed order too.
// The kernels are ff_rows.cuh's (shared with the labeled first layer, ff_grad_labeled_cuda.cu); the per-element
// and per-row math is ff_math.h's; results are bitwise reproducible run to run.
// Mixed precision (opt.gemm == BFloat16 or Float16, float weights; docs/design.md, "Mixed precision"), as
// ff_grad_cpu.cpp: grad_impl<scalar_t, z_t> with z_t = bf16/fp16: 1 writes xhat in z_t, W is cast to z_t once, both
// GEMMs in z_t (cuBLAS, fp32 accumulation, z_t outputs, as torch.autocast's mm); 2a and 3 read the z_t z and compute
// in fp32; 3 writes dL/dz in z_t over z for 6 and sums the fp32 dL/dz for the bias gradient (no fp32 copy of dL/dz).
// grad_weight is left in z_t (the fused update reads it; the ff_grad op widens it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "../ff_kernels.h"
#include "ff_rows.cuh"

namespace ffk {
namespace {

// The buffers of one step (allocated by the caller in the parameters' dtype).
struct GradBuffers {
  at::Tensor h_pos, h_neg, g_pos, g_neg, pair_loss, loss;
};

// The step for parameters of scalar_t with GEMM operands of z_t (scalar_t, or bf16/fp16 under autocast).
template <typename scalar_t, typename z_t>
void grad_impl(GradResult& res, const GradBuffers& buf, const at::Tensor& x_pos, const at::Tensor& x_neg,
               const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt,
               cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool low = !std::is_same_v<z_t, scalar_t>;
  const int64_t B = x_pos.size(0), K = x_pos.size(1), N = weight.size(0);
  const bool has_bias = bias.defined(), peer = opt.peer_norm > 0.0;
  const auto opts = x_pos.options();
  const auto gemm_dtype = c10::CppTypeToScalarType<z_t>::value;
  at::Tensor xhat = at::empty({2 * B, K}, opts.dtype(gemm_dtype));
  cuda::normalize_kernel<scalar_t, z_t><<<static_cast<unsigned>(2 * B), cuda::threads_for_row(K), 0, stream>>>(
      x_pos.const_data_ptr<scalar_t>(), x_neg.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>(), B, K, opt.norm,
      static_cast<acc_t>(opt.norm_eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor z = at::mm(xhat, (low ? weight.to(gemm_dtype) : weight).t());
  const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  c10::optional<cuda::PeerBuffers<acc_t>> pb;
  if (peer) {
    pb.emplace(peer_mean, B, N, opts);
    pb->template launch<scalar_t, z_t>(z, b, cuda::LabelRows<scalar_t, z_t>{}, B, N, opt, stream);
    res.peer_mean = pb->r_new;  // r' (not yet committed): the binding commits it
  }

  cuda::EpilogueArgs<scalar_t, z_t> e{};
  e.z = z.data_ptr<z_t>();
  e.b = b;
  e.h_pos = buf.h_pos.data_ptr<scalar_t>();
  e.h_neg = buf.h_neg.data_ptr<scalar_t>();
  e.g_pos = buf.g_pos.data_ptr<scalar_t>();
  e.g_neg = buf.g_neg.data_ptr<scalar_t>();
  e.pair_loss = buf.pair_loss.data_ptr<double>();
  e.peer_v = peer ? pb->v.template const_data_ptr<acc_t>() : nullptr;
  e.B = B;
  e.N = N;
  e.loss = cuda::LossArgs<acc_t>{goodness_scale<acc_t>(N, opt.goodness), opt.scalars<acc_t>(), opt.loss};
  res.grad_bias = cuda::launch_epilogue<scalar_t, z_t>(e, peer ? pb->loss.template const_data_ptr<double>() : nullptr,
                                                       buf.loss.data_ptr<scalar_t>(), opts, stream);
  // z now holds dL/dz
  res.grad_weight = at::mm(z.t(), xhat);
}

}  // namespace

GradResult ff_grad_cuda(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt) {
  const int64_t B = x_pos.size(0), N = weight.size(0);
  TORCH_CHECK(2 * B <= INT32_MAX, "ffkernels: batch too large for the CUDA kernels (2B = ", 2 * B,
              " rows, at most ", INT32_MAX, ")");
  const auto opts = x_pos.options();
  GradBuffers buf;
  buf.h_pos = at::empty({B, N}, opts);
  buf.h_neg = at::empty({B, N}, opts);
  buf.g_pos = at::empty({B}, opts);
  buf.g_neg = at::empty({B}, opts);
  buf.pair_loss = at::empty({B}, opts.dtype(at::kDouble));
  buf.loss = at::empty({}, opts);
  const bool peer = opt.peer_norm > 0.0;
  TORCH_CHECK(!peer || peer_mean.defined(), "ffkernels: peer_norm > 0 needs peer_mean");
  TORCH_CHECK(!peer || peer_mean.scalar_type() == (x_pos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "ffkernels: peer_mean must have the optimizer-state dtype (float32; float64 for float64 weights)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GradResult res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_pos.scalar_type(), "ff_grad_cuda", [&] {
    cuda::with_gemm_type<scalar_t>(opt.gemm, [&](auto tag) {
      using z_t = typename decltype(tag)::type;
      grad_impl<scalar_t, z_t>(res, buf, x_pos, x_neg, weight, bias, peer_mean, opt, stream);
    });
  });
  res.loss = buf.loss;
  std::tie(res.h_pos, res.h_neg, res.g_pos, res.g_neg) = std::tie(buf.h_pos, buf.h_neg, buf.g_pos, buf.g_neg);
  return res;
}

}  // namespace ffk

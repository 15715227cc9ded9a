// The first-layer FF step of supervised (label-in-the-input) training on a CUDA GPU: the algorithm of
// ff_grad_labeled_cpu.cpp (docs/design.md, "The labeled first layer").
//
// The positive and the negative of pair i are x_i with label y+_i or y-_i written one-hot (times `value`) into
// features [0, C). Their row divisor d_i is the same, so with x~_i = x_i / d_i with the label features zeroed and
// lv_i = value / d_i: z+_i = x~_i W^T + lv_i W[:, y+_i] + b, z-_i = x~_i W^T + lv_i W[:, y-_i] + b. B-row GEMMs:
//   1. normalize_labeled_kernel  block per row of x: d_i (row_divisor of value^2 + sum_{k>=C} x_k^2), x~ (B, K), lv
//   2. GEMM                      z = x~ W^T (B, N): the part pos and neg share
//   3. epilogue_kernel           (ff_rows.cuh, labeled) h+ and h- from z_i plus their label columns, g, the loss
//                                terms, c; z_i <- dL/dz+_i + dL/dz-_i (the shared features see both); c per row;
//                                the bias gradient's block partials
//   4. sum_pairs_kernel, bias_grad_kernel (as the plain step)
//   5. GEMM                      grad_W = (dL/dz+ + dL/dz-)^T x~ (N, K): zero in the label columns
//   6. label columns             grad_W[:, c] = sum_{i: y+_i = c} lv_i c+_i h+_i + sum_{i: y-_i = c} lv_i c-_i h-_i
//                                (+ v sum_{i: y+_i = c} lv_i with peer normalization): two skinny GEMMs
//                                h+^T A+ + h-^T A- with A (B, C) = lv_i c_i at column y_i (a scatter, one element per
//                                row: no atomics), in the accumulation type, copied into grad_W[:, :C]
// Peer normalization (opt.peer_norm > 0) as in the plain step, on h+ with its label columns. Everything on the
// current stream, no host sync (the binding checks the labels' range before).
// Mixed precision (opt.gemm == BFloat16 or Float16, float weights), as ff_grad_labeled_cpu.cpp: labeled_impl<scalar_t,
// z_t> with x~ and lv rounded to z_t (as the explicit pair's x_hat), W cast to z_t once for both GEMMs (z_t outputs)
// and the label term (wl: W's z_t copy), the epilogue in fp32 writing dL/dz+ + dL/dz- in z_t (one rounding) and
// summing the fp32 values for the bias gradient; the label columns (6) in fp32 from the fp32 h, stored into the z_t
// grad_weight with the rest of it (the ff_grad_labeled op widens it).
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

// (B, C) in the accumulation type: coef_i at column label_i of row i, zero elsewhere.
at::Tensor one_hot_rows(const at::Tensor& labels, const at::Tensor& coef, int64_t C) {
  const int64_t B = labels.size(0);
  return at::zeros({B, C}, coef.options()).scatter_(1, labels.view({B, 1}), coef.view({B, 1}));
}

// The buffers of one step (allocated by the caller: the parameters' dtype, acc for lv and coef).
struct LabeledBuffers {
  at::Tensor lv, coef, h_pos, h_neg, g_pos, g_neg, pair_loss, loss;
};

// The step for parameters of scalar_t with GEMM operands of z_t (scalar_t, or bf16/fp16 under autocast).
template <typename scalar_t, typename z_t>
void labeled_impl(GradResult& res, const LabeledBuffers& buf, const at::Tensor& x, const at::Tensor& label_pos,
                  const at::Tensor& label_neg, int64_t C, double value, const at::Tensor& weight,
                  const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool low = !std::is_same_v<z_t, scalar_t>;
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.defined(), peer = opt.peer_norm > 0.0;
  const auto opts = x.options();
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto gemm_dtype = c10::CppTypeToScalarType<z_t>::value;
  at::Tensor xhat = at::empty({B, K}, opts.dtype(gemm_dtype));
  cuda::normalize_labeled_kernel<scalar_t, z_t><<<static_cast<unsigned>(B), cuda::threads_for_row(K), 0, stream>>>(
      x.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>(), buf.lv.data_ptr<acc_t>(), K, C, static_cast<acc_t>(value),
      opt.norm, static_cast<acc_t>(opt.norm_eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor w_gemm = low ? weight.to(gemm_dtype) : weight;
  at::Tensor z = at::mm(xhat, w_gemm.t());                       // the shared part, B rows
  at::Tensor w_label = w_gemm.narrow(1, 0, C).t().contiguous();  // (C, N): label column c of W as a row
  cuda::LabelRows<scalar_t, z_t> label;
  label.wl = w_label.const_data_ptr<z_t>();
  label.y_pos = label_pos.const_data_ptr<int64_t>();
  label.y_neg = label_neg.const_data_ptr<int64_t>();
  label.lv = buf.lv.const_data_ptr<acc_t>();
  const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  c10::optional<cuda::PeerBuffers<acc_t>> pb;
  if (peer) {
    pb.emplace(peer_mean, B, N, opts);
    pb->template launch<scalar_t, z_t>(z, b, label, B, N, opt, stream);
    res.peer_mean = pb->r_new;  // r' (not yet committed): the binding commits it
  }

  cuda::EpilogueArgs<scalar_t, z_t> e{};
  e.z = z.data_ptr<z_t>();
  e.b = b;
  e.label = label;
  e.h_pos = buf.h_pos.data_ptr<scalar_t>();
  e.h_neg = buf.h_neg.data_ptr<scalar_t>();
  e.g_pos = buf.g_pos.data_ptr<scalar_t>();
  e.g_neg = buf.g_neg.data_ptr<scalar_t>();
  e.pair_loss = buf.pair_loss.data_ptr<double>();
  e.coef = buf.coef.data_ptr<acc_t>();
  e.peer_v = peer ? pb->v.template const_data_ptr<acc_t>() : nullptr;
  e.B = B;
  e.N = N;
  e.loss = cuda::LossArgs<acc_t>{goodness_scale<acc_t>(N, opt.goodness), opt.scalars<acc_t>(), opt.loss};
  res.grad_bias = cuda::launch_epilogue<scalar_t, z_t>(e, peer ? pb->loss.template const_data_ptr<double>() : nullptr,
                                                       buf.loss.data_ptr<scalar_t>(), opts, stream);
  // z now holds dL/dz+ + dL/dz-; zero in the label columns, which x~ zeroes
  res.grad_weight = at::mm(z.t(), xhat);

  // the label columns, in the accumulation type: h^T A with A = lv_i c_i one-hot at y_i, per side
  const at::Tensor& lv = buf.lv;
  const at::Tensor a_pos = one_hot_rows(label_pos, lv * buf.coef.narrow(0, 0, B), C);
  const at::Tensor a_neg = one_hot_rows(label_neg, lv * buf.coef.narrow(0, B, B), C);
  at::Tensor grad_label =
      at::addmm(at::mm(buf.h_pos.to(acc_dtype).t(), a_pos), buf.h_neg.to(acc_dtype).t(), a_neg);
  if (peer) grad_label.add_(at::outer(pb->v, one_hot_rows(label_pos, lv, C).sum(0)));  // v sum_{y+_i = c} lv_i
  res.grad_weight.narrow(1, 0, C).copy_(grad_label);
}

}  // namespace

GradResult ff_grad_labeled_cuda(const at::Tensor& x, const at::Tensor& label_pos, const at::Tensor& label_neg,
                                int64_t C, double value, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& peer_mean, const LossOptions& opt) {
  const int64_t B = x.size(0), N = weight.size(0);
  TORCH_CHECK(2 * B <= INT32_MAX, "ffkernels: batch too large for the CUDA kernels (2B = ", 2 * B,
              " rows, at most ", INT32_MAX, ")");
  const auto opts = x.options();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  LabeledBuffers buf;
  buf.lv = at::empty({B}, opts.dtype(acc_dtype));
  buf.coef = at::empty({2 * B}, opts.dtype(acc_dtype));
  buf.h_pos = at::empty({B, N}, opts);
  buf.h_neg = at::empty({B, N}, opts);
  buf.g_pos = at::empty({B}, opts);
  buf.g_neg = at::empty({B}, opts);
  buf.pair_loss = at::empty({B}, opts.dtype(at::kDouble));
  buf.loss = at::empty({}, opts);
  const bool peer = opt.peer_norm > 0.0;
  TORCH_CHECK(!peer || peer_mean.defined(), "ffkernels: peer_norm > 0 needs peer_mean");
  TORCH_CHECK(!peer || peer_mean.scalar_type() == acc_dtype,
              "ffkernels: peer_mean must have the optimizer-state dtype (float32; float64 for float64 weights)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GradResult res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ff_grad_labeled_cuda", [&] {
    cuda::with_gemm_type<scalar_t>(opt.gemm, [&](auto tag) {
      using z_t = typename decltype(tag)::type;
      labeled_impl<scalar_t, z_t>(res, buf, x, label_pos, label_neg, C, value, weight, bias, peer_mean, opt, stream);
    });
  });
  res.loss = buf.loss;
  std::tie(res.h_pos, res.h_neg, res.g_pos, res.g_neg) = std::tie(buf.h_pos, buf.h_neg, buf.g_pos, buf.g_neg);
  return res;
}

}  // namespace ffk

// Fused convolutional FF forward + exact local gradient on a CUDA GPU: the algorithm of ff_conv_cpu.cpp
// (docs/design.md, "Convolutional FF", "Numerics"; docs/cuda.md, "The conv step").
//
// R images: pos then neg (R = 2B, hinton, symba and scff), or pos only (R = B, competitive). Everything on the current
// stream, no host sync; no float atomics: every reduction has an order fixed by the launch shape.
//   1. normalize_kernel       (ff_rows.cuh) block per image: sum of squares over C_in*H*W by block reduction in acc,
//                             d = row_divisor, xhat = x / d for pos||neg into one (R, C_in, H, W) buffer (competitive
//                             with norm "none": x itself)
//   2. convolution            z = conv2d(xhat, W) (R, C_out, H_out, W_out) through ATen (cuDNN), without the bias
//   3. goodness               h = relu(z + b_c) in acc, stored in the dtype, and each goodness value's sum of h^p (of
//                             h as stored, in acc), rounded to the dtype:
//                             goodness_segment_kernel  block per (image, goodness value) where the value sums one
//                                                      contiguous run of z: the whole image ("sample") or one class's
//                                                      C_out/G channels ("group"); block reduction
//                             goodness_location_kernel thread per (image, location) ("location"): the C_out channels
//                                                      at that pixel, summed in channel order (coalesced over pixels)
//   4. loss terms, dL/dg      pair_loss_kernel         thread per (pair, goodness value): ffk::pair_terms (hinton,
//                                                      symba, scff), the term in double, c = dL/dg * s * (2 or 1)
//                             competitive_loss_kernel  thread per image: cross-entropy of g / temperature over the
//                                                      class groups, log-sum-exp and softmax in double
//   5. sum_pairs_kernel       (ff_rows.cuh) one block: the loss = the terms summed in double in a fixed order
//   6. dz_kernel              warp per (image, channel): dL/dz = c * (2h or 1) * 1[h > 0] rounded to the dtype,
//                             written over z, and the warp's sum of the stored dL/dz (the bias gradient's partial)
//   7. bias_grad_kernel       (ff_rows.cuh) thread per channel: grad_b = the partials added in image order
//   8. convolution backward   grad_W = the weight gradient (at::convolution_backward, weight only) of dL/dz and xhat
// The update (ff_update_cuda.cu) runs after, from the binding, and reads the loss in device memory.
// cuDNN's convolutions follow torch's settings, as nn.Conv2d's do: TF32 for float32 unless
// torch.backends.cudnn.allow_tf32 is off, and a deterministic weight gradient when torch.backends.cudnn.deterministic
// (or torch.use_deterministic_algorithms) asks for one; everything else here is bitwise reproducible as it is.
// Mixed precision (opt.gemm == BFloat16 or Float16, float weights; docs/design.md, "Mixed precision"), as
// ff_conv_cpu.cpp: conv_grad_impl<scalar_t, z_t> with z_t = bf16/fp16: 1 writes xhat in z_t (also x itself, for the
// competitive loss with norm "none"), W is cast to z_t once, both convolutions in z_t (cuDNN, fp32 accumulation, z_t
// outputs, as torch.autocast's conv2d); 3 reads the z_t z and computes in fp32; 6 rounds dL/dz to fp32, then to z_t
// over z for 8, and sums the fp32 values for the bias gradient. grad_weight stays z_t (the fused update reads it; the
// ff_conv_grad op widens it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../ff_kernels.h"
#include "ff_rows.cuh"

namespace ffk {
namespace cuda {
namespace {

constexpr int kConvThreads = 256;
constexpr int kWarpsPerBlock = kConvThreads / kWarpSize;

// How the R images' outputs (C channels x P locations each, M = C * P, at most INT32_MAX / 2: in-image indices are
// 32-bit) map to goodness values. Images r < B are the positives, r >= B the negatives (the layout of their h and g).
struct ConvLayout {
  GoodnessOver over;
  int64_t B, R;         // positive images, all images
  int32_t C, P, M;      // channels, locations (H_out * W_out), C * P
  int32_t ng;           // goodness values per image: 1, P, or the number of class groups
  int32_t per_group;    // channels per class group (Group only, else 1)

  // the goodness index of output (c, p) of an image
  __device__ __forceinline__ int32_t index(int32_t c, int32_t p) const {
    return over == GoodnessOver::Sample ? 0 : over == GoodnessOver::Location ? p : c / per_group;
  }
};

// The outputs of the goodness kernels.
template <typename scalar_t>
struct GoodnessOut {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t *h_pos, *h_neg;  // (B, C, P) each; h_neg null for the competitive loss
  scalar_t *g_pos, *g_neg;  // (B, ng) each; g_neg null for the competitive loss
  acc_t* g;                 // (R, ng): g as rounded to the dtype, in acc (what the loss terms read)
  acc_t scale;              // s: 1 ("sum") or 1 / (the number of h values one goodness sums over) ("mean")

  __device__ __forceinline__ scalar_t* h_of(const ConvLayout& lay, int64_t r) const {
    return r < lay.B ? h_pos + r * lay.M : h_neg + (r - lay.B) * lay.M;
  }
  // stores goodness value j of image r from its sum of h^p (rounded to the dtype before the loss reads it, as the CPU)
  __device__ __forceinline__ void store(const ConvLayout& lay, int64_t r, int32_t j, acc_t sum) const {
    const scalar_t gv = static_cast<scalar_t>(scale * sum);
    (r < lay.B ? g_pos + r * lay.ng : g_neg + (r - lay.B) * lay.ng)[j] = gv;
    g[r * lay.ng + j] = static_cast<acc_t>(gv);
  }
};

template <bool square, typename acc_t>
__device__ __forceinline__ acc_t goodness_term(acc_t h) {
  return square ? h * h : h;
}

// h = relu(z + b_c) in acc, as stored (b_c = 0 without bias: adding +0 changes no h, relu(+-0) = 0, NaN stays NaN);
// z in the GEMM dtype z_t, read exactly into acc
template <typename scalar_t, typename acc_t, typename z_t = scalar_t>
__device__ __forceinline__ scalar_t relu_biased(z_t z, const scalar_t* __restrict__ bias, int32_t c) {
  return static_cast<scalar_t>(relu(static_cast<acc_t>(z) + (bias ? static_cast<acc_t>(bias[c]) : acc_t(0))));
}

// Block per (image r, goodness value j), blockIdx.x = r * ng + j, where value j sums the contiguous run
// [j * L, (j + 1) * L) of the image's C * P outputs (L = M / ng): "sample" (ng = 1) and "group" (ng = G).
template <typename scalar_t, typename z_t, bool square>
__global__ void goodness_segment_kernel(const z_t* __restrict__ z, const scalar_t* __restrict__ bias,
                                        ConvLayout lay, GoodnessOut<scalar_t> out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize];
  const int64_t r = static_cast<int64_t>(blockIdx.x) / lay.ng;
  const int32_t j = static_cast<int32_t>(static_cast<int64_t>(blockIdx.x) % lay.ng);
  const int32_t L = lay.M / lay.ng, first = j * L;
  const z_t* zi = z + r * lay.M;
  scalar_t* hi = out.h_of(lay, r);
  acc_t sum = 0;
  for (int32_t e = first + static_cast<int32_t>(threadIdx.x); e < first + L; e += blockDim.x) {
    const scalar_t hv = relu_biased<scalar_t, acc_t, z_t>(zi[e], bias, e / lay.P);
    hi[e] = hv;
    sum += goodness_term<square>(static_cast<acc_t>(hv));
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) out.store(lay, r, j, sum);
}

// Thread per (image r, location p), over R * P threads: goodness value p of image r sums the C channels at p, in
// channel order (consecutive threads read consecutive locations: coalesced).
template <typename scalar_t, typename z_t, bool square>
__global__ void goodness_location_kernel(const z_t* __restrict__ z, const scalar_t* __restrict__ bias,
                                         ConvLayout lay, GoodnessOut<scalar_t> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= lay.R * lay.P) return;
  const int64_t r = t / lay.P;
  const int32_t p = static_cast<int32_t>(t % lay.P);
  const z_t* zi = z + r * lay.M;
  scalar_t* hi = out.h_of(lay, r);
  acc_t sum = 0;
  for (int32_t c = 0; c < lay.C; ++c) {
    const int32_t e = c * lay.P + p;
    const scalar_t hv = relu_biased<scalar_t, acc_t, z_t>(zi[e], bias, c);
    hi[e] = hv;
    sum += goodness_term<square>(static_cast<acc_t>(hv));
  }
  out.store(lay, r, p, sum);
}

// Thread per (pair i, goodness value j), over B * ng threads (hinton, symba, scff): goodness value j of positive image
// i is paired with value j of negative image i; the loss is over all B * ng pairs (ffk::pair_terms). term: (B * ng) the
// pairs' loss terms in double; coef: (R, ng) c = dL/dg * s * (2 or 1) of every goodness value.
template <typename acc_t>
__global__ void pair_loss_kernel(const acc_t* __restrict__ g, int64_t B, int32_t ng, LossArgs<acc_t> args,
                                 acc_t coef_scale, double* __restrict__ term, acc_t* __restrict__ coef) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pairs = B * ng;
  if (t >= pairs) return;
  const PairTerms<acc_t> pt = pair_terms<acc_t>(g[t], g[pairs + t], args.loss, args.scalars, pairs);
  term[t] = static_cast<double>(pt.loss);
  coef[t] = coef_scale * pt.dg_pos;
  coef[pairs + t] = coef_scale * pt.dg_neg;
}

// Thread per image i, over B threads (competitive): the cross-entropy of g_i / temperature with the target class, its
// share (1/B) of the loss in double; coef (B, G): c = (softmax - onehot) / (temperature B) * s * (2 or 1). Labels are
// in [0, G) (the binding clamps them on the device and poisons the loss when one was not).
template <typename acc_t>
__global__ void competitive_loss_kernel(const acc_t* __restrict__ g, const int64_t* __restrict__ target, int64_t B,
                                        int32_t G, double temperature, acc_t coef_scale, double* __restrict__ term,
                                        acc_t* __restrict__ coef) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const acc_t* gi = g + i * G;
  double m = -INFINITY;
  for (int32_t j = 0; j < G; ++j) {
    const double v = static_cast<double>(gi[j]) / temperature;
    m = m < v ? v : m;  // std::max's rule, as the CPU kernel (a NaN reaches the loss through the sum below)
  }
  double se = 0.0;
  for (int32_t j = 0; j < G; ++j) se += exp(static_cast<double>(gi[j]) / temperature - m);
  const double lse = m + log(se);
  const int64_t y = target[i];
  const double b = static_cast<double>(B);
  term[i] = (lse - static_cast<double>(gi[y]) / temperature) / b;
  for (int32_t j = 0; j < G; ++j) {
    const double softmax = exp(static_cast<double>(gi[j]) / temperature - lse);
    const double dg = (softmax - (j == y ? 1.0 : 0.0)) / (temperature * b);
    coef[i * G + j] = coef_scale * static_cast<acc_t>(dg);
  }
}

// Warp per (image r, channel c), over R * C warps: dL/dz_p = c_{index(c, p)} * (2h_p if square, else 1) * 1[h_p > 0]
// (the square's h already gives 0 where h <= 0; NaN passes, as in torch), rounded to the dtype and written over z
// (rounded once more to the GEMM dtype z_t under autocast); db_part[r * C + c] = the warp's sum (lane-strided, then the
// shuffle tree: a fixed order) of the dtype values.
template <typename scalar_t, typename z_t, bool square>
__global__ void dz_kernel(z_t* __restrict__ z, const scalar_t* __restrict__ h_pos,
                          const scalar_t* __restrict__ h_neg, const at::opmath_type<scalar_t>* __restrict__ coef,
                          ConvLayout lay, at::opmath_type<scalar_t>* __restrict__ db_part) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (w >= lay.R * lay.C) return;  // the whole warp: w is the same for its 32 lanes
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = w / lay.C;
  const int32_t c = static_cast<int32_t>(w % lay.C);
  const scalar_t* h = (r < lay.B ? h_pos + r * lay.M : h_neg + (r - lay.B) * lay.M) + c * lay.P;
  z_t* dz = z + w * lay.P;
  const acc_t* k = coef + r * lay.ng;
  acc_t s = 0;
  for (int32_t p = lane; p < lay.P; p += kWarpSize) {
    const acc_t kp = k[lay.index(c, p)];
    const scalar_t hv = h[p];
    const acc_t ha = static_cast<acc_t>(hv);
    const scalar_t v = static_cast<scalar_t>(square ? kp * ha : (ha <= acc_t(0) ? acc_t(0) : kp));
    dz[p] = static_cast<z_t>(v);
    s += static_cast<acc_t>(v);
  }
  s = warp_sum(s);
  if (db_part != nullptr && lane == 0) db_part[w] = s;
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "ffkernels: the conv step is too large for the CUDA kernels' grid (", work,
              " work items)");
  return static_cast<unsigned>(blocks);
}

// 3, 4 and 6: h and g, the loss terms and coef, dL/dz over z with the bias gradient's partials (db_part: (R, C), or
// undefined without bias).
template <typename scalar_t, typename z_t, bool square>
void launch_conv_epilogue(const at::Tensor& z, const scalar_t* bias, const at::Tensor& target, const ConvLayout& lay,
                          GoodnessOut<scalar_t> out, const at::Tensor& coef, const at::Tensor& term,
                          const at::Tensor& db_part, const LossOptions& opt, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  z_t* zp = z.data_ptr<z_t>();
  if (lay.over == GoodnessOver::Location) {
    goodness_location_kernel<scalar_t, z_t, square>
        <<<blocks_for(lay.R * lay.P, kConvThreads), kConvThreads, 0, stream>>>(zp, bias, lay, out);
  } else {
    goodness_segment_kernel<scalar_t, z_t, square>
        <<<blocks_for(lay.R * lay.ng, 1), threads_for_row(lay.M / lay.ng), 0, stream>>>(zp, bias, lay, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const acc_t coef_scale = square ? acc_t(2) * out.scale : out.scale;
  if (opt.loss == Loss::Competitive) {
    competitive_loss_kernel<acc_t><<<blocks_for(lay.B, kConvThreads), kConvThreads, 0, stream>>>(
        out.g, target.const_data_ptr<int64_t>(), lay.B, lay.ng, opt.temperature, coef_scale,
        term.data_ptr<double>(), coef.data_ptr<acc_t>());
  } else {
    const LossArgs<acc_t> args{out.scale, opt.scalars<acc_t>(), opt.loss};
    pair_loss_kernel<acc_t><<<blocks_for(lay.B * lay.ng, kConvThreads), kConvThreads, 0, stream>>>(
        out.g, lay.B, lay.ng, args, coef_scale, term.data_ptr<double>(), coef.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dz_kernel<scalar_t, z_t, square><<<blocks_for(lay.R * lay.C, kWarpsPerBlock), kConvThreads, 0, stream>>>(
      zp, out.h_pos, out.h_neg, coef.const_data_ptr<acc_t>(), lay,
      db_part.defined() ? db_part.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

namespace {

// The step for parameters of scalar_t with convolution operands of z_t (scalar_t, or bf16/fp16 under autocast).
template <typename scalar_t, typename z_t>
void conv_grad_impl(GradResult& res, const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& target,
                    const at::Tensor& weight, const at::Tensor& bias, const ConvGeom& geom, int64_t num_classes,
                    const LossOptions& opt, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_neg = x_neg.defined(), has_bias = bias.defined();
  const int64_t B = x_pos.size(0), R = has_neg ? 2 * B : B, K = x_pos.numel() / B, C = weight.size(0);
  const auto opts = x_pos.options();
  constexpr bool low = !std::is_same_v<z_t, scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto conv_dtype = c10::CppTypeToScalarType<z_t>::value;
  // 1. xhat for pos||neg in one buffer (the competitive loss with norm "none" convolves x itself, in z_t)
  at::Tensor xhat;
  if (!low && !has_neg && opt.norm == Norm::None) {
    xhat = x_pos;
  } else {
    xhat = at::empty({R, x_pos.size(1), x_pos.size(2), x_pos.size(3)}, opts.dtype(conv_dtype));
    const scalar_t* xp = x_pos.const_data_ptr<scalar_t>();
    cuda::normalize_kernel<scalar_t, z_t><<<static_cast<unsigned>(R), cuda::threads_for_row(K), 0, stream>>>(
        xp, has_neg ? x_neg.const_data_ptr<scalar_t>() : xp, xhat.data_ptr<z_t>(), B, K, opt.norm,
        static_cast<acc_t>(opt.norm_eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // 2. z without the bias (W cast to z_t once: both convolutions read the copy)
  const at::Tensor w = low ? weight.to(conv_dtype) : weight;
  const at::Tensor z = at::convolution(xhat, w, c10::nullopt, geom.stride, geom.padding, geom.dilation,
                                       /*transposed=*/false, /*output_padding=*/{0, 0}, geom.groups)
                           .contiguous();
  const int64_t Ho = z.size(2), Wo = z.size(3), P = Ho * Wo;
  // in-image indices are 32-bit (a lane-strided loop stays below INT32_MAX)
  TORCH_CHECK(C * P <= INT32_MAX / 2, "ffkernels: outputs too large for the CUDA conv kernels (", C * P,
              " values per image, at most ", INT32_MAX / 2, ")");
  cuda::ConvLayout lay;
  lay.over = opt.goodness_over;
  lay.B = B;
  lay.R = R;
  lay.C = static_cast<int32_t>(C);
  lay.P = static_cast<int32_t>(P);
  lay.M = static_cast<int32_t>(C * P);
  lay.per_group = lay.over == GoodnessOver::Group ? static_cast<int32_t>(C / num_classes) : 1;
  lay.ng = lay.over == GoodnessOver::Sample ? 1
           : lay.over == GoodnessOver::Location ? lay.P
                                                : static_cast<int32_t>(num_classes);
  const int64_t summed = lay.over == GoodnessOver::Sample ? C * P
                         : lay.over == GoodnessOver::Location ? C
                                                              : static_cast<int64_t>(lay.per_group) * P;
  std::vector<int64_t> g_shape = {B};
  if (lay.over == GoodnessOver::Location) g_shape = {B, Ho, Wo};
  if (lay.over == GoodnessOver::Group) g_shape = {B, num_classes};
  res.h_pos = at::empty({B, C, Ho, Wo}, opts);
  res.g_pos = at::empty(g_shape, opts);
  res.h_neg = has_neg ? at::empty({B, C, Ho, Wo}, opts) : at::empty({0}, opts);
  res.g_neg = has_neg ? at::empty(g_shape, opts) : at::empty({0}, opts);
  const at::Tensor g = at::empty({R, lay.ng}, opts.dtype(acc_dtype));
  const at::Tensor coef = at::empty({R, lay.ng}, opts.dtype(acc_dtype));
  const at::Tensor term = at::empty({B * (has_neg ? lay.ng : 1)}, opts.dtype(at::kDouble));
  const at::Tensor db_part = has_bias ? at::empty({R, C}, opts.dtype(acc_dtype)) : at::Tensor();
  res.loss = at::empty({}, opts);

  cuda::GoodnessOut<scalar_t> out;
  out.h_pos = res.h_pos.data_ptr<scalar_t>();
  out.h_neg = has_neg ? res.h_neg.data_ptr<scalar_t>() : nullptr;
  out.g_pos = res.g_pos.data_ptr<scalar_t>();
  out.g_neg = has_neg ? res.g_neg.data_ptr<scalar_t>() : nullptr;
  out.g = g.data_ptr<acc_t>();
  out.scale = goodness_scale<acc_t>(summed, opt.goodness);
  const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  // 3, 4, 6: h and g, the loss terms and dL/dg, dL/dz over z with the bias gradient's partials
  if (opt.goodness_power == 2) {
    cuda::launch_conv_epilogue<scalar_t, z_t, true>(z, b, target, lay, out, coef, term, db_part, opt, stream);
  } else {
    cuda::launch_conv_epilogue<scalar_t, z_t, false>(z, b, target, lay, out, coef, term, db_part, opt, stream);
  }
  // 5. the loss
  cuda::sum_pairs_kernel<scalar_t><<<1, cuda::kSumThreads, 0, stream>>>(
      term.const_data_ptr<double>(), term.numel(), nullptr, res.loss.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 7. grad_b: the images' channel partials added in image order
  if (has_bias) {
    res.grad_bias = at::empty({C}, opts);
    cuda::bias_grad_kernel<scalar_t><<<static_cast<unsigned>((C + cuda::kColThreads - 1) / cuda::kColThreads),
                                       cuda::kColThreads, 0, stream>>>(db_part.const_data_ptr<acc_t>(), R, C,
                                                                       res.grad_bias.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // 8. z now holds dL/dz
  res.grad_weight = std::get<1>(at::convolution_backward(z, xhat, w, c10::nullopt, geom.stride, geom.padding,
                                                         geom.dilation, /*transposed=*/false,
                                                         /*output_padding=*/{0, 0}, geom.groups,
                                                         {false, true, false}))
                        .contiguous();
}

}  // namespace

GradResult ff_conv_grad_cuda(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& target,
                             const at::Tensor& weight, const at::Tensor& bias, const ConvGeom& geom,
                             int64_t num_classes, const LossOptions& opt) {
  const bool has_neg = x_neg.defined();
  const int64_t B = x_pos.size(0), R = has_neg ? 2 * B : B, K = x_pos.numel() / B;
  TORCH_CHECK(R <= INT32_MAX, "ffkernels: batch too large for the CUDA kernels (", R, " images, at most ", INT32_MAX,
              ")");
  TORCH_CHECK(K <= INT32_MAX, "ffkernels: images too large for the CUDA conv kernels (", K, " values each)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GradResult res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_pos.scalar_type(), "ff_conv_grad_cuda", [&] {
    cuda::with_gemm_type<scalar_t>(opt.gemm, [&](auto tag) {
      using z_t = typename decltype(tag)::type;
      conv_grad_impl<scalar_t, z_t>(res, x_pos, x_neg, target, weight, bias, geom, num_classes, opt, stream);
    });
  });
  return res;
}

}  // namespace ffk

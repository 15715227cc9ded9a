// Fused convolutional FF forward + exact local gradient on the CPU (docs/design.md, "The ops", "Numerics").
//
// R images: pos then neg (R = 2B, hinton, symba and scff), or pos only (R = B, competitive):
//   1. normalize: xhat = x / d_i per image (over C_in*H*W, ff_math.h row_divisor), pos||neg written once into one
//                 (R, C_in, H, W) buffer, so one convolution serves each direction
//   2. conv:      z = conv2d(xhat, W) (R, C_out, H_out, W_out) through ATen (oneDNN), without the bias
//   3. epilogue:  one parallel pass over the images (pos image i with neg image i): h = relu(z + b) in acc, the
//                 goodness per image / location / class group (sums in double, of h as stored), the loss terms and
//                 the per-goodness coefficient dL/dg; overwrites z with dL/dz and keeps each image's channel sums
//                 of dL/dz (double) for the bias gradient
//   4. conv:      grad_W = the weight gradient of the convolution (at::convolution_backward, weight only) of dL/dz
//                 and xhat
//   5. grad_b:    the images' channel sums added in image order, rounded once
// The loss is per-image terms summed in double in image order: nothing depends on the thread count but ATen's
// convolutions. Mixed precision (opt.gemm == BFloat16, float weights; "Mixed precision"): xhat in bf16, W cast to bf16
// once, both convolutions in bf16 (fp32 accumulation, bf16 outputs, as autocast's conv2d); the epilogue widens z and
// computes in fp32, rounds dL/dz to bf16 for step 4 and sums the fp32 dL/dz for grad_b. grad_weight stays bf16 (the
// update reads it; the ff_conv_grad op widens it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ff_cpu_rows.h"
#include "ff_kernels.h"

namespace ffk {
namespace {

// How the goodness values of one image are laid out over its C*P outputs (P = H_out*W_out locations).
struct GoodnessLayout {
  GoodnessOver over;
  int64_t C, P;
  int64_t per_group;  // channels per class group (Group only)

  // goodness values per image: 1, P, or the number of class groups
  int64_t count_per_image() const {
    return over == GoodnessOver::Sample ? 1 : over == GoodnessOver::Location ? P : C / per_group;
  }
  // the number of h values one goodness sums over (the "mean" divisor)
  int64_t summed() const {
    return over == GoodnessOver::Sample ? C * P : over == GoodnessOver::Location ? C : per_group * P;
  }
  // the goodness index of output (c, p)
  int64_t index(int64_t c, int64_t p) const {
    return over == GoodnessOver::Sample ? 0 : over == GoodnessOver::Location ? p : c / per_group;
  }
};

// ---- one channel of one image (P outputs): the loops the compiler can vectorize -----------------------------------
// Double sums keep four partial sums (element p goes to p % 4, combined as (s0 + s1) + (s2 + s3)): a fixed order, so
// nothing depends on the thread count, without the latency of one serial chain.

template <bool square, typename scalar_t>
inline double goodness_term(scalar_t h) {
  return square ? static_cast<double>(h) * static_cast<double>(h) : static_cast<double>(h);
}

// h = relu(z + b_c) (b_c = 0 without bias: adding +0 changes no h, relu(-0) = relu(+0) = 0 and NaN stays NaN)
template <typename scalar_t, typename z_t, typename acc_t>
inline void relu_channel(const z_t* z, acc_t bc, scalar_t* h, int64_t P) {
  for (int64_t p = 0; p < P; ++p) h[p] = static_cast<scalar_t>(relu(static_cast<acc_t>(z[p]) + bc));
}

// sum_p h_p^power
template <bool square, typename scalar_t>
inline double channel_goodness(const scalar_t* h, int64_t P) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) {
    s0 += goodness_term<square>(h[p]);
    s1 += goodness_term<square>(h[p + 1]);
    s2 += goodness_term<square>(h[p + 2]);
    s3 += goodness_term<square>(h[p + 3]);
  }
  for (; p < P; ++p) s0 += goodness_term<square>(h[p]);
  return (s0 + s1) + (s2 + s3);
}

// dL/dz_p = k_p * s * (2 h_p if square, else 1) * relu'(z_p), with coef_p = k_p * s * (2 or 1) given per location
// (per_location) or once for the channel; written to dz (the GEMM dtype) as rounded to scalar_t. Returns the sum of
// the scalar_t values (the channel's share of the bias gradient) when with_sum.
template <bool square, bool per_location, bool with_sum, typename scalar_t, typename z_t, typename acc_t>
inline double dz_channel(const scalar_t* h, const acc_t* coef, z_t* dz, int64_t P) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t p = 0; p < P; ++p) {
    const acc_t k = coef[per_location ? p : 0];
    const scalar_t hv = h[p];
    // relu'(z) = 0 where h <= 0 (h = 0 there, which the square's 2h already gives); NaN passes, as in torch
    const scalar_t v = static_cast<scalar_t>(square ? k * static_cast<acc_t>(hv) : (hv <= scalar_t(0) ? acc_t(0) : k));
    dz[p] = static_cast<z_t>(v);
    if constexpr (with_sum) s[p & 3] += static_cast<double>(v);
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <bool square, typename scalar_t, typename z_t, typename acc_t>
double dz_channel_any(const scalar_t* h, const acc_t* coef, bool per_location, bool with_sum, z_t* dz, int64_t P) {
  if (per_location) {
    return with_sum ? dz_channel<square, true, true>(h, coef, dz, P) : dz_channel<square, true, false>(h, coef, dz, P);
  }
  return with_sum ? dz_channel<square, false, true>(h, coef, dz, P) : dz_channel<square, false, false>(h, coef, dz, P);
}

template <typename scalar_t, typename z_t>
struct EpilogueArgs {
  z_t* z;                 // (R, C, P): z on entry, dL/dz on exit
  const scalar_t* bias;   // (C) or null
  scalar_t* h[2];         // pos, neg (B, C, P)
  scalar_t* g[2];         // pos, neg (B, ng)
  const int64_t* target;  // (B) competitive, else null
  double* image_loss;     // (B): the loss terms of image pair i
  double* db_part;        // (R, C): each image's channel sums of dL/dz, or null without bias
  int64_t B, sides;       // sides: 2 (pos and neg) or 1 (competitive)
};

template <bool square, typename scalar_t, typename z_t>
void epilogue(const EpilogueArgs<scalar_t, z_t>& a, const GoodnessLayout& lay, const LossOptions& opt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = lay.C, P = lay.P, M = C * P, ng = lay.count_per_image(), B = a.B;
  const bool per_location = lay.over == GoodnessOver::Location;
  const acc_t s = goodness_scale<acc_t>(lay.summed(), opt.goodness);
  // dL/dz = (dL/dg) * s * (2h if p = 2, else 1) * relu'(z)
  const acc_t coef_scale = square ? acc_t(2) * s : s;
  const bool competitive = opt.loss == Loss::Competitive;
  const LossScalars<acc_t> scalars = opt.scalars<acc_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1)), [&](int64_t lo, int64_t hi) {
    std::vector<double> sums(static_cast<size_t>(ng));
    std::vector<acc_t> g[2] = {std::vector<acc_t>(ng), std::vector<acc_t>(ng)};
    std::vector<acc_t> coef[2] = {std::vector<acc_t>(ng), std::vector<acc_t>(ng)};
    for (int64_t i = lo; i < hi; ++i) {
      // h and the goodness of each side's image
      for (int64_t side = 0; side < a.sides; ++side) {
        const z_t* zi = a.z + (side * B + i) * M;
        scalar_t* hi_ = a.h[side] + i * M;
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* hc = hi_ + c * P;
          relu_channel<scalar_t, z_t, acc_t>(zi + c * P, a.bias ? static_cast<acc_t>(a.bias[c]) : acc_t(0), hc, P);
          if (per_location) {
            for (int64_t p = 0; p < P; ++p) sums[p] += goodness_term<square>(hc[p]);
          } else {
            sums[lay.index(c, 0)] += channel_goodness<square>(hc, P);
          }
        }
        scalar_t* gi = a.g[side] + i * ng;
        for (int64_t j = 0; j < ng; ++j) {
          g[side][j] = row_goodness<scalar_t>(sums[j], s);
          gi[j] = static_cast<scalar_t>(g[side][j]);
        }
      }
      // the loss terms and dL/dg
      double loss = 0.0;
      if (competitive) {
        // cross-entropy of g / temperature with the target class, mean over the B images; log-sum-exp in double
        const double tau = opt.temperature;
        double m = -INFINITY;
        for (int64_t j = 0; j < ng; ++j) m = std::max(m, static_cast<double>(g[0][j]) / tau);
        double se = 0.0;
        for (int64_t j = 0; j < ng; ++j) se += std::exp(static_cast<double>(g[0][j]) / tau - m);
        const double lse = m + std::log(se);
        const int64_t y = a.target[i];
        loss = (lse - static_cast<double>(g[0][y]) / tau) / static_cast<double>(B);
        for (int64_t j = 0; j < ng; ++j) {
          const double softmax = std::exp(static_cast<double>(g[0][j]) / tau - lse);
          const double dg = (softmax - (j == y ? 1.0 : 0.0)) / (tau * static_cast<double>(B));
          coef[0][j] = coef_scale * static_cast<acc_t>(dg);
        }
      } else {
        // every goodness value of a positive image is paired with the same one of its negative image
        for (int64_t j = 0; j < ng; ++j) {
          const PairTerms<acc_t> t = pair_terms<acc_t>(g[0][j], g[1][j], opt.loss, scalars, B * ng);
          loss += static_cast<double>(t.loss);
          coef[0][j] = coef_scale * t.dg_pos;
          coef[1][j] = coef_scale * t.dg_neg;
        }
      }
      a.image_loss[i] = loss;
      // dL/dz over z, and the channel sums for the bias gradient
      for (int64_t side = 0; side < a.sides; ++side) {
        const int64_t r = side * B + i;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* k = coef[side].data() + (per_location ? 0 : lay.index(c, 0));
          const double db = dz_channel_any<square>(a.h[side] + i * M + c * P, k, per_location, a.db_part != nullptr,
                                                   a.z + r * M + c * P, P);
          if (a.db_part) a.db_part[r * C + c] = db;
        }
      }
    }
  });
}

// The kernel for parameters of scalar_t with convolution operands of z_t (scalar_t, or bf16 under autocast).
template <typename scalar_t, typename z_t>
void conv_grad_impl(GradResult& r, const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& target,
                    const at::Tensor& weight, const at::Tensor& bias, const ConvGeom& geom, int64_t num_classes,
                    const LossOptions& opt, std::vector<double>& image_loss) {
  constexpr bool low = !std::is_same_v<z_t, scalar_t>;
  const bool has_neg = x_neg.defined(), has_bias = bias.defined();
  const int64_t B = x_pos.size(0), R = has_neg ? 2 * B : B, K = x_pos.numel() / B, C = weight.size(0);
  const at::TensorOptions conv_options = x_pos.options().dtype(c10::CppTypeToScalarType<z_t>::value);
  at::Tensor xhat;
  if (!low && !has_neg && opt.norm == Norm::None) {
    xhat = x_pos;  // already x_hat, contiguous
  } else {
    xhat = at::empty({R, x_pos.size(1), x_pos.size(2), x_pos.size(3)}, conv_options);
    normalize_rows<scalar_t, z_t>(x_pos.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>(), B, K, opt.norm,
                                  opt.norm_eps);
    if (has_neg)
      normalize_rows<scalar_t, z_t>(x_neg.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>() + B * K, B, K, opt.norm,
                                    opt.norm_eps);
  }
  const at::Tensor w = low ? weight.to(conv_options.dtype()) : weight;
  const at::Tensor z = at::convolution(xhat, w, c10::nullopt, geom.stride, geom.padding, geom.dilation,
                                       /*transposed=*/false, /*output_padding=*/{0, 0}, geom.groups)
                           .contiguous();
  const int64_t Ho = z.size(2), Wo = z.size(3);
  GoodnessLayout lay{opt.goodness_over, C, Ho * Wo, opt.goodness_over == GoodnessOver::Group ? C / num_classes : 1};
  const at::TensorOptions out = x_pos.options();
  std::vector<int64_t> g_shape = {B};
  if (lay.over == GoodnessOver::Location) g_shape = {B, Ho, Wo};
  if (lay.over == GoodnessOver::Group) g_shape = {B, num_classes};
  r.h_pos = at::empty({B, C, Ho, Wo}, out);
  r.g_pos = at::empty(g_shape, out);
  r.h_neg = has_neg ? at::empty({B, C, Ho, Wo}, out) : at::empty({0}, out);
  r.g_neg = has_neg ? at::empty(g_shape, out) : at::empty({0}, out);
  std::vector<double> db_part(has_bias ? static_cast<size_t>(R * C) : 0);
  EpilogueArgs<scalar_t, z_t> a{z.data_ptr<z_t>(),
                                has_bias ? bias.const_data_ptr<scalar_t>() : nullptr,
                                {r.h_pos.data_ptr<scalar_t>(), has_neg ? r.h_neg.data_ptr<scalar_t>() : nullptr},
                                {r.g_pos.data_ptr<scalar_t>(), has_neg ? r.g_neg.data_ptr<scalar_t>() : nullptr},
                                target.defined() ? target.const_data_ptr<int64_t>() : nullptr,
                                image_loss.data(),
                                has_bias ? db_part.data() : nullptr,
                                B,
                                has_neg ? 2 : 1};
  if (opt.goodness_power == 2) {
    epilogue<true, scalar_t, z_t>(a, lay, opt);
  } else {
    epilogue<false, scalar_t, z_t>(a, lay, opt);
  }
  // z now holds dL/dz
  r.grad_weight = std::get<1>(at::convolution_backward(z, xhat, w, c10::nullopt, geom.stride, geom.padding,
                                                       geom.dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                                       geom.groups, {false, true, false}))
                      .contiguous();
  if (has_bias) {
    r.grad_bias = at::empty({C}, out);
    scalar_t* gb = r.grad_bias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0.0;
      for (int64_t i = 0; i < R; ++i) sum += db_part[i * C + c];
      gb[c] = static_cast<scalar_t>(sum);
    }
  }
}

}  // namespace

GradResult ff_conv_grad_cpu(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& target,
                            const at::Tensor& weight, const at::Tensor& bias, const ConvGeom& geom,
                            int64_t num_classes, const LossOptions& opt) {
  std::vector<double> image_loss(static_cast<size_t>(x_pos.size(0)));
  GradResult r;
  AT_DISPATCH_FLOATING_TYPES(x_pos.scalar_type(), "ff_conv_grad_cpu", [&] {
    if (opt.gemm == GemmDtype::Param) {
      conv_grad_impl<scalar_t, scalar_t>(r, x_pos, x_neg, target, weight, bias, geom, num_classes, opt, image_loss);
    } else if constexpr (std::is_same_v<scalar_t, float>) {  // the binding admits bf16 GEMMs for float weights only
      conv_grad_impl<scalar_t, c10::BFloat16>(r, x_pos, x_neg, target, weight, bias, geom, num_classes, opt,
                                              image_loss);
    } else {
      TORCH_CHECK(false, "ffkernels: bf16 convolutions need float32 weights");
    }
  });
  r.loss = at::scalar_tensor(sum_in_order(image_loss), x_pos.options());
  return r;
}

}  // namespace ffk

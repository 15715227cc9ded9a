// The first-layer FF step of supervised (label-in-the-input) training, on the CPU.
//
// In Hinton-style FF the positive and the negative of a sample are the same input x with a different
// label written one-hot (times `value`) into its first C features. Their normalization scales are equal
// (the one-hot has the same norm whatever the label), so with xr = x with the label features zeroed:
//   z_pos = r (xr W^T) + r value W[:, y_pos] + b,   z_neg = r (xr W^T) + r value W[:, y_neg] + b
// One B-row GEMM gives the shared part for both, instead of a 2B-row GEMM over an explicit pos||neg.
// Likewise for the weight gradient: grad_W = (dL/dz_pos + dL/dz_neg)^T (r xr) over B rows, plus the
// label columns, which get sum_i r value dL/dz_i scattered to column y_i.
// Peer normalization (opt.peer_norm > 0): dL/dz_pos gains v_j for every unit (ff_cpu_rows.h peer_terms, one
// column reduction of h_pos), in the shared rows and in the label columns alike.
// The result is the FF step of (embed_label(x, y_pos), embed_label(x, y_neg)), up to rounding.
// Mixed precision (opt.gemm == BFloat16, float weights): as ff_grad_cpu.cpp, xr_hat and W in bf16 for the two GEMMs
// (bf16 outputs); the label term r value W[:, y] reads W's bf16 copy, with r value rounded to bf16 as the explicit
// pair's label feature would be; the epilogue and the label columns' gradient in fp32 (then stored into the bf16
// grad_weight with the rest of it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "ff_cpu_rows.h"
#include "ff_kernels.h"

namespace ffk {
namespace {

// xr_hat = r * x with the first C features zeroed; lv_i = r_i * value (the label feature after scaling), both rounded
// to the GEMM dtype z_t as the explicit pair's x_hat would be.
template <typename scalar_t, typename acc_t, typename z_t>
void normalize_without_labels(const scalar_t* x, z_t* out, acc_t* lv, int64_t B, int64_t K, int64_t C,
                              double value, Norm norm, double eps) {
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / K), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t* xr = x + i * K;
      z_t* orow = out + i * K;
      const double ss = value * value + sum_squares(xr, C, K);  // the one-hot adds value^2
      const acc_t d = static_cast<acc_t>(row_divisor(ss, K, norm, eps));
      for (int64_t k = 0; k < C; ++k) orow[k] = z_t(0);
      for (int64_t k = C; k < K; ++k)
        orow[k] = static_cast<z_t>(static_cast<scalar_t>(static_cast<acc_t>(xr[k]) / d));
      lv[i] = static_cast<acc_t>(static_cast<z_t>(static_cast<scalar_t>(static_cast<acc_t>(value) / d)));
    }
  });
}

template <typename scalar_t, typename z_t>
void labeled_impl(GradResult& r, const at::Tensor& x, const int64_t* yp, const int64_t* yn, int64_t C, double value,
                  const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& peer_mean,
                  const LossOptions& opt, std::vector<double>& pair_loss, double& peer_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  using state_t = state_type<scalar_t>;
  constexpr bool low = !std::is_same_v<z_t, scalar_t>;
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.defined(), peer = opt.peer_norm != 0.0;
  const at::TensorOptions gemm_options = x.options().dtype(c10::CppTypeToScalarType<z_t>::value);
  at::Tensor xhat = at::empty({B, K}, gemm_options);
  at::Tensor grad_label = at::zeros({C, N}, x.options());
  std::vector<acc_t> lv(B), cp(B), cn(B), v(peer ? N : 0);
  normalize_without_labels<scalar_t, acc_t, z_t>(x.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>(), lv.data(), B, K,
                                                 C, value, opt.norm, opt.norm_eps);
  const at::Tensor w_gemm = low ? weight.to(gemm_options.dtype()) : weight;
  at::Tensor z = at::mm(xhat, w_gemm.t());                      // the shared part, B rows
  at::Tensor w_label = w_gemm.narrow(1, 0, C).t().contiguous();  // (C, N): label column c of W as a row
  // the bias gradient's parameter-dtype copy of dL/dz (only needed when the GEMM operand is lower precision)
  at::Tensor dz_full = low && has_bias ? at::empty({B, N}, x.options()) : at::Tensor();
  scalar_t* fz = dz_full.defined() ? dz_full.data_ptr<scalar_t>() : nullptr;
  const z_t* wl = w_label.const_data_ptr<z_t>();
  const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  z_t* zp = z.data_ptr<z_t>();
  scalar_t *hp = r.h_pos.data_ptr<scalar_t>(), *hn = r.h_neg.data_ptr<scalar_t>();
  scalar_t *gpp = r.g_pos.data_ptr<scalar_t>(), *gnp = r.g_neg.data_ptr<scalar_t>();
  const acc_t s = goodness_scale<acc_t>(N, opt.goodness);
  const LossScalars<acc_t> scalars = opt.scalars<acc_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / N), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      z_t* zi = zp + i * N;
      scalar_t *hpi = hp + i * N, *hni = hn + i * N, *fi = fz ? fz + i * N : nullptr;
      const acc_t gp = row_goodness<scalar_t>(relu_row<scalar_t, acc_t, z_t>(zi, wl + yp[i] * N, lv[i], b, hpi, N), s);
      const acc_t gn = row_goodness<scalar_t>(relu_row<scalar_t, acc_t, z_t>(zi, wl + yn[i] * N, lv[i], b, hni, N), s);
      gpp[i] = static_cast<scalar_t>(gp);
      gnp[i] = static_cast<scalar_t>(gn);
      const PairTerms<acc_t> t = pair_terms<acc_t>(gp, gn, opt.loss, scalars, B);
      pair_loss[i] = static_cast<double>(t.loss);
      cp[i] = coef_from_dg<acc_t>(t.dg_pos, s);
      cn[i] = coef_from_dg<acc_t>(t.dg_neg, s);
      if (peer) continue;  // dL/dz_pos needs v, from all rows' h_pos: written below
      for (int64_t j = 0; j < N; ++j) {  // z <- dL/dz_pos + dL/dz_neg (the shared features see both)
        store_dz<scalar_t>(zi, fi, j, cp[i] * static_cast<acc_t>(hpi[j]) + cn[i] * static_cast<acc_t>(hni[j]));
      }
    }
  });
  if (peer) {  // dL/dz_pos = c_pos h_pos + v
    peer_loss = peer_terms<scalar_t, state_t, acc_t>(hp, B, N, peer_mean.const_data_ptr<state_t>(),
                                                     r.peer_mean.data_ptr<state_t>(), v.data(), opt.peer_norm,
                                                     opt.peer_momentum);
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / N), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        z_t* zi = zp + i * N;
        scalar_t *hpi = hp + i * N, *hni = hn + i * N, *fi = fz ? fz + i * N : nullptr;
        for (int64_t j = 0; j < N; ++j) {
          store_dz<scalar_t>(zi, fi, j,
                             cp[i] * static_cast<acc_t>(hpi[j]) + v[j] + cn[i] * static_cast<acc_t>(hni[j]));
        }
      }
    });
  }
  // label columns: each thread owns a range of the N outputs, so the scatter needs no atomics
  scalar_t* gl = grad_label.data_ptr<scalar_t>();
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < B; ++i) {
      const acc_t ap = lv[i] * cp[i], an = lv[i] * cn[i];
      scalar_t *glp = gl + yp[i] * N, *gln = gl + yn[i] * N;
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t dp = peer ? lv[i] * (cp[i] * static_cast<acc_t>(hp[i * N + j]) + v[j])
                              : ap * static_cast<acc_t>(hp[i * N + j]);
        glp[j] = static_cast<scalar_t>(static_cast<acc_t>(glp[j]) + dp);
        gln[j] = static_cast<scalar_t>(static_cast<acc_t>(gln[j]) + an * static_cast<acc_t>(hn[i * N + j]));
      }
    }
  });
  r.grad_weight = at::mm(z.t(), xhat);  // zero in the label columns: xhat is zero there
  r.grad_weight.narrow(1, 0, C).copy_(grad_label.t());
  if (has_bias) r.grad_bias = (low ? dz_full : z).sum(0);
}

}  // namespace

GradResult ff_grad_labeled_cpu(const at::Tensor& x, const at::Tensor& label_pos, const at::Tensor& label_neg,
                               int64_t C, double value, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& peer_mean, const LossOptions& opt) {
  const int64_t B = x.size(0), N = weight.size(0);
  std::vector<double> pair_loss(static_cast<size_t>(B));
  const int64_t* yp = label_pos.const_data_ptr<int64_t>();
  const int64_t* yn = label_neg.const_data_ptr<int64_t>();
  const bool peer = opt.peer_norm != 0.0;
  double peer_loss = 0.0;

  GradResult r;
  r.h_pos = at::empty({B, N}, x.options());
  r.h_neg = at::empty({B, N}, x.options());
  r.g_pos = at::empty({B}, x.options());
  r.g_neg = at::empty({B}, x.options());
  if (peer) r.peer_mean = at::empty({N}, peer_mean.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ff_grad_labeled_cpu", [&] {
    if (opt.gemm == GemmDtype::Param) {
      labeled_impl<scalar_t, scalar_t>(r, x, yp, yn, C, value, weight, bias, peer_mean, opt, pair_loss, peer_loss);
    } else if constexpr (std::is_same_v<scalar_t, float>) {  // the binding admits bf16 GEMMs for float weights only
      labeled_impl<scalar_t, c10::BFloat16>(r, x, yp, yn, C, value, weight, bias, peer_mean, opt, pair_loss,
                                            peer_loss);
    } else {
      TORCH_CHECK(false, "ffkernels: bf16 GEMMs need float32 weights");
    }
  });
  const double loss = sum_in_order(pair_loss);
  r.loss = at::scalar_tensor(peer ? loss + peer_loss : loss, x.options());
  return r;
}

}  // namespace ffk

// Fused FF forward + exact local gradient on the CPU.
//
// One 2B-row problem (pos rows first, then neg rows):
//   1. normalize:  xhat = x / d_i for pos||neg, written once into a (2B, K) buffer. The
//                  concatenation costs this copy anyway, so writing xhat instead of x is free and
//                  lets one GEMM serve each direction.
//   2. GEMM:       z = xhat W^T                                  (2B, N), BLAS through ATen
//   3. epilogue:   per pos/neg pair i (parallel): h = relu(z + b), g = s * sum h^2, the loss terms
//                  and c = dL/dg * 2s; writes h_pos/h_neg/g and overwrites z with c * h (= dL/dz)
//   4. GEMM:       grad_W = (dL/dz)^T xhat                        (N, K), one 2B-row reduction
//   5. grad_b = column sums of dL/dz
// Peer normalization (opt.peer_norm > 0): step 3 leaves the positive rows' dL/dz for later and keeps c_i; one
// column reduction of h_pos gives r', L_peer and v (ff_cpu_rows.h peer_terms); then dL/dz+_ij = c_i h_ij + v_j
// before the GEMM of step 4. The caller commits r' (GradResult::peer_mean).
// Mixed precision (opt.gemm == BFloat16, float weights; docs/design.md, "Mixed precision"): xhat is written in bf16,
// W cast to bf16 once, both GEMMs bf16 with fp32 accumulation and bf16 outputs (ATen/oneDNN, as torch.autocast's
// mm); the epilogue reads the bf16 z and computes in fp32, writes dL/dz in bf16 for the dW GEMM and, with a bias, in
// fp32 for the bias gradient. grad_weight is left in bf16 (the update reads it; the ff_grad op widens it).
// No autograd graph, no x-sized temporaries besides xhat, no N-sized ones besides z.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <type_traits>
#include <vector>

#include "ff_cpu_rows.h"
#include "ff_kernels.h"

namespace ffk {
namespace {

// z: (2B, N) in the GEMM dtype z_t; overwritten with dL/dz (also written to dz_full, the parameter-dtype copy, when
// given). With c_pos given (peer normalization), the positive rows' dL/dz is not written: their c_i go to c_pos.
template <typename scalar_t, typename z_t>
void epilogue(z_t* z, scalar_t* dz_full, const scalar_t* b, scalar_t* h_pos, scalar_t* h_neg, scalar_t* g_pos,
              scalar_t* g_neg, double* pair_loss, int64_t B, int64_t N, const LossOptions& opt,
              at::opmath_type<scalar_t>* c_pos) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = goodness_scale<acc_t>(N, opt.goodness);
  const LossScalars<acc_t> scalars = opt.scalars<acc_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      z_t* zp = z + i * N;
      z_t* zn = z + (B + i) * N;
      scalar_t* fp = dz_full ? dz_full + i * N : nullptr;
      scalar_t* fn = dz_full ? dz_full + (B + i) * N : nullptr;
      scalar_t* hp = h_pos + i * N;
      scalar_t* hn = h_neg + i * N;
      const acc_t gp = row_goodness<scalar_t>(relu_row<scalar_t, acc_t, z_t>(zp, nullptr, acc_t(0), b, hp, N), s);
      const acc_t gn = row_goodness<scalar_t>(relu_row<scalar_t, acc_t, z_t>(zn, nullptr, acc_t(0), b, hn, N), s);
      g_pos[i] = static_cast<scalar_t>(gp);
      g_neg[i] = static_cast<scalar_t>(gn);
      const PairTerms<acc_t> t = pair_terms<acc_t>(gp, gn, opt.loss, scalars, B);
      pair_loss[i] = static_cast<double>(t.loss);
      const acc_t cp = coef_from_dg<acc_t>(t.dg_pos, s);
      const acc_t cn = coef_from_dg<acc_t>(t.dg_neg, s);
      if (c_pos) {
        c_pos[i] = cp;
      } else {
        for (int64_t j = 0; j < N; ++j) store_dz<scalar_t>(zp, fp, j, cp * static_cast<acc_t>(hp[j]));
      }
      for (int64_t j = 0; j < N; ++j) store_dz<scalar_t>(zn, fn, j, cn * static_cast<acc_t>(hn[j]));
    }
  });
}

// The positive rows' dL/dz with peer normalization: c_i h_ij + v_j, for every unit (also where h = 0).
template <typename scalar_t, typename acc_t, typename z_t>
void peer_pos_grad(z_t* z, scalar_t* dz_full, const scalar_t* h_pos, const acc_t* c_pos, const acc_t* v, int64_t B,
                   int64_t N) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      z_t* zp = z + i * N;
      scalar_t* fp = dz_full ? dz_full + i * N : nullptr;
      const scalar_t* hp = h_pos + i * N;
      for (int64_t j = 0; j < N; ++j) store_dz<scalar_t>(zp, fp, j, c_pos[i] * static_cast<acc_t>(hp[j]) + v[j]);
    }
  });
}

// The kernel for parameters of scalar_t with GEMM operands of z_t (scalar_t, or bf16 under autocast).
template <typename scalar_t, typename z_t>
void grad_impl(GradResult& r, const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
               const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt,
               std::vector<double>& pair_loss, double& peer_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  using state_t = state_type<scalar_t>;
  constexpr bool low = !std::is_same_v<z_t, scalar_t>;
  const int64_t B = x_pos.size(0), K = x_pos.size(1), N = weight.size(0);
  const bool has_bias = bias.defined(), peer = opt.peer_norm != 0.0;
  const at::TensorOptions gemm_options = x_pos.options().dtype(c10::CppTypeToScalarType<z_t>::value);
  at::Tensor xhat = at::empty({2 * B, K}, gemm_options);
  std::vector<acc_t> c_pos(peer ? B : 0), v(peer ? N : 0);
  normalize_rows<scalar_t, z_t>(x_pos.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>(), B, K, opt.norm, opt.norm_eps);
  normalize_rows<scalar_t, z_t>(x_neg.const_data_ptr<scalar_t>(), xhat.data_ptr<z_t>() + B * K, B, K, opt.norm,
                                opt.norm_eps);
  at::Tensor z = at::mm(xhat, (low ? weight.to(gemm_options.dtype()) : weight).t());
  // the bias gradient's parameter-dtype copy of dL/dz (only needed when the GEMM operand is lower precision)
  at::Tensor dz_full = low && has_bias ? at::empty({2 * B, N}, x_pos.options()) : at::Tensor();
  scalar_t* fp = dz_full.defined() ? dz_full.data_ptr<scalar_t>() : nullptr;
  epilogue<scalar_t, z_t>(z.data_ptr<z_t>(), fp, has_bias ? bias.const_data_ptr<scalar_t>() : nullptr,
                          r.h_pos.data_ptr<scalar_t>(), r.h_neg.data_ptr<scalar_t>(), r.g_pos.data_ptr<scalar_t>(),
                          r.g_neg.data_ptr<scalar_t>(), pair_loss.data(), B, N, opt, peer ? c_pos.data() : nullptr);
  if (peer) {
    peer_loss = peer_terms<scalar_t, state_t, acc_t>(r.h_pos.const_data_ptr<scalar_t>(), B, N,
                                                     peer_mean.const_data_ptr<state_t>(),
                                                     r.peer_mean.data_ptr<state_t>(), v.data(), opt.peer_norm,
                                                     opt.peer_momentum);
    peer_pos_grad<scalar_t, acc_t, z_t>(z.data_ptr<z_t>(), fp, r.h_pos.const_data_ptr<scalar_t>(), c_pos.data(),
                                        v.data(), B, N);
  }
  // z now holds dL/dz
  r.grad_weight = at::mm(z.t(), xhat);
  if (has_bias) r.grad_bias = (low ? dz_full : z).sum(0);
}

}  // namespace

GradResult ff_grad_cpu(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                       const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt) {
  const int64_t B = x_pos.size(0), N = weight.size(0);
  std::vector<double> pair_loss(static_cast<size_t>(B));
  const bool peer = opt.peer_norm != 0.0;
  double peer_loss = 0.0;

  GradResult r;
  r.h_pos = at::empty({B, N}, x_pos.options());
  r.h_neg = at::empty({B, N}, x_pos.options());
  r.g_pos = at::empty({B}, x_pos.options());
  r.g_neg = at::empty({B}, x_pos.options());
  if (peer) r.peer_mean = at::empty({N}, peer_mean.options());
  AT_DISPATCH_FLOATING_TYPES(x_pos.scalar_type(), "ff_grad_cpu", [&] {
    if (opt.gemm == GemmDtype::Param) {
      grad_impl<scalar_t, scalar_t>(r, x_pos, x_neg, weight, bias, peer_mean, opt, pair_loss, peer_loss);
    } else if constexpr (std::is_same_v<scalar_t, float>) {  // the binding admits bf16 GEMMs for float weights only
      grad_impl<scalar_t, c10::BFloat16>(r, x_pos, x_neg, weight, bias, peer_mean, opt, pair_loss, peer_loss);
    } else {
      TORCH_CHECK(false, "ffkernels: bf16 GEMMs need float32 weights");
    }
  });
  const double loss = sum_in_order(pair_loss);
  r.loss = at::scalar_tensor(peer ? loss + peer_loss : loss, x_pos.options());
  return r;
}

}  // namespace ffk

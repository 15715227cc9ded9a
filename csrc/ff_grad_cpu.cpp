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
// No autograd graph, no x-sized temporaries besides xhat, no N-sized ones besides z.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "ff_cpu_rows.h"
#include "ff_kernels.h"

namespace ffk {
namespace {

template <typename scalar_t>
void normalize_rows(const scalar_t* x, scalar_t* out, int64_t rows, int64_t K, Norm norm, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t* xr = x + i * K;
      scalar_t* orow = out + i * K;
      if (norm == Norm::None) {
        for (int64_t k = 0; k < K; ++k) orow[k] = xr[k];
        continue;
      }
      // x / d (ff_math.h row_divisor, the oracle's formula): divide, as the reference does
      const acc_t d = static_cast<acc_t>(row_divisor(sum_squares(xr, 0, K), K, norm, eps));
      for (int64_t k = 0; k < K; ++k) orow[k] = static_cast<scalar_t>(static_cast<acc_t>(xr[k]) / d);
    }
  });
}

// With c_pos given (peer normalization), the positive rows' dL/dz is not written: their c_i go to c_pos.
template <typename scalar_t>
void epilogue(scalar_t* z, const scalar_t* b, scalar_t* h_pos, scalar_t* h_neg, scalar_t* g_pos,
              scalar_t* g_neg, double* pair_loss, int64_t B, int64_t N, const LossOptions& opt,
              at::opmath_type<scalar_t>* c_pos) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = goodness_scale<acc_t>(N, opt.goodness);
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      scalar_t* zp = z + i * N;
      scalar_t* zn = z + (B + i) * N;
      scalar_t* hp = h_pos + i * N;
      scalar_t* hn = h_neg + i * N;
      const acc_t gp = row_goodness<scalar_t>(relu_row<scalar_t>(zp, nullptr, acc_t(0), b, hp, N), s);
      const acc_t gn = row_goodness<scalar_t>(relu_row<scalar_t>(zn, nullptr, acc_t(0), b, hn, N), s);
      g_pos[i] = static_cast<scalar_t>(gp);
      g_neg[i] = static_cast<scalar_t>(gn);
      const PairTerms<acc_t> t = pair_terms<acc_t>(gp, gn, opt.loss, static_cast<acc_t>(opt.threshold),
                                                   static_cast<acc_t>(opt.symba_alpha), B);
      pair_loss[i] = static_cast<double>(t.loss);
      const acc_t cp = coef_from_dg<acc_t>(t.dg_pos, s);
      const acc_t cn = coef_from_dg<acc_t>(t.dg_neg, s);
      if (c_pos) {
        c_pos[i] = cp;
      } else {
        for (int64_t j = 0; j < N; ++j) zp[j] = static_cast<scalar_t>(cp * static_cast<acc_t>(hp[j]));
      }
      for (int64_t j = 0; j < N; ++j) zn[j] = static_cast<scalar_t>(cn * static_cast<acc_t>(hn[j]));
    }
  });
}

// The positive rows' dL/dz with peer normalization: c_i h_ij + v_j, for every unit (also where h = 0).
template <typename scalar_t, typename acc_t>
void peer_pos_grad(scalar_t* z, const scalar_t* h_pos, const acc_t* c_pos, const acc_t* v, int64_t B, int64_t N) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      scalar_t* zp = z + i * N;
      const scalar_t* hp = h_pos + i * N;
      for (int64_t j = 0; j < N; ++j) zp[j] = static_cast<scalar_t>(c_pos[i] * static_cast<acc_t>(hp[j]) + v[j]);
    }
  });
}

}  // namespace

GradResult ff_grad_cpu(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                       const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt) {
  const int64_t B = x_pos.size(0), K = x_pos.size(1), N = weight.size(0);
  const bool has_bias = bias.defined();
  auto xhat = at::empty({2 * B, K}, x_pos.options());
  auto h_pos = at::empty({B, N}, x_pos.options());
  auto h_neg = at::empty({B, N}, x_pos.options());
  auto g_pos = at::empty({B}, x_pos.options());
  auto g_neg = at::empty({B}, x_pos.options());
  std::vector<double> pair_loss(static_cast<size_t>(B));
  const bool peer = opt.peer_norm != 0.0;
  double peer_loss = 0.0;

  GradResult r;
  if (peer) r.peer_mean = at::empty({N}, peer_mean.options());
  AT_DISPATCH_FLOATING_TYPES(x_pos.scalar_type(), "ff_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using state_t = state_type<scalar_t>;
    std::vector<acc_t> c_pos(peer ? B : 0), v(peer ? N : 0);
    normalize_rows<scalar_t>(x_pos.const_data_ptr<scalar_t>(), xhat.data_ptr<scalar_t>(), B, K, opt.norm, opt.norm_eps);
    normalize_rows<scalar_t>(x_neg.const_data_ptr<scalar_t>(), xhat.data_ptr<scalar_t>() + B * K, B, K, opt.norm,
                             opt.norm_eps);
    auto z = at::mm(xhat, weight.t());
    epilogue<scalar_t>(z.data_ptr<scalar_t>(), has_bias ? bias.const_data_ptr<scalar_t>() : nullptr,
                       h_pos.data_ptr<scalar_t>(), h_neg.data_ptr<scalar_t>(), g_pos.data_ptr<scalar_t>(),
                       g_neg.data_ptr<scalar_t>(), pair_loss.data(), B, N, opt, peer ? c_pos.data() : nullptr);
    if (peer) {
      peer_loss = peer_terms<scalar_t, state_t, acc_t>(h_pos.const_data_ptr<scalar_t>(), B, N,
                                                       peer_mean.const_data_ptr<state_t>(),
                                                       r.peer_mean.data_ptr<state_t>(), v.data(), opt.peer_norm,
                                                       opt.peer_momentum);
      peer_pos_grad<scalar_t, acc_t>(z.data_ptr<scalar_t>(), h_pos.const_data_ptr<scalar_t>(), c_pos.data(), v.data(),
                                     B, N);
    }
    // z now holds dL/dz
    r.grad_weight = at::mm(z.t(), xhat);
    if (has_bias) r.grad_bias = z.sum(0);
  });
  const double loss = sum_in_order(pair_loss);
  r.loss = at::scalar_tensor(peer ? loss + peer_loss : loss, x_pos.options());
  std::tie(r.h_pos, r.h_neg, r.g_pos, r.g_neg) = std::tie(h_pos, h_neg, g_pos, g_neg);
  return r;
}

}  // namespace ffk

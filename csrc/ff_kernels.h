// Entry points of the fused FF kernels, one set per device. python_api/ checks the arguments and
// composes them into the registered ops; nothing here validates user input.
//
// Shapes: x_pos, x_neg (B, K); weight (N, K); bias (N) or undefined; peer_mean (N), the state dtype (fp32,
// fp64 for fp64 weights), read only, and used only when opt.peer_norm > 0 (may be undefined otherwise).
//   forward+grad  -> loss (0-d), h_pos, h_neg (B, N), g_pos, g_neg (B),
//                    grad_weight (N, K), grad_bias (N) (undefined without bias),
//                    peer_mean: the new running mean r' (N), state dtype, when opt.peer_norm > 0, else
//                    undefined; the binding commits it (peer_mean <- r') only when the loss is finite
//   update        -> in place on weight/bias and their optimizer state; skipped entirely when
//                    `loss` is defined and not finite (read on the device, no host sync needed)
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "ff_options.h"

namespace ffk {

struct GradResult {
  at::Tensor loss, h_pos, h_neg, g_pos, g_neg, grad_weight, grad_bias;
  at::Tensor peer_mean;  // r' when opt.peer_norm > 0 (not yet committed), else undefined
};

struct ParamState {
  at::Tensor param;   // weight or bias, updated in place
  at::Tensor grad;
  at::Tensor state1;  // adam: exp_avg;    sgd: momentum buffer (or undefined when momentum == 0)
  at::Tensor state2;  // adam: exp_avg_sq; sgd: unused
};

GradResult ff_grad_cpu(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                       const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt);
void ff_update_cpu(const ParamState& p, const at::Tensor& loss, const OptimOptions& opt);

// Supervised first layer: x_pos/x_neg are x with labels label_pos/label_neg (int64, (B,)) written one-hot
// times `value` into features [0, C). Same outputs as ff_grad_cpu on the explicit pair, B-row GEMMs (CPU and CUDA).
GradResult ff_grad_labeled_cpu(const at::Tensor& x, const at::Tensor& label_pos, const at::Tensor& label_neg,
                               int64_t C, double value, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& peer_mean, const LossOptions& opt);

// Convolutional FF (ff_conv_cpu.cpp; ff_conv_cuda.cu below): x_pos (B, C_in, H, W) and x_neg (the same shape; undefined for the competitive
// loss), target (B,) int64 class labels (competitive only, else undefined), weight (C_out, C_in/groups, kH, kW), bias
// (C_out) or undefined; opt.peer_norm == 0.
//   -> loss (0-d), h_pos, h_neg (B, C_out, H_out, W_out), g_pos, g_neg: (B,) per image, (B, H_out, W_out) per
//      location, (B, num_classes) per class group; h_neg and g_neg are empty (0,) tensors for the competitive loss.
//      grad_weight in the GEMM dtype (bf16 under autocast; the ff_conv_grad op widens it), grad_bias (C_out) or
//      undefined.
struct ConvGeom {
  std::array<int64_t, 2> stride{1, 1}, padding{0, 0}, dilation{1, 1};
  int64_t groups = 1;
};

GradResult ff_conv_grad_cpu(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& target,
                            const at::Tensor& weight, const at::Tensor& bias, const ConvGeom& geom,
                            int64_t num_classes, const LossOptions& opt);

#ifdef FF_WITH_CUDA
GradResult ff_grad_cuda(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& peer_mean, const LossOptions& opt);
void ff_update_cuda(const ParamState& p, const at::Tensor& loss, const OptimOptions& opt);
GradResult ff_grad_labeled_cuda(const at::Tensor& x, const at::Tensor& label_pos, const at::Tensor& label_neg,
                                int64_t C, double value, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& peer_mean, const LossOptions& opt);
// ff_conv_cuda.cu: ff_conv_grad_cpu's contract on CUDA tensors (float32, float64, float16, bfloat16; bf16 or fp16
// convolutions for float32 weights under autocast, grad_weight then in that dtype); target already clamped into
// [0, num_classes) by the binding.
GradResult ff_conv_grad_cuda(const at::Tensor& x_pos, const at::Tensor& x_neg, const at::Tensor& target,
                             const at::Tensor& weight, const at::Tensor& bias, const ConvGeom& geom,
                             int64_t num_classes, const LossOptions& opt);
#endif

}  // namespace ffk

// The registered ops, composed from one device's kernels. python_api/ff_api.cpp defines the schemas, the
// option parsing and argument checks (ff_*_op below) and registers the CPU kernels; every other device
// registers its own kernels from its own file (csrc/cuda/ff_register_cuda.cpp) with register_ops<...>.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../csrc/ff_kernels.h"

namespace ffk {

using at::Tensor;
using c10::optional;

// One device's kernels (csrc/ff_kernels.h). grad_labeled is null on devices without the labeled first layer, conv_grad
// on devices without the convolutional step (the ff_conv_* ops are then not registered for that device).
struct DeviceKernels {
  const char* device;   // for messages: "CPU", "CUDA"
  bool half_precision;  // accepts float16/bfloat16 besides float32/float64
  GradResult (*grad)(const Tensor& x_pos, const Tensor& x_neg, const Tensor& weight, const Tensor& bias,
                     const Tensor& peer_mean, const LossOptions& opt);
  void (*update)(const ParamState& p, const Tensor& loss, const OptimOptions& opt);
  GradResult (*grad_labeled)(const Tensor& x, const Tensor& label_pos, const Tensor& label_neg, int64_t C,
                             double value, const Tensor& weight, const Tensor& bias, const Tensor& peer_mean,
                             const LossOptions& opt);
  bool bf16_gemm = false;  // runs gemm_dtype=bfloat16 (torch.autocast): bf16 GEMM operands, float32 parameters
  GradResult (*conv_grad)(const Tensor& x_pos, const Tensor& x_neg, const Tensor& target, const Tensor& weight,
                          const Tensor& bias, const ConvGeom& geom, int64_t num_classes,
                          const LossOptions& opt) = nullptr;
  bool fp16_gemm = false;  // runs gemm_dtype=float16 likewise (fp16 GEMM operands, float32 parameters)
};

using GradTuple = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using StepTuple = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using OptT = optional<Tensor>;

GradTuple ff_grad_op(const DeviceKernels& k, const Tensor& x_pos, const Tensor& x_neg, const Tensor& weight,
                     const OptT& bias, const OptT& peer_mean, c10::string_view options);
void ff_update_op(const DeviceKernels& k, const Tensor& weight, const OptT& bias, const Tensor& grad_weight,
                  const OptT& grad_bias, const OptT& state1_weight, const OptT& state2_weight, const OptT& state1_bias,
                  const OptT& state2_bias, const OptT& loss, int64_t step, c10::string_view options);
StepTuple ff_step_op(const DeviceKernels& k, const Tensor& x_pos, const Tensor& x_neg, const Tensor& weight,
                     const OptT& bias, const OptT& state1_weight, const OptT& state2_weight, const OptT& state1_bias,
                     const OptT& state2_bias, const OptT& peer_mean, int64_t step, c10::string_view options);
GradTuple ff_grad_labeled_op(const DeviceKernels& k, const Tensor& x, const Tensor& label_pos, const Tensor& label_neg,
                             int64_t num_classes, double label_value, const Tensor& weight, const OptT& bias,
                             const OptT& peer_mean, c10::string_view options);
StepTuple ff_step_labeled_op(const DeviceKernels& k, const Tensor& x, const Tensor& label_pos, const Tensor& label_neg,
                             int64_t num_classes, double label_value, const Tensor& weight, const OptT& bias,
                             const OptT& state1_weight, const OptT& state2_weight, const OptT& state1_bias,
                             const OptT& state2_bias, const OptT& peer_mean, int64_t step, c10::string_view options);
GradTuple ff_conv_grad_op(const DeviceKernels& k, const Tensor& x_pos, const OptT& x_neg, const OptT& target,
                          const Tensor& weight, const OptT& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                          c10::IntArrayRef dilation, int64_t groups, int64_t num_classes, c10::string_view options);
StepTuple ff_conv_step_op(const DeviceKernels& k, const Tensor& x_pos, const OptT& x_neg, const OptT& target,
                          const Tensor& weight, const OptT& bias, const OptT& state1_weight, const OptT& state2_weight,
                          const OptT& state1_bias, const OptT& state2_bias, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, int64_t num_classes,
                          int64_t step, c10::string_view options);

// The ops with kernels K bound, as plain functions the dispatcher can register.
template <const DeviceKernels& K>
struct BoundOps {
  static GradTuple ff_grad(const Tensor& xp, const Tensor& xn, const Tensor& w, const OptT& b, const OptT& r,
                           c10::string_view o) {
    return ff_grad_op(K, xp, xn, w, b, r, o);
  }
  static void ff_update(const Tensor& w, const OptT& b, const Tensor& gw, const OptT& gb, const OptT& s1w,
                        const OptT& s2w, const OptT& s1b, const OptT& s2b, const OptT& loss, int64_t step,
                        c10::string_view o) {
    ff_update_op(K, w, b, gw, gb, s1w, s2w, s1b, s2b, loss, step, o);
  }
  static StepTuple ff_step(const Tensor& xp, const Tensor& xn, const Tensor& w, const OptT& b, const OptT& s1w,
                           const OptT& s2w, const OptT& s1b, const OptT& s2b, const OptT& r, int64_t step,
                           c10::string_view o) {
    return ff_step_op(K, xp, xn, w, b, s1w, s2w, s1b, s2b, r, step, o);
  }
  static GradTuple ff_grad_labeled(const Tensor& x, const Tensor& lp, const Tensor& ln, int64_t C, double value,
                                   const Tensor& w, const OptT& b, const OptT& r, c10::string_view o) {
    return ff_grad_labeled_op(K, x, lp, ln, C, value, w, b, r, o);
  }
  static StepTuple ff_step_labeled(const Tensor& x, const Tensor& lp, const Tensor& ln, int64_t C, double value,
                                   const Tensor& w, const OptT& b, const OptT& s1w, const OptT& s2w,
                                   const OptT& s1b, const OptT& s2b, const OptT& r, int64_t step, c10::string_view o) {
    return ff_step_labeled_op(K, x, lp, ln, C, value, w, b, s1w, s2w, s1b, s2b, r, step, o);
  }
  static GradTuple ff_conv_grad(const Tensor& xp, const OptT& xn, const OptT& t, const Tensor& w, const OptT& b,
                                c10::IntArrayRef st, c10::IntArrayRef pad, c10::IntArrayRef dil, int64_t groups,
                                int64_t C, c10::string_view o) {
    return ff_conv_grad_op(K, xp, xn, t, w, b, st, pad, dil, groups, C, o);
  }
  static StepTuple ff_conv_step(const Tensor& xp, const OptT& xn, const OptT& t, const Tensor& w, const OptT& b,
                                const OptT& s1w, const OptT& s2w, const OptT& s1b, const OptT& s2b,
                                c10::IntArrayRef st, c10::IntArrayRef pad, c10::IntArrayRef dil, int64_t groups,
                                int64_t C, int64_t step, c10::string_view o) {
    return ff_conv_step_op(K, xp, xn, t, w, b, s1w, s2w, s1b, s2b, st, pad, dil, groups, C, step, o);
  }
};

// Registers kernels K for one dispatch key: TORCH_LIBRARY_IMPL(ffkernels, KEY, m) { register_ops<K>(m); }
template <const DeviceKernels& K>
void register_ops(torch::Library& m) {
  m.impl("ff_grad", &BoundOps<K>::ff_grad);
  m.impl("ff_update", &BoundOps<K>::ff_update);
  m.impl("ff_step", &BoundOps<K>::ff_step);
  if (K.grad_labeled != nullptr) {
    m.impl("ff_grad_labeled", &BoundOps<K>::ff_grad_labeled);
    m.impl("ff_step_labeled", &BoundOps<K>::ff_step_labeled);
  }
  if (K.conv_grad != nullptr) {
    m.impl("ff_conv_grad", &BoundOps<K>::ff_conv_grad);
    m.impl("ff_conv_step", &BoundOps<K>::ff_conv_step);
  }
}

}  // namespace ffk

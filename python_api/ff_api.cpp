// The thin binding layer: op schemas, option parsing, argument checks with messages that name the problem,
// and the CPU registration. Each device's kernels are registered from their own file (CPU here, CUDA in
// csrc/cuda/ff_register_cuda.cpp) through register_ops<...> (ff_ops.h). No math here.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "ff_ops.h"

namespace ffk {
namespace {

// ---- options: one string, FFConfig.op_options (ffkernels/config.py) -------------------------------------

// The keys of FFConfig.op_options (ffkernels/config.py OP_OPTION_KEYS); every op takes all of them.
constexpr const char* kOptionKeys[] = {"norm",          "norm_eps",    "goodness",  "threshold", "threshold_neg",
                                       "loss",          "symba_alpha", "scff_lambda", "optimizer", "lr",
                                       "beta1",         "beta2",       "eps",       "momentum",  "weight_decay",
                                       "peer_norm",     "peer_momentum", "gemm_dtype"};

// The conv ops' options (FFConfig.conv_op_options, CONV_OPTION_KEYS): kOptionKeys, then these.
constexpr const char* kConvOptionKeys[] = {"goodness_over", "goodness_power", "temperature"};

std::vector<std::string> option_keys(bool conv) {
  std::vector<std::string> keys(std::begin(kOptionKeys), std::end(kOptionKeys));
  if (conv) keys.insert(keys.end(), std::begin(kConvOptionKeys), std::end(kConvOptionKeys));
  return keys;
}

std::string option_keys_text(bool conv) {
  std::string s;
  for (const std::string& k : option_keys(conv)) s += (s.empty() ? "" : ", ") + k;
  return s;
}

// An option's enum value from its name (the names beside the enums in csrc/ff_math.h).
template <typename E, size_t N>
E parse_choice(const std::string& value, const char* const (&names)[N], const char* option) {
  std::string expected;
  for (size_t i = 0; i < N; ++i) {
    if (value == names[i]) return static_cast<E>(i);
    expected += (i ? ", '" : "'") + std::string(names[i]) + "'";
  }
  TORCH_CHECK_VALUE(false, "ffkernels: unknown ", option, " '", value, "'; expected one of ", expected);
}

void check_number(double v, const char* name, double lo, bool lo_inclusive, double hi = INFINITY) {
  const bool ok = std::isfinite(v) && (lo_inclusive ? v >= lo : v > lo) && v < hi;
  // bounds print like Python's f"{bound:g}" (FFConfig's messages): 0, 1
  if (std::isfinite(hi)) {
    TORCH_CHECK_VALUE(ok, "ffkernels: ", name, " must be a finite number ", lo_inclusive ? ">= " : "> ", lo,
                      " and < ", hi, ", got ", v);
  }
  TORCH_CHECK_VALUE(ok, "ffkernels: ", name, " must be a finite number ", lo_inclusive ? ">= " : "> ", lo, ", got ", v);
}

struct OpOptions {
  LossOptions loss;
  OptimOptions optim;
};

// Parses and checks the options string once per call: every key must be there, once, and nothing else. The linear
// ops take FFConfig.op_options (kOptionKeys) and refuse the competitive loss; the conv ops (conv = true) take
// FFConfig.conv_op_options (kOptionKeys + kConvOptionKeys).
OpOptions parse_options(c10::string_view text, bool conv = false) {
  const std::string all(text);
  const std::vector<std::string> keys = option_keys(conv);
  const char* const source = conv ? "FFConfig.conv_op_options" : "FFConfig.op_options";
  std::map<std::string, std::string> kv;
  size_t pos = 0;
  while (pos <= all.size()) {
    const size_t end = std::min(all.find(';', pos), all.size());
    const std::string item = all.substr(pos, end - pos);
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    bool known = false;
    for (const std::string& k : keys) known = known || key == k;
    TORCH_CHECK_VALUE(eq != std::string::npos && known, "ffkernels: unknown option '", key, "' in options '", all,
                      "'; expected the keys ", option_keys_text(conv), " (see ", source, ")");
    TORCH_CHECK_VALUE(kv.emplace(key, item.substr(eq + 1)).second, "ffkernels: option '", key,
                      "' is given twice in options '", all, "'");
    pos = end + 1;
  }
  std::string missing;
  for (const std::string& k : keys)
    if (!kv.count(k)) missing += (missing.empty() ? "" : ", ") + k;
  TORCH_CHECK_VALUE(missing.empty(), "ffkernels: options '", all, "' lack ", missing, " (see ", source, ")");
  auto number = [&](const char* key) {
    const std::string& v = kv[key];
    char* stop = nullptr;
    const double d = std::strtod(v.c_str(), &stop);
    TORCH_CHECK_VALUE(!v.empty() && stop == v.c_str() + v.size(), "ffkernels: option ", key,
                      " must be a number, got '", v, "'");
    return d;
  };
  OpOptions o;
  o.loss.norm = parse_choice<Norm>(kv["norm"], kNormNames, "norm");
  o.loss.goodness = parse_choice<Goodness>(kv["goodness"], kGoodnessNames, "goodness");
  o.loss.loss = parse_choice<Loss>(kv["loss"], kLossNames, "loss");
  o.loss.gemm = parse_choice<GemmDtype>(kv["gemm_dtype"], kGemmDtypeNames, "gemm_dtype");
  o.loss.norm_eps = number("norm_eps");
  o.loss.threshold = number("threshold");
  o.loss.threshold_neg = number("threshold_neg");
  o.loss.symba_alpha = number("symba_alpha");
  o.loss.scff_lambda = number("scff_lambda");
  check_number(o.loss.norm_eps, "norm_eps", 0.0, true);
  TORCH_CHECK_VALUE(std::isfinite(o.loss.threshold), "ffkernels: threshold must be finite, got ", o.loss.threshold);
  TORCH_CHECK_VALUE(std::isfinite(o.loss.threshold_neg), "ffkernels: threshold_neg must be finite, got ",
                    o.loss.threshold_neg);
  check_number(o.loss.symba_alpha, "symba_alpha", 0.0, false);
  check_number(o.loss.scff_lambda, "scff_lambda", 0.0, true);
  o.loss.peer_norm = number("peer_norm");
  o.loss.peer_momentum = number("peer_momentum");
  check_number(o.loss.peer_norm, "peer_norm", 0.0, true);
  check_number(o.loss.peer_momentum, "peer_momentum", 0.0, true, 1.0);
  OptimOptions& q = o.optim;
  q.optimizer = parse_choice<Optim>(kv["optimizer"], kOptimNames, "optimizer");
  q.lr = number("lr");
  q.beta1 = number("beta1");
  q.beta2 = number("beta2");
  q.eps = number("eps");
  q.momentum = number("momentum");
  q.weight_decay = number("weight_decay");
  check_number(q.lr, "lr", 0.0, true);
  check_number(q.beta1, "beta1", 0.0, true, 1.0);
  check_number(q.beta2, "beta2", 0.0, true, 1.0);
  check_number(q.eps, "eps", 0.0, true);
  check_number(q.momentum, "momentum", 0.0, true);
  check_number(q.weight_decay, "weight_decay", 0.0, true);
  if (!conv) {
    TORCH_CHECK_VALUE(o.loss.loss != Loss::Competitive, "ffkernels: the linear FF ops compute sample goodness of "
                      "h**2 with the hinton, symba or scff loss; loss='competitive' needs the conv ops "
                      "(FFConfig.conv_op_options)");
    return o;
  }
  o.loss.goodness_over = parse_choice<GoodnessOver>(kv["goodness_over"], kGoodnessOverNames, "goodness_over");
  const double power = number("goodness_power");
  TORCH_CHECK_VALUE(power == 1.0 || power == 2.0, "ffkernels: goodness_power must be 1 or 2, got ",
                    kv["goodness_power"]);
  o.loss.goodness_power = static_cast<int>(power);
  o.loss.temperature = number("temperature");
  check_number(o.loss.temperature, "temperature", 0.0, false);
  TORCH_CHECK_VALUE((o.loss.loss == Loss::Competitive) == (o.loss.goodness_over == GoodnessOver::Group),
                    "ffkernels: loss='competitive' goes with goodness_over='group' (one goodness per class group) and "
                    "only with it, got loss='", kv["loss"], "', goodness_over='", kv["goodness_over"], "'");
  return o;
}

OptimOptions optim_for_step(const OpOptions& o, int64_t step) {
  TORCH_CHECK_VALUE(step >= 1, "ffkernels: step must be >= 1 (the 1-based number of this update), got ", step);
  OptimOptions q = o.optim;
  q.step = step;
  return q;
}

// ---- tensors -------------------------------------------------------------------------------------

bool dtype_supported(const DeviceKernels& k, const Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kDouble || (k.half_precision && (st == at::kHalf || st == at::kBFloat16));
}

void check_weight_dtype(const DeviceKernels& k, const Tensor& weight) {
  TORCH_CHECK_TYPE(dtype_supported(k, weight), "ffkernels: unsupported dtype ", weight.scalar_type(), " on ",
                   weight.device(), " (", k.device, " kernels take float32, float64",
                   k.half_precision ? ", float16, bfloat16)" : ")");
}

// Lower-precision GEMMs (gemm_dtype, set from torch.autocast): bf16 (CPU, CUDA) and fp16 (CUDA) on devices whose
// kernels have them, for float32 (master) weights only. A device that cannot run them refuses, rather than computing
// in fp32.
void check_gemm_dtype(const DeviceKernels& k, const LossOptions& o, const Tensor& weight) {
  if (o.gemm == GemmDtype::Param) return;
  const char* name = kGemmDtypeNames[static_cast<int>(o.gemm)];
  const bool runs = (o.gemm == GemmDtype::BFloat16 && k.bf16_gemm) || (o.gemm == GemmDtype::Float16 && k.fp16_gemm);
  const char* hint = k.bf16_gemm && k.fp16_gemm ? " (bfloat16 and float16 are supported)"
                     : k.bf16_gemm              ? " (bfloat16 is supported)"
                     : k.fp16_gemm              ? " (float16 is supported)"
                                                : "";
  TORCH_CHECK(runs, "ffkernels: the ", k.device, " kernels have no ", name, " GEMMs (gemm_dtype=", name,
              ", i.e. torch.autocast with dtype=torch.", name, "); run outside autocast, or use backend='reference'",
              hint);
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "ffkernels: gemm_dtype=", name,
                   " (autocast) needs float32 weights (fp32 master weights), got ", weight.scalar_type());
}

at::ScalarType state_dtype(at::ScalarType param) { return param == at::kDouble ? at::kDouble : at::kFloat; }

void check_same_device(const Tensor& ref, const Tensor& t, const char* ref_name, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "ffkernels: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on the same device");
}

void check_param(const Tensor& weight, const Tensor& p, const char* name) {
  check_same_device(weight, p, "weight", name);
  TORCH_CHECK_TYPE(p.scalar_type() == weight.scalar_type(), "ffkernels: ", name, " dtype ", p.scalar_type(),
                   " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK(p.is_contiguous(), "ffkernels: ", name, " must be contiguous (it is updated in place)");
}

// Checks the FF inputs and returns contiguous x_pos, x_neg.
std::pair<Tensor, Tensor> check_inputs(const DeviceKernels& k, const Tensor& x_pos, const Tensor& x_neg,
                                       const Tensor& weight, const optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(x_pos.dim() == 2, "ffkernels: x_pos must be 2-D (B, in_features), got shape ", x_pos.sizes());
  TORCH_CHECK_VALUE(x_neg.dim() == 2, "ffkernels: x_neg must be 2-D (B, in_features), got shape ", x_neg.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "ffkernels: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(x_pos.size(0) == x_neg.size(0), "ffkernels: x_pos and x_neg must have the same batch size, got ",
                    x_pos.size(0), " and ", x_neg.size(0));
  TORCH_CHECK_VALUE(x_pos.size(0) >= 1, "ffkernels: the batch is empty (B = 0)");
  TORCH_CHECK_VALUE(x_pos.size(1) == weight.size(1) && x_neg.size(1) == weight.size(1),
                    "ffkernels: in_features mismatch: weight is ", weight.sizes(), " but x_pos is ", x_pos.sizes(),
                    " and x_neg is ", x_neg.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1, "ffkernels: weight must be non-empty, got shape ",
                    weight.sizes());
  check_same_device(weight, x_pos, "weight", "x_pos");
  check_same_device(weight, x_neg, "weight", "x_neg");
  check_weight_dtype(k, weight);
  TORCH_CHECK_TYPE(x_pos.scalar_type() == weight.scalar_type() && x_neg.scalar_type() == weight.scalar_type(),
                   "ffkernels: dtype mismatch: weight is ", weight.scalar_type(), ", x_pos ", x_pos.scalar_type(),
                   ", x_neg ", x_neg.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), "ffkernels: weight must be contiguous (it is updated in place)");
  if (bias.has_value()) {
    const Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), "ffkernels: bias must have shape (",
                      weight.size(0), "), got ", b.sizes());
    check_param(weight, b, "bias");
  }
  return {x_pos.contiguous(), x_neg.contiguous()};
}

void check_state(const Tensor& param, const Tensor& s, const char* name) {
  TORCH_CHECK_VALUE(s.defined() && s.sizes() == param.sizes(), "ffkernels: optimizer state ", name,
                    " must have the parameter's shape ", param.sizes(), ", got ",
                    s.defined() ? s.sizes() : at::IntArrayRef{});
  check_same_device(param, s, "its parameter", name);
  TORCH_CHECK_TYPE(s.scalar_type() == state_dtype(param.scalar_type()), "ffkernels: optimizer state ", name,
                   " must be ", state_dtype(param.scalar_type()), " for ", param.scalar_type(),
                   " parameters, got ", s.scalar_type());
  TORCH_CHECK(s.is_contiguous(), "ffkernels: optimizer state ", name, " must be contiguous");
}

// Checks one parameter's optimizer state; returns the bundle the kernels take (gradient not set yet).
ParamState param_state(const Tensor& param, const optional<Tensor>& s1, const optional<Tensor>& s2,
                       const OptimOptions& o, const std::string& which) {
  ParamState ps;
  ps.param = param;
  if (o.optimizer == Optim::Adam) {
    TORCH_CHECK_VALUE(s1.has_value() && s2.has_value(), "ffkernels: adam needs exp_avg and exp_avg_sq for ", which);
    check_state(param, *s1, ("exp_avg (" + which + ")").c_str());
    check_state(param, *s2, ("exp_avg_sq (" + which + ")").c_str());
    ps.state1 = *s1;
    ps.state2 = *s2;
  } else if (o.momentum != 0.0) {
    TORCH_CHECK_VALUE(s1.has_value(), "ffkernels: sgd with momentum needs a momentum buffer for ", which);
    check_state(param, *s1, ("momentum_buffer (" + which + ")").c_str());
    ps.state1 = *s1;
  }
  return ps;
}

// The running mean r of peer normalization: required iff peer_norm > 0, (N,), the state dtype, weight's device;
// contiguous where it is updated in place (ff_step). Returns it contiguous, or undefined when peer norm is off.
Tensor checked_peer_mean(const LossOptions& o, const Tensor& weight, const OptT& peer_mean, bool in_place) {
  if (o.peer_norm == 0.0) return Tensor();  // ignored if given
  const at::ScalarType want = state_dtype(weight.scalar_type());
  TORCH_CHECK_VALUE(peer_mean.has_value(), "ffkernels: peer_norm > 0 needs peer_mean, the running mean of the "
                    "positive activations: a (", weight.size(0), ") ", want, " tensor (FFLinear keeps it as its buffer "
                    "peer_mean)");
  const Tensor& r = *peer_mean;
  TORCH_CHECK_VALUE(r.dim() == 1 && r.size(0) == weight.size(0), "ffkernels: peer_mean must have shape (",
                    weight.size(0), ") (one per output unit), got ", r.sizes());
  check_same_device(weight, r, "weight", "peer_mean");
  TORCH_CHECK_TYPE(r.scalar_type() == want, "ffkernels: peer_mean must be ", want, " for ", weight.scalar_type(),
                   " weights (the optimizer-state dtype), got ", r.scalar_type());
  TORCH_CHECK(!in_place || r.is_contiguous(), "ffkernels: peer_mean must be contiguous (it is updated in place)");
  return r.contiguous();
}

Tensor checked_grad(const Tensor& param, const Tensor& grad, const std::string& which) {
  TORCH_CHECK_VALUE(grad.sizes() == param.sizes(), "ffkernels: grad_", which, " must have shape ", param.sizes(),
                    ", got ", grad.sizes());
  check_same_device(param, grad, which.c_str(), ("grad_" + which).c_str());
  TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), "ffkernels: grad_", which, " dtype ",
                   grad.scalar_type(), " differs from ", which, " dtype ", param.scalar_type());
  return grad.contiguous();
}


// ---- composing the ops from one device's kernels -----------------------------------------------------

// The kernels' own ATen calls (at::mm, casts) run as written: an enclosing torch.autocast reaches the ops only
// through gemm_dtype in their options (the Python layer sets it), never by recasting the GEMMs inside a kernel.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The bias' gradient is returned as an empty tensor when there is no bias (schemas cannot return None).
Tensor bias_grad_or_empty(const GradResult& r, const Tensor& like) {
  return r.grad_bias.defined() ? r.grad_bias : at::empty({0}, like.options());
}

// grad_weight in the weight's dtype: under autocast the kernels leave it as their bf16/fp16 GEMM wrote it (the fused
// step's update reads that directly); the ff_grad ops return it widened.
GradTuple grad_tuple(const GradResult& r, const Tensor& weight) {
  return {r.loss, r.h_pos, r.h_neg, r.g_pos, r.g_neg, r.grad_weight.to(weight.scalar_type()),
          bias_grad_or_empty(r, weight)};
}

// Checks the optimizer state of weight (and bias) before any work, so that a bad call changes nothing.
std::pair<ParamState, ParamState> checked_states(const Tensor& weight, const optional<Tensor>& bias,
                                                 const optional<Tensor>& s1w, const optional<Tensor>& s2w,
                                                 const optional<Tensor>& s1b, const optional<Tensor>& s2b,
                                                 const OptimOptions& oo) {
  ParamState pw = param_state(weight, s1w, s2w, oo, "weight");
  ParamState pb;
  if (bias.has_value()) pb = param_state(*bias, s1b, s2b, oo, "bias");
  return {pw, pb};
}

// The update half of a fused step: skipped on the device when the loss is not finite. With peer normalization,
// peer_mean <- r' likewise, decided on the device from the loss (no host sync).
StepTuple update_from(const DeviceKernels& k, GradResult r, ParamState pw, ParamState pb, const OptimOptions& oo,
                      const OptT& peer_mean) {
  pw.grad = r.grad_weight;
  k.update(pw, r.loss, oo);
  if (pb.param.defined()) {
    pb.grad = r.grad_bias;
    k.update(pb, r.loss, oo);
  }
  if (r.peer_mean.defined()) peer_mean->copy_(at::where(at::isfinite(r.loss), r.peer_mean, *peer_mean));
  return {r.loss, r.h_pos, r.h_neg, r.g_pos, r.g_neg};
}

// The supervised first layer's inputs after check_labeled: contiguous x, int64 labels, and (off the CPU) a 0-d bool
// tensor, true when a label was out of range.
struct LabeledInputs {
  Tensor x, label_pos, label_neg;
  Tensor out_of_range;  // undefined on the CPU, where the range is checked on the host
};

// Checks x and the labels of the supervised first layer. On the CPU an out-of-range label raises. On a GPU reading the
// range would synchronize with the host at every step (FFNet checks the labels itself and reads the device once per
// step, docs/design.md "Host syncs"), so the labels are clamped into range on the device, which keeps every kernel in
// bounds, and out_of_range is returned for poison_loss: the loss becomes NaN and nothing is updated.
LabeledInputs check_labeled(const DeviceKernels& k, const Tensor& x, const Tensor& label_pos, const Tensor& label_neg,
                            int64_t num_classes, double label_value, const Tensor& weight,
                            const optional<Tensor>& bias) {
  check_inputs(k, x, x, weight, bias);
  TORCH_CHECK_VALUE(num_classes >= 2 && num_classes <= x.size(1), "ffkernels: num_classes must be in [2, ",
                    x.size(1), "] (the labels are written into the first num_classes features), got ", num_classes);
  TORCH_CHECK_VALUE(std::isfinite(label_value), "ffkernels: label_value must be finite, got ", label_value);
  Tensor labels[2];
  const Tensor* given[2] = {&label_pos, &label_neg};
  const char* names[2] = {"label_pos", "label_neg"};
  for (int i = 0; i < 2; ++i) {
    const Tensor& l = *given[i];
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == x.size(0), "ffkernels: ", names[i], " must have shape (",
                      x.size(0), "), got ", l.sizes());
    TORCH_CHECK_TYPE(!at::isFloatingType(l.scalar_type()) && l.scalar_type() != at::kBool, "ffkernels: ", names[i],
                     " must be an integer tensor, got ", l.scalar_type());
    check_same_device(x, l, "x", names[i]);
    labels[i] = l.to(at::kLong).contiguous();
  }
  if (!x.is_cpu()) {
    const Tensor bad = at::logical_or(at::logical_or(labels[0].lt(0), labels[0].ge(num_classes)).any(),
                                      at::logical_or(labels[1].lt(0), labels[1].ge(num_classes)).any());
    return {x.contiguous(), labels[0].clamp(0, num_classes - 1), labels[1].clamp(0, num_classes - 1), bad};
  }
  for (int i = 0; i < 2; ++i) {
    const int64_t lo = labels[i].min().item<int64_t>(), hi = labels[i].max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_classes, "ffkernels: ", names[i], " must lie in [0, ", num_classes,
                      "), got values in [", lo, ", ", hi, "]");
  }
  return {x.contiguous(), labels[0], labels[1], Tensor()};
}

// A step whose labels were out of range (LabeledInputs::out_of_range, on the device) gets a NaN loss, before the
// optimizer's and peer_mean's loss guards read it: nothing is updated, and no host sync is needed to decide it.
GradResult poison_loss(GradResult r, const Tensor& out_of_range) {
  if (out_of_range.defined()) r.loss = r.loss.masked_fill(out_of_range, std::numeric_limits<double>::quiet_NaN());
  return r;
}

// ---- the conv ops' arguments (the messages of ffkernels/backends/contract_conv.py) ---------------------------

// The conv ops' inputs after check_conv: contiguous x_pos, x_neg (undefined for the competitive loss), int64 target
// (competitive only; off the CPU clamped into [0, num_classes)), the geometry, and off the CPU a 0-d bool tensor, true
// when a target label was out of range (for poison_loss; undefined on the CPU, where the range raises).
struct ConvInputs {
  Tensor x_pos, x_neg, target;
  ConvGeom geom;
  Tensor out_of_range;
};

std::string pair_text(c10::IntArrayRef v) { return "(" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ")"; }

// nn.Conv2d's output size along one dimension
int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t span = size + 2 * padding - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

ConvInputs check_conv(const DeviceKernels& k, const LossOptions& o, const Tensor& x_pos, const OptT& x_neg,
                      const OptT& target, const Tensor& weight, const OptT& bias, c10::IntArrayRef stride,
                      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, int64_t num_classes) {
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.numel() > 0, "ffkernels: a conv weight must be a non-empty 4-D "
                    "(out_channels, in_channels/groups, kH, kW) tensor, got ", weight.sizes());
  check_weight_dtype(k, weight);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "ffkernels: stride, padding and dilation must be pairs (h, w), got stride=", stride,
                    ", padding=", padding, ", dilation=", dilation);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 && dilation[0] >= 1 &&
                        dilation[1] >= 1,
                    "ffkernels: stride and dilation must be >= 1 and padding >= 0, got stride=", pair_text(stride),
                    ", padding=", pair_text(padding), ", dilation=", pair_text(dilation));
  const int64_t c_out = weight.size(0);
  TORCH_CHECK_VALUE(groups >= 1 && c_out % groups == 0, "ffkernels: groups=", groups,
                    " must be >= 1 and divide out_channels=", c_out);
  const int64_t c_in = weight.size(1) * groups;
  const bool competitive = o.loss == Loss::Competitive;
  const char* loss_name = kLossNames[static_cast<int>(o.loss)];
  TORCH_CHECK_VALUE(!(competitive && x_neg.has_value()),
                    "ffkernels: the competitive loss has no negatives: pass x_neg=None and the target labels");
  TORCH_CHECK_VALUE(competitive || !target.has_value(), "ffkernels: the ", loss_name,
                    " loss takes positives and negatives, not target labels");
  TORCH_CHECK_VALUE(competitive || x_neg.has_value(), "ffkernels: the ", loss_name,
                    " loss needs x_neg, the negatives (the shape of x_pos)");
  TORCH_CHECK_VALUE(!competitive || target.has_value(), "ffkernels: the competitive loss needs target, one integer "
                    "class label per image");
  const std::pair<const char*, const Tensor*> named[2] = {{competitive ? "x" : "x_pos", &x_pos},
                                                          {"x_neg", x_neg.has_value() ? &*x_neg : nullptr}};
  for (const auto& [name, x] : named) {
    if (x == nullptr) continue;
    TORCH_CHECK_VALUE(x->dim() == 4, "ffkernels: ", name, " must be 4-D (B, C, H, W), got shape ", x->sizes());
    TORCH_CHECK_VALUE(x->size(1) == c_in, "ffkernels: ", name, " has ", x->size(1),
                      " channels but the layer takes in_channels=", c_in);
    check_same_device(weight, *x, "weight", name);
    TORCH_CHECK_TYPE(x->scalar_type() == weight.scalar_type(), "ffkernels: ", name, " has dtype ", x->scalar_type(),
                     " but the layer's weight is ", weight.scalar_type());
    TORCH_CHECK_VALUE(x->size(0) >= 1, "ffkernels: the batch is empty (B = 0)");
  }
  TORCH_CHECK_VALUE(competitive || x_pos.sizes() == x_neg->sizes(),
                    "ffkernels: x_pos and x_neg must have the same shape, got ", x_pos.sizes(), " and ",
                    x_neg->sizes());
  ConvGeom geom;
  for (int d = 0; d < 2; ++d) {
    geom.stride[d] = stride[d];
    geom.padding[d] = padding[d];
    geom.dilation[d] = dilation[d];
    TORCH_CHECK_VALUE(conv_out_size(x_pos.size(2 + d), weight.size(2 + d), stride[d], padding[d], dilation[d]) >= 1,
                      "ffkernels: the kernel ", pair_text(weight.sizes().slice(2)), " (dilation ", pair_text(dilation),
                      ") is larger than the padded input ", pair_text(x_pos.sizes().slice(2)), " + 2*",
                      pair_text(padding));
  }
  geom.groups = groups;
  TORCH_CHECK(weight.is_contiguous(), "ffkernels: weight must be contiguous (it is updated in place)");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c_out, "ffkernels: bias must have shape (", c_out,
                      "), got ", bias->sizes());
    check_param(weight, *bias, "bias");
  }
  TORCH_CHECK_VALUE(o.peer_norm == 0.0,
                    "ffkernels: peer normalization (peer_norm > 0) is for FFLinear; the conv step has none");
  ConvInputs in{x_pos.contiguous(), competitive ? Tensor() : x_neg->contiguous(), Tensor(), geom};
  if (!competitive) return in;
  TORCH_CHECK_VALUE(num_classes >= 2, "ffkernels: the competitive loss needs num_classes (an int >= 2), got ",
                    num_classes);
  TORCH_CHECK_VALUE(c_out % num_classes == 0, "ffkernels: out_channels=", c_out, " must split into num_classes=",
                    num_classes, " equal channel groups (a multiple of num_classes)");
  const Tensor& t = *target;
  TORCH_CHECK_TYPE(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                       t.scalar_type() != at::kBool,
                   "ffkernels: target must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x_pos.size(0), "ffkernels: target must have shape (", x_pos.size(0),
                    "), one label per image, got ", t.sizes());
  check_same_device(x_pos, t, "x", "target");
  in.target = t.to(at::kLong).contiguous();
  if (!x_pos.is_cpu()) {
    // off the CPU the range is not read on the host (a sync at every step): as the labeled ops (check_labeled), the
    // labels are clamped for the kernels and the loss made NaN when one was out of range, so nothing is updated
    in.out_of_range = at::logical_or(in.target.lt(0), in.target.ge(num_classes)).any();
    in.target = in.target.clamp(0, num_classes - 1);
    return in;
  }
  // the CPU reads the labels' range on the host
  const int64_t lo = in.target.min().item<int64_t>(), hi = in.target.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < num_classes, "ffkernels: target labels must be in [0, ", num_classes,
                    "), got ", lo < 0 ? lo : hi);
  return in;
}

}  // namespace

// ---- the ops (ff_ops.h) --------------------------------------------------------------------------------

GradTuple ff_grad_op(const DeviceKernels& k, const Tensor& x_pos, const Tensor& x_neg, const Tensor& weight,
                     const OptT& bias, const OptT& peer_mean, c10::string_view options) {
  const OpOptions o = parse_options(options);
  auto [xp, xn] = check_inputs(k, x_pos, x_neg, weight, bias);
  check_gemm_dtype(k, o.loss, weight);
  const Tensor r = checked_peer_mean(o.loss, weight, peer_mean, /*in_place=*/false);
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  return grad_tuple(k.grad(xp, xn, weight, bias.has_value() ? *bias : Tensor(), r, o.loss), weight);
}

void ff_update_op(const DeviceKernels& k, const Tensor& weight, const OptT& bias, const Tensor& grad_weight,
                  const OptT& grad_bias, const OptT& state1_weight, const OptT& state2_weight, const OptT& state1_bias,
                  const OptT& state2_bias, const OptT& loss, int64_t step, c10::string_view options) {
  const OptimOptions oo = optim_for_step(parse_options(options), step);
  TORCH_CHECK_VALUE(weight.dim() == 2, "ffkernels: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  check_weight_dtype(k, weight);
  TORCH_CHECK(weight.is_contiguous(), "ffkernels: weight must be contiguous (it is updated in place)");
  TORCH_CHECK_VALUE(bias.has_value() == grad_bias.has_value(),
                    "ffkernels: grad_bias must be given exactly when there is a bias");
  if (bias.has_value()) check_param(weight, *bias, "bias");
  auto [pw, pb] = checked_states(weight, bias, state1_weight, state2_weight, state1_bias, state2_bias, oo);
  pw.grad = checked_grad(weight, grad_weight, "weight");
  if (bias.has_value()) pb.grad = checked_grad(*bias, *grad_bias, "bias");
  Tensor guard_loss;
  if (loss.has_value()) {
    TORCH_CHECK_VALUE(loss->numel() == 1, "ffkernels: loss must hold one number, got shape ", loss->sizes());
    check_same_device(weight, *loss, "weight", "loss");
    guard_loss = *loss;
  }
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  k.update(pw, guard_loss, oo);
  if (bias.has_value()) k.update(pb, guard_loss, oo);
}

StepTuple ff_step_op(const DeviceKernels& k, const Tensor& x_pos, const Tensor& x_neg, const Tensor& weight,
                     const OptT& bias, const OptT& state1_weight, const OptT& state2_weight, const OptT& state1_bias,
                     const OptT& state2_bias, const OptT& peer_mean, int64_t step, c10::string_view options) {
  const OpOptions o = parse_options(options);
  const OptimOptions oo = optim_for_step(o, step);
  auto [xp, xn] = check_inputs(k, x_pos, x_neg, weight, bias);
  check_gemm_dtype(k, o.loss, weight);
  auto [pw, pb] = checked_states(weight, bias, state1_weight, state2_weight, state1_bias, state2_bias, oo);
  const Tensor r = checked_peer_mean(o.loss, weight, peer_mean, /*in_place=*/true);
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  return update_from(k, k.grad(xp, xn, weight, bias.has_value() ? *bias : Tensor(), r, o.loss), pw, pb, oo,
                     peer_mean);
}

GradTuple ff_grad_labeled_op(const DeviceKernels& k, const Tensor& x, const Tensor& label_pos, const Tensor& label_neg,
                             int64_t num_classes, double label_value, const Tensor& weight, const OptT& bias,
                             const OptT& peer_mean, c10::string_view options) {
  const OpOptions o = parse_options(options);
  const LabeledInputs in = check_labeled(k, x, label_pos, label_neg, num_classes, label_value, weight, bias);
  check_gemm_dtype(k, o.loss, weight);
  const Tensor r = checked_peer_mean(o.loss, weight, peer_mean, /*in_place=*/false);
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  return grad_tuple(poison_loss(k.grad_labeled(in.x, in.label_pos, in.label_neg, num_classes, label_value, weight,
                                               bias.has_value() ? *bias : Tensor(), r, o.loss),
                                in.out_of_range),
                    weight);
}

StepTuple ff_step_labeled_op(const DeviceKernels& k, const Tensor& x, const Tensor& label_pos, const Tensor& label_neg,
                             int64_t num_classes, double label_value, const Tensor& weight, const OptT& bias,
                             const OptT& state1_weight, const OptT& state2_weight, const OptT& state1_bias,
                             const OptT& state2_bias, const OptT& peer_mean, int64_t step, c10::string_view options) {
  const OpOptions o = parse_options(options);
  const OptimOptions oo = optim_for_step(o, step);
  const LabeledInputs in = check_labeled(k, x, label_pos, label_neg, num_classes, label_value, weight, bias);
  check_gemm_dtype(k, o.loss, weight);
  auto [pw, pb] = checked_states(weight, bias, state1_weight, state2_weight, state1_bias, state2_bias, oo);
  const Tensor r = checked_peer_mean(o.loss, weight, peer_mean, /*in_place=*/true);
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  return update_from(k,
                     poison_loss(k.grad_labeled(in.x, in.label_pos, in.label_neg, num_classes, label_value, weight,
                                                bias.has_value() ? *bias : Tensor(), r, o.loss),
                                 in.out_of_range),
                     pw, pb, oo, peer_mean);
}

GradTuple ff_conv_grad_op(const DeviceKernels& k, const Tensor& x_pos, const OptT& x_neg, const OptT& target,
                          const Tensor& weight, const OptT& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                          c10::IntArrayRef dilation, int64_t groups, int64_t num_classes, c10::string_view options) {
  const OpOptions o = parse_options(options, /*conv=*/true);
  const ConvInputs in =
      check_conv(k, o.loss, x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes);
  check_gemm_dtype(k, o.loss, weight);
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  return grad_tuple(poison_loss(k.conv_grad(in.x_pos, in.x_neg, in.target, weight, bias.has_value() ? *bias : Tensor(),
                                            in.geom, num_classes, o.loss),
                                in.out_of_range),
                    weight);
}

StepTuple ff_conv_step_op(const DeviceKernels& k, const Tensor& x_pos, const OptT& x_neg, const OptT& target,
                          const Tensor& weight, const OptT& bias, const OptT& state1_weight, const OptT& state2_weight,
                          const OptT& state1_bias, const OptT& state2_bias, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, int64_t num_classes,
                          int64_t step, c10::string_view options) {
  const OpOptions o = parse_options(options, /*conv=*/true);
  const OptimOptions oo = optim_for_step(o, step);
  const ConvInputs in =
      check_conv(k, o.loss, x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes);
  check_gemm_dtype(k, o.loss, weight);
  auto [pw, pb] = checked_states(weight, bias, state1_weight, state2_weight, state1_bias, state2_bias, oo);
  c10::DeviceGuard guard(weight.device());
  const NoAutocast no_autocast;
  return update_from(k,
                     poison_loss(k.conv_grad(in.x_pos, in.x_neg, in.target, weight,
                                             bias.has_value() ? *bias : Tensor(), in.geom, num_classes, o.loss),
                                 in.out_of_range),
                     pw, pb, oo, OptT());
}

namespace {
constexpr DeviceKernels kCpuKernels{"CPU", /*half_precision=*/false, &ff_grad_cpu, &ff_update_cpu,
                                    &ff_grad_labeled_cpu, /*bf16_gemm=*/true, &ff_conv_grad_cpu};
}  // namespace

}  // namespace ffk

// The schemas: docs/design.md, "The ops". `options` is FFConfig.op_options; unused state slots are None, and so
// may peer_mean be when peer_norm == 0.
TORCH_LIBRARY(ffkernels, m) {
  m.def(
      "ff_grad(Tensor x_pos, Tensor x_neg, Tensor weight, Tensor? bias, Tensor? peer_mean, str options) "
      "-> (Tensor loss, Tensor h_pos, Tensor h_neg, Tensor g_pos, Tensor g_neg, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "ff_update(Tensor(a!) weight, Tensor(b!)? bias, Tensor grad_weight, Tensor? grad_bias, "
      "Tensor(c!)? state1_weight, Tensor(d!)? state2_weight, Tensor(e!)? state1_bias, Tensor(f!)? state2_bias, "
      "Tensor? loss, int step, str options) -> ()");
  m.def(
      "ff_step(Tensor x_pos, Tensor x_neg, Tensor(a!) weight, Tensor(b!)? bias, Tensor(c!)? state1_weight, "
      "Tensor(d!)? state2_weight, Tensor(e!)? state1_bias, Tensor(f!)? state2_bias, Tensor(g!)? peer_mean, int step, "
      "str options) -> (Tensor loss, Tensor h_pos, Tensor h_neg, Tensor g_pos, Tensor g_neg)");
  // supervised first layer: x_pos/x_neg = x with label_pos/label_neg one-hot (times label_value) in features
  // [0, num_classes)
  m.def(
      "ff_grad_labeled(Tensor x, Tensor label_pos, Tensor label_neg, int num_classes, float label_value, "
      "Tensor weight, Tensor? bias, Tensor? peer_mean, str options) "
      "-> (Tensor loss, Tensor h_pos, Tensor h_neg, Tensor g_pos, Tensor g_neg, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "ff_step_labeled(Tensor x, Tensor label_pos, Tensor label_neg, int num_classes, float label_value, "
      "Tensor(a!) weight, Tensor(b!)? bias, Tensor(c!)? state1_weight, Tensor(d!)? state2_weight, "
      "Tensor(e!)? state1_bias, Tensor(f!)? state2_bias, Tensor(g!)? peer_mean, int step, str options) "
      "-> (Tensor loss, Tensor h_pos, Tensor h_neg, Tensor g_pos, Tensor g_neg)");
  // convolutional FF (CPU kernels, and CUDA kernels in a CUDA build): options is FFConfig.conv_op_options;
  // hinton/symba take x_neg and no target, competitive takes target (B,) class labels and no x_neg (h_neg, g_neg are
  // then empty)
  m.def(
      "ff_conv_grad(Tensor x_pos, Tensor? x_neg, Tensor? target, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int num_classes, str options) "
      "-> (Tensor loss, Tensor h_pos, Tensor h_neg, Tensor g_pos, Tensor g_neg, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "ff_conv_step(Tensor x_pos, Tensor? x_neg, Tensor? target, Tensor(a!) weight, Tensor(b!)? bias, "
      "Tensor(c!)? state1_weight, Tensor(d!)? state2_weight, Tensor(e!)? state1_bias, Tensor(f!)? state2_bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int num_classes, int step, str options) "
      "-> (Tensor loss, Tensor h_pos, Tensor h_neg, Tensor g_pos, Tensor g_neg)");
}

TORCH_LIBRARY_IMPL(ffkernels, CPU, m) { ffk::register_ops<ffk::kCpuKernels>(m); }

// The Python module ffkernels._C: loading it registers the ops above; it also says how it was built.
#ifndef FF_CUDA_ARCHS
#define FF_CUDA_ARCHS ""
#endif

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ffkernels compiled kernels", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef FF_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", FF_CUDA_ARCHS);
  return m;
}

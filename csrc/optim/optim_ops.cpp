// The optimizer ops: schemas, argument checks and the CPU registrations.
//
//   fastnn::adam_step_            one Adam/AdamW step over tensor lists (mutates, returns nothing)
//   fastnn::sgd_step_             one SGD step over tensor lists
//   fastnn::grad_norm_clip_coef   global gradient norm and the clip_grad_norm_ factor
//
// Fake kernels and the Python API live in fastnn/ops/optim.py; the reference implementations
// with the same signatures in fastnn/reference/optim.py.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "optim/optim.h"

namespace fastnn {
namespace optim {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// The step writes `t`: it must not have elements that share memory (an expanded tensor), or the
// copy back from a dense copy fails halfway through, after other tensors were updated.
bool writable(const at::Tensor& t) { return at::has_internal_overlap(t) != at::MemOverlap::Yes; }

void check_like(const at::Tensor& t, const at::Tensor& param, bool written, const char* list_name,
                const char* state_key, const SlotNamer& name) {
  FASTNN_CHECK_ARG(t.defined(), name(list_name, state_key), "a tensor", "None");
  FASTNN_CHECK_ARG(!t.is_sparse(), name(list_name, state_key),
                   "a dense tensor (sparse gradients are not supported; use torch.optim.SparseAdam)",
                   "a sparse tensor");
  FASTNN_CHECK_ARG(t.device() == param.device() && t.scalar_type() == param.scalar_type() &&
                       t.sizes() == param.sizes(),
                   name(list_name, state_key),
                   "the shape, dtype and device of its parameter (" + describe(param) + ")",
                   describe(t));
  FASTNN_CHECK_ARG(!written || writable(t), name(list_name, state_key),
                   "a tensor whose elements do not share memory (the step writes it; an expanded "
                   "tensor cannot be written)",
                   describe(t) + " with strides " + c10::str(t.strides()));
}

void check_scalar(const at::Tensor& t, const char* name, const at::Device& device) {
  if (!t.defined()) return;
  FASTNN_CHECK_ARG(t.numel() == 1 && t.scalar_type() == at::kFloat, name,
                   "a float32 tensor with one element", describe(t));
  // A CPU scalar is read on the host; a device scalar must be on the parameters' device.
  FASTNN_CHECK_ARG(t.device().is_cpu() || t.device() == device, name,
                   "a tensor on the CPU or on " + device.str(), describe(t));
}

}  // namespace

bool needs_contiguous_copy(const Slot& s) {
  if (!s.param.is_non_overlapping_and_dense()) return true;
  const at::Tensor* others[] = {&s.grad, &s.exp_avg, &s.exp_avg_sq, &s.max_exp_avg_sq};
  for (const at::Tensor* t : others) {
    if (t->defined() && t->strides() != s.param.strides()) return true;
  }
  return false;
}

void with_contiguous(std::vector<Slot>& slots, bool unscale,
                     const std::function<void(std::vector<Slot>&)>& fn) {
  bool any = false;
  for (const Slot& s : slots) any = any || needs_contiguous_copy(s);
  if (!any) return fn(slots);
  std::vector<Slot> dense = slots;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (!needs_contiguous_copy(slots[i])) continue;
    for (auto member : {&Slot::param, &Slot::grad, &Slot::exp_avg, &Slot::exp_avg_sq,
                        &Slot::max_exp_avg_sq}) {
      const at::Tensor& t = slots[i].*member;
      if (t.defined()) dense[i].*member = t.contiguous();
    }
  }
  fn(dense);
  for (size_t i = 0; i < slots.size(); ++i) {
    for (auto member : {&Slot::param, &Slot::grad, &Slot::exp_avg, &Slot::exp_avg_sq,
                        &Slot::max_exp_avg_sq}) {
      if (member == &Slot::grad && !unscale) continue;  // read only: nothing to copy back
      at::Tensor& t = slots[i].*member;
      const at::Tensor& d = dense[i].*member;
      if (t.defined() && !d.is_same(t)) t.copy_(d);
    }
  }
}

// lr and weight_decay take any value at the step, as in torch.optim, whose constructors check
// them but whose steps run whatever a schedule or the user set since.
void validate_groups(Kind kind, const std::vector<Group>& groups) {
  for (const Group& g : groups) {
    if (g.lr_tensor.defined()) {
      FASTNN_CHECK_ARG(g.lr_tensor.numel() == 1 && at::isFloatingType(g.lr_tensor.scalar_type()),
                       "lr_tensor", "a floating-point tensor with one element",
                       describe(g.lr_tensor));
    }
    if (kind == Kind::Adam) {
      FASTNN_CHECK_ARG(g.beta1 >= 0.0 && g.beta1 < 1.0, "beta1", "a value in [0, 1)",
                       std::to_string(g.beta1));
      FASTNN_CHECK_ARG(g.beta2 >= 0.0 && g.beta2 < 1.0, "beta2", "a value in [0, 1)",
                       std::to_string(g.beta2));
      FASTNN_CHECK_ARG(g.eps >= 0.0, "eps", "a value >= 0", std::to_string(g.eps));
    } else {
      FASTNN_CHECK_ARG(g.momentum >= 0.0, "momentum", "a value >= 0", std::to_string(g.momentum));
      FASTNN_CHECK_ARG(!g.nesterov || (g.momentum > 0.0 && g.dampening == 0.0), "nesterov",
                       "momentum > 0 and dampening == 0 with Nesterov momentum",
                       "momentum " + std::to_string(g.momentum) + ", dampening " +
                           std::to_string(g.dampening));
    }
  }
}

// A device lr is read by the kernel through its address: it must live on the parameters' device
// (a CPU lr is read on the host).
void validate_lr_tensor(const Group& g, const at::Device& device) {
  if (!g.lr_tensor.defined()) return;
  FASTNN_CHECK_ARG(g.lr_tensor.device().is_cpu() || g.lr_tensor.device() == device, "lr_tensor",
                   "a tensor on the CPU or on " + device.str(), describe(g.lr_tensor));
}

void validate_slot(Kind kind, const Slot& s, bool amsgrad, bool momentum, bool unscale,
                   const SlotNamer& name) {
  FASTNN_CHECK_ARG(s.param.defined(), name("params", nullptr), "a tensor", "None");
  FASTNN_CHECK_ARG(!s.param.is_complex(), name("params", nullptr),
                   "a real floating-point tensor (complex parameters are not supported; view them "
                   "with torch.view_as_real)",
                   describe(s.param));
  FASTNN_CHECK_ARG(supported_dtype(s.param.scalar_type()) && !s.param.is_sparse(),
                   name("params", nullptr), "a dense float32, float64, bfloat16 or float16 tensor",
                   describe(s.param));
  FASTNN_CHECK_ARG(writable(s.param), name("params", nullptr),
                   "a tensor whose elements do not share memory (the step writes it)",
                   describe(s.param) + " with strides " + c10::str(s.param.strides()));
  if (s.grad.defined()) check_like(s.grad, s.param, unscale, "grads", nullptr, name);
  if (kind == Kind::Adam) {
    check_like(s.exp_avg, s.param, true, "exp_avgs", "exp_avg", name);
    check_like(s.exp_avg_sq, s.param, true, "exp_avg_sqs", "exp_avg_sq", name);
    if (amsgrad) check_like(s.max_exp_avg_sq, s.param, true, "max_exp_avg_sqs", "max_exp_avg_sq", name);
    FASTNN_CHECK_ARG(s.step.defined() && s.step.numel() == 1 && s.step.scalar_type() == at::kFloat,
                     name("steps", "step"), "a float32 tensor with one element", describe(s.step));
    FASTNN_CHECK_ARG(s.step.device() == s.param.device(), name("steps", "step"),
                     "a tensor on the parameter's device " + s.param.device().str(),
                     describe(s.step));
  } else if (momentum) {
    check_like(s.exp_avg, s.param, true, "momentum_buffers", "momentum_buffer", name);
  }
}

void validate(Kind kind, const std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling) {
  validate_groups(kind, groups);
  const bool unscale = scaling.grad_scale.defined();
  for (size_t i = 0; i < slots.size(); ++i) {
    const Slot& s = slots[i];
    FASTNN_CHECK_ARG(s.group >= 0 && s.group < (int)groups.size(), "group",
                     "an index below the number of groups (" + std::to_string(groups.size()) + ")",
                     std::to_string(s.group));
    FASTNN_CHECK_ARG(s.grad.defined(), "grads[" + std::to_string(i) + "]", "a tensor", "None");
    validate_slot(kind, s, groups[s.group].amsgrad, groups[s.group].momentum != 0.0, unscale,
                  [i](const char* list_name, const char*) {
                    return std::string(list_name) + "[" + std::to_string(i) + "]";
                  });
    if (i > 0) {
      FASTNN_CHECK_ARG(s.param.device() == slots[0].param.device(), "params[" + std::to_string(i) + "]",
                       "every parameter on one device (" + slots[0].param.device().str() + ")",
                       describe(s.param));
    }
  }
  if (!slots.empty()) {
    validate_scaling(scaling, slots[0].param.device());
    for (const Group& g : groups) validate_lr_tensor(g, slots[0].param.device());
  }
}

void validate_scaling(const Scaling& scaling, const at::Device& device) {
  check_scalar(scaling.grad_scale, "grad_scale", device);
  check_scalar(scaling.found_inf, "found_inf", device);
  check_scalar(scaling.clip_coef, "clip_coef", device);
}

Group make_group(double lr, const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                 double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                 double momentum, double dampening, bool nesterov) {
  return Group{.lr = lr, .lr_tensor = lr_tensor.value_or(at::Tensor()), .beta1 = beta1, .beta2 = beta2,
               .eps = eps, .weight_decay = weight_decay, .amsgrad = amsgrad, .maximize = maximize,
               .decoupled = decoupled, .momentum = momentum, .dampening = dampening,
               .nesterov = nesterov};
}

std::vector<Slot> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList steps, bool amsgrad) {
  const size_t n = params.size();
  auto same_len = [n](at::TensorList l, const char* name) {
    FASTNN_CHECK_ARG(l.size() == n, name, std::to_string(n) + " tensors (one per parameter)",
                     std::to_string(l.size()));
  };
  same_len(grads, "grads");
  same_len(exp_avgs, "exp_avgs");
  same_len(exp_avg_sqs, "exp_avg_sqs");
  same_len(steps, "steps");
  if (amsgrad) {
    same_len(max_exp_avg_sqs, "max_exp_avg_sqs");
  } else {
    FASTNN_CHECK_ARG(max_exp_avg_sqs.empty(), "max_exp_avg_sqs", "an empty list unless amsgrad",
                     std::to_string(max_exp_avg_sqs.size()) + " tensors");
  }
  std::vector<Slot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    slots[i].param = params[i];
    slots[i].grad = grads[i];
    slots[i].exp_avg = exp_avgs[i];
    slots[i].exp_avg_sq = exp_avg_sqs[i];
    if (amsgrad) slots[i].max_exp_avg_sq = max_exp_avg_sqs[i];
    slots[i].step = steps[i];
  }
  return slots;
}

std::vector<Slot> sgd_slots(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, double momentum, bool is_first_step) {
  const size_t n = params.size();
  FASTNN_CHECK_ARG(grads.size() == n, "grads", std::to_string(n) + " tensors (one per parameter)",
                   std::to_string(grads.size()));
  if (momentum != 0.0) {
    FASTNN_CHECK_ARG(momentum_buffers.size() == n, "momentum_buffers",
                     std::to_string(n) + " tensors (one per parameter) when momentum != 0",
                     std::to_string(momentum_buffers.size()));
  } else {
    FASTNN_CHECK_ARG(momentum_buffers.empty(), "momentum_buffers", "an empty list when momentum == 0",
                     std::to_string(momentum_buffers.size()) + " tensors");
  }
  std::vector<Slot> slots(n);
  for (size_t i = 0; i < n; ++i) {
    slots[i].param = params[i];
    slots[i].grad = grads[i];
    if (momentum != 0.0) slots[i].exp_avg = momentum_buffers[i];
    slots[i].first_step = is_first_step;
  }
  return slots;
}

namespace {

Scaling scaling_of(const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf,
                   const c10::optional<at::Tensor>& clip_coef) {
  return Scaling{grad_scale.value_or(at::Tensor()), found_inf.value_or(at::Tensor()),
                 clip_coef.value_or(at::Tensor())};
}

// The ops' kernels differ only in the function that runs the step; one wrapper per op, templated
// on it, serves both dispatch keys.
using StepFn = void (*)(Kind, std::vector<Slot>&, const std::vector<Group>&, const Scaling&);

void run_cpu(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
             const Scaling& scaling) {
  step_cpu(kind, slots, groups, scaling);
}

#ifdef FASTNN_WITH_CUDA
void run_cuda(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling) {
  step_cuda(kind, slots, groups, scaling, /*cache=*/nullptr);
}
#endif

template <StepFn run>
void adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  bool amsgrad, bool maximize, bool decoupled,
                  const c10::optional<at::Tensor>& lr_tensor,
                  const c10::optional<at::Tensor>& grad_scale,
                  const c10::optional<at::Tensor>& found_inf,
                  const c10::optional<at::Tensor>& clip_coef) {
  auto slots = adam_slots(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad);
  std::vector<Group> groups{make_group(lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                        decoupled, 0.0, 0.0, false)};
  Scaling scaling = scaling_of(grad_scale, found_inf, clip_coef);
  validate(Kind::Adam, slots, groups, scaling);
  run(Kind::Adam, slots, groups, scaling);
}

template <StepFn run>
void sgd_step_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                 bool maximize, bool is_first_step, const c10::optional<at::Tensor>& lr_tensor,
                 const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf,
                 const c10::optional<at::Tensor>& clip_coef) {
  auto slots = sgd_slots(params, grads, momentum_buffers, momentum, is_first_step);
  std::vector<Group> groups{make_group(lr, lr_tensor, 0.9, 0.999, 1e-8, weight_decay, false, maximize, false,
                                        momentum, dampening, nesterov)};
  Scaling scaling = scaling_of(grad_scale, found_inf, clip_coef);
  validate(Kind::Sgd, slots, groups, scaling);
  run(Kind::Sgd, slots, groups, scaling);
}

void check_norm_args(at::TensorList grads, double max_norm, double norm_type) {
  FASTNN_CHECK_ARG(max_norm >= 0.0, "max_norm", "a value >= 0", std::to_string(max_norm));
  FASTNN_CHECK_ARG(norm_type == 2.0 || std::isinf(norm_type), "norm_type",
                   "2.0 or inf (other norms: torch.nn.utils.clip_grad_norm_)",
                   std::to_string(norm_type));
  for (size_t i = 0; i < grads.size(); ++i) {
    FASTNN_CHECK_ARG(supported_dtype(grads[i].scalar_type()) && !grads[i].is_sparse(),
                     "grads[" + std::to_string(i) + "]",
                     "a dense float32, float64, bfloat16 or float16 tensor", describe(grads[i]));
    FASTNN_CHECK_ARG(grads[i].device() == grads[0].device(), "grads[" + std::to_string(i) + "]",
                     "every gradient on one device (" + grads[0].device().str() + ")",
                     describe(grads[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> grad_norm_clip_coef_cpu(at::TensorList grads, double max_norm,
                                                          double norm_type,
                                                          const c10::optional<at::Tensor>& grad_scale) {
  check_norm_args(grads, max_norm, norm_type);
  return grad_norm_cpu(grads.vec(), max_norm, norm_type, grad_scale.value_or(at::Tensor()));
}

#ifdef FASTNN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> grad_norm_clip_coef_cuda(at::TensorList grads, double max_norm,
                                                           double norm_type,
                                                           const c10::optional<at::Tensor>& grad_scale) {
  check_norm_args(grads, max_norm, norm_type);
  return grad_norm_cuda(grads.vec(), max_norm, norm_type, grad_scale.value_or(at::Tensor()),
                        /*cache=*/nullptr);
}
#endif

}  // namespace

}  // namespace optim
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "bool decoupled, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? clip_coef=None) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  m.def(
      "grad_norm_clip_coef(Tensor[] grads, float max_norm, float norm_type=2., "
      "Tensor? grad_scale=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  using namespace fastnn::optim;
  m.impl("adam_step_", &adam_step_op<run_cpu>);
  m.impl("sgd_step_", &sgd_step_op<run_cpu>);
  m.impl("grad_norm_clip_coef", &grad_norm_clip_coef_cpu);
}

#ifdef FASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  using namespace fastnn::optim;
  m.impl("adam_step_", &adam_step_op<run_cuda>);
  m.impl("sgd_step_", &sgd_step_op<run_cuda>);
  m.impl("grad_norm_clip_coef", &grad_norm_clip_coef_cuda);
}
#endif

// Host-side interface of fastnn's optimizer kernels (Adam/AdamW, SGD, gradient norm), shared by
// the op registrations (optim_ops.cpp), the CPU kernels (optim_cpu.cpp), the CUDA kernels
// (kernels/cuda/optim/optim_cuda.cu) and the optimizers' step plan (plan.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <tuple>
#include <vector>

namespace fastnn {
namespace optim {

enum class Kind : int { Adam = 0, Sgd = 1 };

// Hyperparameters of one parameter group.
struct Group {
  double lr = 0.0;
  at::Tensor lr_tensor;  // 0-dim; used instead of lr when defined (read on the device for CUDA)
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false, maximize = false, decoupled = false;
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false;
};

// One parameter and its state. Unused slots stay undefined.
struct Slot {
  at::Tensor param, grad;
  at::Tensor exp_avg;         // Adam: first moment. SGD: momentum buffer (when momentum != 0)
  at::Tensor exp_avg_sq;      // Adam
  at::Tensor max_exp_avg_sq;  // Adam with amsgrad
  at::Tensor step;            // Adam: float32 scalar, incremented by the step
  int group = 0;
  bool first_step = false;    // SGD: the momentum buffer is set to the gradient
};

// GradScaler and clipping inputs: optional float32 scalars on the parameters' device.
struct Scaling {
  at::Tensor grad_scale;  // gradients are divided by it (and written back unscaled)
  at::Tensor found_inf;   // nonzero: the whole step is skipped
  at::Tensor clip_coef;   // gradients are multiplied by it for the update (not written back)
};

// Argument checks; each raises a ValueError naming the argument, the expected and the received.
// validate() checks a whole call; the plan checks groups each step and a slot when it is set.
void validate(Kind kind, const std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling);
void validate_groups(Kind kind, const std::vector<Group>& groups);
void validate_slot(Kind kind, const Slot& s, size_t index, bool amsgrad, bool momentum);
void validate_scaling(const Scaling& scaling, const at::Device& device);

// The kernels run over raw memory, so every tensor of a slot must be dense with the parameter's
// strides. with_contiguous runs `fn` on slots where any other tensor is replaced by a contiguous
// copy, and copies those back after.
bool needs_contiguous_copy(const Slot& s);
void with_contiguous(std::vector<Slot>& slots, const std::function<void(std::vector<Slot>&)>& fn);

void step_cpu(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling);
std::tuple<at::Tensor, at::Tensor> grad_norm_cpu(const std::vector<at::Tensor>& grads,
                                                 double max_norm, double norm_type,
                                                 const at::Tensor& grad_scale);

#ifdef FASTNN_WITH_CUDA
// The device table of a previous launch, kept by a caller that steps the same tensors again
// (the optimizers' plan): when the host table is unchanged the device copy is reused, and
// relaunch_cuda runs a step on it without building the host table at all.
struct CudaTableCache {
  std::vector<int64_t> host;
  at::Tensor device;
  int64_t n_tensors = 0, n_chunks = 0;
  bool valid = false;  // set by step_cuda when this holds the table of its launch
};
void step_cuda(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
               const Scaling& scaling, CudaTableCache* cache);
void relaunch_cuda(Kind kind, const CudaTableCache& cache, const std::vector<Group>& groups,
                   const Scaling& scaling, const at::Device& device);
std::tuple<at::Tensor, at::Tensor> grad_norm_cuda(const std::vector<at::Tensor>& grads,
                                                  double max_norm, double norm_type,
                                                  const at::Tensor& grad_scale,
                                                  CudaTableCache* cache);
#endif

// Builds slots from the ops' tensor lists (checking the list lengths).
std::vector<Slot> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList steps, bool amsgrad);
std::vector<Slot> sgd_slots(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, double momentum, bool is_first_step);

}  // namespace optim
}  // namespace fastnn

// Host-side interface of fastnn's optimizer kernels (Adam/AdamW, SGD, gradient norm), shared by
// the op registrations (optim_ops.cpp), the CPU kernels (isa/optim_cpu.cpp, one copy per
// instruction-set variant, called through cpu_dispatch.cpp), the CUDA kernels
// (kernels/cuda/optim/optim_cuda.cu) and the optimizers' step plan (plan.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_isa.h"

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

// A Group from its fields by name (the pybind constructor of fastnn._C.OptimGroup, and the ops).
Group make_group(double lr, const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                 double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                 double momentum, double dampening, bool nesterov);

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

// How validate_slot names a slot's tensors in its errors: the ops name list entries
// ("exp_avgs[3]"), the optimizers' plan names state entries ("state['exp_avg'] of
// param_groups[0]['params'][3]"). Called only when a check fails.
using SlotNamer = std::function<std::string(const char* list_name, const char* state_key)>;

// Argument checks; each raises a ValueError naming the argument, the expected and the received.
// validate() checks a whole call; the plan checks every slot it gathers, every step (the user may
// have replaced a state tensor or a parameter's .data since the last one). Nothing is changed
// before every slot of a call has passed.
void validate(Kind kind, const std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling);
void validate_groups(Kind kind, const std::vector<Group>& groups);
void validate_slot(Kind kind, const Slot& s, bool amsgrad, bool momentum, bool unscale,
                   const SlotNamer& name);
void validate_scaling(const Scaling& scaling, const at::Device& device);
void validate_lr_tensor(const Group& g, const at::Device& device);

// The kernels run over raw memory, so every tensor of a slot must be dense with the parameter's
// strides. with_contiguous runs `fn` on slots where any other tensor is replaced by a contiguous
// copy, and copies back those the step writes (the gradient only when it is unscaled).
bool needs_contiguous_copy(const Slot& s);
void with_contiguous(std::vector<Slot>& slots, bool unscale,
                     const std::function<void(std::vector<Slot>&)>& fn);

void step_cpu(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling);
std::tuple<at::Tensor, at::Tensor> grad_norm_cpu(const std::vector<at::Tensor>& grads,
                                                 double max_norm, double norm_type,
                                                 const at::Tensor& grad_scale);

// The CPU kernels of one compiled variant of isa/optim_cpu.cpp; step_cpu and grad_norm_cpu call
// those of the CPU instruction-set level in use.
struct CpuKernels {
  void (*step)(Kind, std::vector<Slot>&, const std::vector<Group>&, const Scaling&);
  std::tuple<at::Tensor, at::Tensor> (*grad_norm)(const std::vector<at::Tensor>&, double, double, const at::Tensor&);
};
FASTNN_ISA_DECLARE(CpuKernels, cpu_kernels)

#ifdef FASTNN_WITH_CUDA
// The device copy of a launch's tensor table, kept by a caller that steps the same tensors again
// (the optimizers' plan). It is keyed on the whole host table (every address, size, dtype, group
// and flag), which is rebuilt and compared each step: a changed tensor always re-uploads, and an
// unchanged model pays no host-to-device copy.
struct CudaTableCache {
  std::vector<int64_t> host;
  at::Tensor device;
};
// `caches`: one per launch (a launch carries up to 32 parameter groups); null: no caching.
void step_cuda(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
               const Scaling& scaling, std::vector<CudaTableCache>* caches);
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

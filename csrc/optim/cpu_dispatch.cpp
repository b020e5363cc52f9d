// The CPU entry points of the optimizer kernels (optim.h): each calls the copy of
// csrc/optim/isa/optim_cpu.cpp that the CPU instruction-set level in use selects (cpu_isa.h).
// Compiled with no instruction-set flags, as every source outside the isa/ folders.
#include "optim/optim.h"

namespace fastnn {
namespace optim {

void step_cpu(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups, const Scaling& scaling) {
  FASTNN_ISA_SELECT(cpu_kernels).step(kind, slots, groups, scaling);
}

std::tuple<at::Tensor, at::Tensor> grad_norm_cpu(const std::vector<at::Tensor>& grads, double max_norm,
                                                 double norm_type, const at::Tensor& grad_scale) {
  return FASTNN_ISA_SELECT(cpu_kernels).grad_norm(grads, max_norm, norm_type, grad_scale);
}

}  // namespace optim
}  // namespace fastnn

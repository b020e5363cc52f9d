// The CPU entry points of the recurrent kernels (rnn.h): each calls the copy of csrc/rnn/isa/ that
// the CPU instruction-set level in use selects (default, avx2 or avx512; cpu_isa.h). Compiled with
// no instruction-set flags, as every source outside the isa/ folders.
#include <type_traits>

#include "rnn/rnn.h"

namespace fastnn {
namespace rnn {
namespace {

const CpuKernels& kernels() { return FASTNN_ISA_SELECT(cpu_kernels); }

}  // namespace

void packed_forward_cpu(const PackedForward& f) { kernels().packed_forward(f); }

void matvec_cpu(const float* w, int64_t R, int64_t K, const float* x, float* y) { kernels().matvec(w, R, K, x, y); }

template <typename T>
void step_forward_cpu(const FwdStep<T>& s) {
  if constexpr (std::is_same_v<T, float>) {
    kernels().step_forward_f32(s);
  } else {
    kernels().step_forward_f64(s);
  }
}

template <typename T>
void step_backward_cpu(const BwdStep<T>& s) {
  if constexpr (std::is_same_v<T, float>) {
    kernels().step_backward_f32(s);
  } else {
    kernels().step_backward_f64(s);
  }
}

template void step_forward_cpu<float>(const FwdStep<float>&);
template void step_forward_cpu<double>(const FwdStep<double>&);
template void step_backward_cpu<float>(const BwdStep<float>&);
template void step_backward_cpu<double>(const BwdStep<double>&);

}  // namespace rnn
}  // namespace fastnn

// The step-by-step CPU path of the recurrent ops: one step's pointwise kernel (cpu_step.h), parallel
// over batch rows with one at::parallel_for; rnn_engine.cpp runs the recurrent GEMM before it.
// Compiled once per instruction-set variant (cpu_isa.h); cpu_dispatch.cpp calls the active one.
#include <ATen/Parallel.h>

#include "rnn/isa/cpu_step.h"

namespace fastnn {
namespace rnn {
FASTNN_ISA_BEGIN
namespace cpu {

template <typename T>
void step_forward(const FwdStep<T>& s) {
  at::parallel_for(0, s.B, grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) forward_block<T>(s, b, 0, s.H);
  });
}

template <typename T>
void step_backward(const BwdStep<T>& s) {
  at::parallel_for(0, s.B, grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) backward_row<T>(s, b);
  });
}

template void step_forward<float>(const FwdStep<float>&);
template void step_forward<double>(const FwdStep<double>&);
template void step_backward<float>(const BwdStep<float>&);
template void step_backward<double>(const BwdStep<double>&);

}  // namespace cpu
FASTNN_ISA_END
}  // namespace rnn
}  // namespace fastnn

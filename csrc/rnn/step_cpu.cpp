// The step-by-step CPU path of the recurrent ops: one step's pointwise kernel (cpu_step.h), parallel
// over batch rows with one at::parallel_for; rnn_engine.cpp runs the recurrent GEMM before it.
#include <ATen/Parallel.h>

#include "rnn/cpu_step.h"

namespace fastnn {
namespace rnn {

template <typename T>
void step_forward_cpu(const FwdStep<T>& s) {
  at::parallel_for(0, s.B, cpu::grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) cpu::forward_block<T>(s, b, 0, s.H);
  });
}

template <typename T>
void step_backward_cpu(const BwdStep<T>& s) {
  at::parallel_for(0, s.B, cpu::grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) cpu::backward_row<T>(s, b);
  });
}

template void step_forward_cpu<float>(const FwdStep<float>&);
template void step_forward_cpu<double>(const FwdStep<double>&);
template void step_backward_cpu<float>(const BwdStep<float>&);
template void step_backward_cpu<double>(const BwdStep<double>&);

}  // namespace rnn
}  // namespace fastnn

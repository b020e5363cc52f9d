// The CPU work of the int8 Linear and recurrences, on raw buffers: the ops in quantized_cpu.cpp
// check and allocate, then call the copy of csrc/quantized/isa/int8_cpu.cpp that the CPU
// instruction-set level in use selects (cpu_isa.h). That file holds the arithmetic, which the
// header comment there describes.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace fastnn {
namespace quantized {

// y [M, N] = x [M, K] (fp32, rows contiguous) times w [N, K]^T (int8, per-row scales w_scale [N]),
// plus bias [N] (or null); activations int8 per row unless weight_only.
struct LinearArgs {
  const float* x;
  int64_t M, K;
  const int8_t* w;
  const float* w_scale;
  const float* bias;
  int64_t N;
  bool weight_only;
  float* y;
};

enum class Kind : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

// One layer and direction over a time-major sequence. `out` [T, B, P] must hold zeros (rows past a
// sequence's length stay zero); h [B, P] (and c [B, H], LSTM) hold the initial state and receive the
// final one. Gates i, f, g, o (LSTM) or r, z, n (GRU) in torch's order. P is the size of h: H, or
// an LSTM's proj_size, when h = W_hr (o * tanh(c)) as in torch.nn.LSTM(proj_size=P).
struct RecurrenceArgs {
  Kind kind;
  int64_t T, B, I, H, P;
  const float* input;  // [T, B, I]
  const int8_t* w_ih;  // [G, I]
  const float* s_ih;   // [G]
  const int8_t* w_hh;  // [G, P]
  const float* s_hh;   // [G]
  const float* b_ih;   // [G] or null
  const float* b_hh;   // [G] or null
  const int64_t* lengths;  // [B] or null
  bool reverse, weight_only;
  float* out;
  float* h;
  float* c;  // LSTM only
  const int8_t* w_hr;  // [P, H] (LSTM with a projection) or null (then P == H)
  const float* s_hr;   // [P] or null
};

struct Int8CpuKernels {
  void (*linear)(const LinearArgs&);
  void (*recurrence)(const RecurrenceArgs&);
};
FASTNN_ISA_DECLARE(Int8CpuKernels, int8_cpu_kernels)

}  // namespace quantized
}  // namespace fastnn

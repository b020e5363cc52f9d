// The vector helpers of the int8 MoE experts (qmoe_cpu.cpp): the gated activation and the per-row
// int8 quantization, written with at::vec in isa/qmoe_vec.cpp and compiled once per
// instruction-set variant (cpu_isa.h); qmoe_cpu.cpp calls the active variant's through this table.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace fastnn {
namespace quantized {

enum class Act { SiLU, GeLU, GeLUTanh, ReLU };

struct MoeVecKernels {
  // h[j] = act(g[j]) * u[j], j < n.
  void (*gated)(Act act, const float* g, const float* u, float* h, int64_t n);
  // Symmetric per-row int8 of x [K]: scale = max|x| / 127 (1 for a zero row), q = round(x / scale)
  // (ties to even). A row with NaN or inf gets zeros and scale NaN, so only its own outputs are NaN.
  void (*quantize_row)(const float* x, int64_t K, int8_t* q, float* scale);
};
FASTNN_ISA_DECLARE(MoeVecKernels, moe_vec_kernels)

}  // namespace quantized
}  // namespace fastnn

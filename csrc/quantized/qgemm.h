// The int8 matrix kernels of the quantized family, one set per instruction set, and the run-time
// choice between them. Plain C++ (no ATen) so that each ISA file can be compiled with its own
// target attribute and still be linked into one library that runs on any x86-64 (or AArch64) CPU,
// and so that tests/cpp/qgemm_test.cpp can test them without libtorch (only qgemm_select.cpp,
// which raises torch errors, needs c10).
//
// Both kernels compute rows m in [0, M) against weight rows n in [n0, n1) of a row-major [N, K]
// int8 matrix B (torch.nn's weight layout: one row per output channel):
//   s8s8:  C[m, n] = sum_k A[m, k] * B[n, k]   (A int8 in [-127, 127], exact int32 accumulation)
//   f32s8: C[m, n] = sum_k A[m, k] * B[n, k]   (A float32, B dequantized as read, fp32 sums)
// A in [-127, 127] is a precondition the callers guarantee (they produce A by quantizing); B may
// hold any int8 value, -128 included.
#pragma once

#include <cstdint>

namespace fastnn {
namespace quantized {

using S8S8Kernel = void (*)(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int32_t* C,
                            int64_t ldc, int64_t M, int64_t n0, int64_t n1, int64_t K);
using F32S8Kernel = void (*)(const float* A, int64_t lda, const int8_t* B, int64_t ldb, float* C,
                             int64_t ldc, int64_t M, int64_t n0, int64_t n1, int64_t K);

struct Kernels {
  // "default", "avx2", "avx512_vnni" (x86-64), "neon", "neon_dotprod" (AArch64): the values
  // FASTNN_CPU_ISA takes
  const char* name;
  S8S8Kernel s8s8;
  F32S8Kernel f32s8;
};

// Each returns nullptr when the build has no such variant.
const Kernels* portable_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_vnni_kernels();
const Kernels* neon_kernels();
const Kernels* neon_dotprod_kernels();

// Whether this CPU has the AArch64 dot-product instructions (sdot); false on other CPUs.
bool cpu_has_dotprod();

// The variants this CPU can run, best last (at most three on either architecture).
int available_kernels(const Kernels* out[3]);

// The variant in use: that of the CPU instruction-set level in use (cpu_isa.h: FASTNN_CPU_ISA when
// first asked, else the best this CPU runs); set_kernels(name) changes the level for the process,
// the fp32 kernels' variant with it (tests force each one). Implemented in qgemm_select.cpp.
const Kernels& active_kernels();
const Kernels& set_kernels(const char* name);

}  // namespace quantized
}  // namespace fastnn

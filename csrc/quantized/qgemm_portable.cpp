// The portable int8 kernels (plain C++, any CPU) and the list of variants this CPU runs. No ATen
// here (the choice by name, which raises torch errors, is qgemm_select.cpp), so that the C++ test
// program (tests/cpp/qgemm_test.cpp) links these files without libtorch.
#include "quantized/qgemm.h"

namespace fastnn {
namespace quantized {
namespace {

// C[m, n] = sum_k A[m, k] * B[n, k], accumulated in Acc (int32 for int8 A: exact; float otherwise).
template <typename In, typename Acc>
void gemm_portable(const In* A, int64_t lda, const int8_t* B, int64_t ldb, Acc* C, int64_t ldc, int64_t M,
                   int64_t n0, int64_t n1, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const In* a = A + m * lda;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* b = B + n * ldb;
      Acc acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += Acc(a[k]) * Acc(b[k]);
      C[m * ldc + n] = acc;
    }
  }
}

const Kernels kPortable{"default", gemm_portable<int8_t, int32_t>, gemm_portable<float, float>};

}  // namespace

const Kernels* portable_kernels() { return &kPortable; }

int available_kernels(const Kernels* out[3]) {
  int n = 0;
  out[n++] = &kPortable;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // The features of cpu_isa.cpp's levels avx2 and avx512_vnni, so that this list and the levels agree.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2_kernels() && avx2) out[n++] = avx2_kernels();
  if (avx512_vnni_kernels() && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    out[n++] = avx512_vnni_kernels();
#endif
  // Advanced SIMD is part of every AArch64 CPU; the dot-product instructions are optional (Armv8.2,
  // mandatory from Armv8.4), so they are asked of the CPU.
  if (neon_kernels()) out[n++] = neon_kernels();
  if (neon_dotprod_kernels() && cpu_has_dotprod()) out[n++] = neon_dotprod_kernels();
  return n;
}

}  // namespace quantized
}  // namespace fastnn

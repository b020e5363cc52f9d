// AVX-512 VNNI int8 kernel (vpdpbusd: u8 x s8, four products summed straight into int32, no 16-bit
// intermediate), compiled with a target attribute and called only when the CPU reports avx512f,
// avx512bw and avx512vnni. Operands as in the AVX2 kernel: u = |b| (read as unsigned; 128 for
// -128) and s = a * sign(b), exact because |a| <= 127. The weight-only kernel is the AVX2 one.
#include "quantized/qgemm.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && \
    (defined(__clang__) || __GNUC__ >= 8)
#include <immintrin.h>

#define FASTNN_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vnni")))

namespace fastnn {
namespace quantized {

F32S8Kernel avx2_f32s8();

namespace {

FASTNN_VNNI inline __m512i dot64(__m512i acc, __m512i a, __m512i b) {
  const __mmask64 neg = _mm512_movepi8_mask(b);
  const __m512i s = _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a);
  return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(b), s);
}

FASTNN_VNNI void s8s8_vnni(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                           int64_t M, int64_t n0, int64_t n1, int64_t K) {
  const int64_t K64 = K - K % 64;
  const int64_t tail = K - K64;
  const __mmask64 tail_mask = tail ? (~0ULL >> (64 - tail)) : 0;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* a = A + m * lda;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* b = B + n * ldb;
      __m512i acc = _mm512_setzero_si512();
      for (int64_t k = 0; k < K64; k += 64) acc = dot64(acc, _mm512_loadu_si512(a + k), _mm512_loadu_si512(b + k));
      if (tail)  // masked loads read zeros past the end: no out-of-bounds access
        acc = dot64(acc, _mm512_maskz_loadu_epi8(tail_mask, a + K64), _mm512_maskz_loadu_epi8(tail_mask, b + K64));
      C[m * ldc + n] = _mm512_reduce_add_epi32(acc);
    }
  }
}

}  // namespace

const Kernels* avx512_vnni_kernels() {
  static const Kernels k{"avx512_vnni", s8s8_vnni, avx2_f32s8()};
  return k.f32s8 ? &k : nullptr;
}

}  // namespace quantized
}  // namespace fastnn

#else

namespace fastnn {
namespace quantized {
const Kernels* avx512_vnni_kernels() { return nullptr; }
}  // namespace quantized
}  // namespace fastnn

#endif

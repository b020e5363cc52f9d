// AVX2+FMA int8 kernels, compiled with a target attribute (not the build's -m flags) so that one
// library holds them and the portable ones; qgemm_portable.cpp calls them only when the CPU has
// AVX2 and FMA.
//
// u8 x s8 products (vpmaddubsw) saturate at 16 bits when both operands are large, so the operands
// are arranged to stay in range: u = |b| (vpsignb(b, b), read as unsigned, which is right for
// b = -128 too: 128) and s = a * sign(b) (vpsignb(a, b), safe because |a| <= 127). Then u * s = a * b
// and one pair sums to at most 2 * 128 * 127 = 32512 < 32767: no saturation, exact results.
// vpmaddwd by ones widens the pairs to int32.
#include "quantized/qgemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define FASTNN_AVX2 __attribute__((target("avx2,fma")))

namespace fastnn {
namespace quantized {
namespace {

FASTNN_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

FASTNN_AVX2 inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FASTNN_AVX2 inline __m256i dot32(__m256i acc, __m256i a, __m256i b, __m256i ones) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(a, b));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

// One activation row against four weight rows per pass: each activation load serves four dots.
FASTNN_AVX2 void s8s8_avx2(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                           int64_t M, int64_t n0, int64_t n1, int64_t K) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t K32 = K - K % 32;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* a = A + m * lda;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const int8_t* b0 = B + n * ldb;
      const int8_t* b1 = b0 + ldb;
      const int8_t* b2 = b1 + ldb;
      const int8_t* b3 = b2 + ldb;
      __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K32; k += 32) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k));
        c0 = dot32(c0, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + k)), ones);
        c1 = dot32(c1, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + k)), ones);
        c2 = dot32(c2, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b2 + k)), ones);
        c3 = dot32(c3, av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b3 + k)), ones);
      }
      int32_t s0 = hsum_epi32(c0), s1 = hsum_epi32(c1), s2 = hsum_epi32(c2), s3 = hsum_epi32(c3);
      for (int64_t k = K32; k < K; ++k) {
        const int32_t x = a[k];
        s0 += x * b0[k];
        s1 += x * b1[k];
        s2 += x * b2[k];
        s3 += x * b3[k];
      }
      int32_t* c = C + m * ldc + n;
      c[0] = s0;
      c[1] = s1;
      c[2] = s2;
      c[3] = s3;
    }
    for (; n < n1; ++n) {
      const int8_t* b = B + n * ldb;
      __m256i c0 = _mm256_setzero_si256();
      for (int64_t k = 0; k < K32; k += 32)
        c0 = dot32(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k)),
                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k)), ones);
      int32_t s = hsum_epi32(c0);
      for (int64_t k = K32; k < K; ++k) s += int32_t(a[k]) * b[k];
      C[m * ldc + n] = s;
    }
  }
}

FASTNN_AVX2 inline __m256 load8_s8_as_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Weight-only: eight int8 weights widened to fp32 per step, fused multiply-add with fp32 activations.
FASTNN_AVX2 void f32s8_avx2(const float* A, int64_t lda, const int8_t* B, int64_t ldb, float* C, int64_t ldc,
                            int64_t M, int64_t n0, int64_t n1, int64_t K) {
  const int64_t K8 = K - K % 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
      const int8_t* b0 = B + n * ldb;
      const int8_t* b1 = b0 + ldb;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0;
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 av = _mm256_loadu_ps(a + k);
        c0 = _mm256_fmadd_ps(av, load8_s8_as_ps(b0 + k), c0);
        c1 = _mm256_fmadd_ps(av, load8_s8_as_ps(b1 + k), c1);
      }
      float s0 = hsum_ps(c0), s1 = hsum_ps(c1);
      for (int64_t k = K8; k < K; ++k) {
        s0 += a[k] * float(b0[k]);
        s1 += a[k] * float(b1[k]);
      }
      C[m * ldc + n] = s0;
      C[m * ldc + n + 1] = s1;
    }
    for (; n < n1; ++n) {
      const int8_t* b = B + n * ldb;
      __m256 c0 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) c0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8_s8_as_ps(b + k), c0);
      float s = hsum_ps(c0);
      for (int64_t k = K8; k < K; ++k) s += a[k] * float(b[k]);
      C[m * ldc + n] = s;
    }
  }
}

const Kernels kAvx2{"avx2", s8s8_avx2, f32s8_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2; }

// The weight-only kernel of the AVX-512 variant (its int8 kernel is its own).
F32S8Kernel avx2_f32s8() { return f32s8_avx2; }

}  // namespace quantized
}  // namespace fastnn

#else  // not x86-64

namespace fastnn {
namespace quantized {
const Kernels* avx2_kernels() { return nullptr; }
F32S8Kernel avx2_f32s8() { return nullptr; }
}  // namespace quantized
}  // namespace fastnn

#endif

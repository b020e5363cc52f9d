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

// The two kernels differ only in their vector step; the loop around it is shared. A trait gives:
// the element types, the step width, one multiply-accumulate of a step, the horizontal sum.
struct S8S8 {  // int8 x int8 -> int32, 32 products per step
  using In = int8_t;
  using Out = int32_t;
  using Vec = __m256i;
  static constexpr int64_t kStep = 32;
  FASTNN_AVX2 static Vec zero() { return _mm256_setzero_si256(); }
  FASTNN_AVX2 static Vec load_a(const In* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  FASTNN_AVX2 static Vec load_b(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  FASTNN_AVX2 static Vec madd(Vec acc, Vec a, Vec b) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(a, b));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  FASTNN_AVX2 static Out sum(Vec v) { return hsum_epi32(v); }
};

struct F32S8 {  // float x int8 (widened to float) -> float, 8 products per step
  using In = float;
  using Out = float;
  using Vec = __m256;
  static constexpr int64_t kStep = 8;
  FASTNN_AVX2 static Vec zero() { return _mm256_setzero_ps(); }
  FASTNN_AVX2 static Vec load_a(const In* p) { return _mm256_loadu_ps(p); }
  FASTNN_AVX2 static Vec load_b(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  FASTNN_AVX2 static Vec madd(Vec acc, Vec a, Vec b) { return _mm256_fmadd_ps(a, b, acc); }
  FASTNN_AVX2 static Out sum(Vec v) { return hsum_ps(v); }
};

// Sums of four accumulators plus the scalar K tail, stored at dst[0..3].
template <typename Tr>
FASTNN_AVX2 inline void finish4(const typename Tr::Vec (&c)[4], const typename Tr::In* a, const int8_t* b,
                                int64_t ldb, int64_t Kv, int64_t K, typename Tr::Out* dst) {
  using Out = typename Tr::Out;
  for (int j = 0; j < 4; ++j) {
    Out s = Tr::sum(c[j]);
    for (int64_t k = Kv; k < K; ++k) s += Out(a[k]) * Out(b[j * ldb + k]);
    dst[j] = s;
  }
}

// Columns [n, n1) of one activation row: four weight rows per pass (each activation load serves
// four dot products), then one at a time.
template <typename Tr>
FASTNN_AVX2 void gemm_row(const typename Tr::In* a, const int8_t* B, int64_t ldb, typename Tr::Out* c_row,
                          int64_t n, int64_t n1, int64_t Kv, int64_t K) {
  using Out = typename Tr::Out;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* b = B + n * ldb;
    typename Tr::Vec c[4] = {Tr::zero(), Tr::zero(), Tr::zero(), Tr::zero()};
    for (int64_t k = 0; k < Kv; k += Tr::kStep) {
      const typename Tr::Vec av = Tr::load_a(a + k);
      for (int j = 0; j < 4; ++j) c[j] = Tr::madd(c[j], av, Tr::load_b(b + j * ldb + k));
    }
    finish4<Tr>(c, a, b, ldb, Kv, K, c_row + n);
  }
  for (; n < n1; ++n) {
    const int8_t* b = B + n * ldb;
    typename Tr::Vec c0 = Tr::zero();
    for (int64_t k = 0; k < Kv; k += Tr::kStep) c0 = Tr::madd(c0, Tr::load_a(a + k), Tr::load_b(b + k));
    Out s = Tr::sum(c0);
    for (int64_t k = Kv; k < K; ++k) s += Out(a[k]) * Out(b[k]);
    c_row[n] = s;
  }
}

// Two activation rows against four weight rows per pass: each weight load serves two rows and
// each activation load four columns (8 accumulators, within AVX2's 16 registers); the rows and
// columns left over go through gemm_row.
template <typename Tr>
FASTNN_AVX2 void gemm_avx2(const typename Tr::In* A, int64_t lda, const int8_t* B, int64_t ldb,
                           typename Tr::Out* C, int64_t ldc, int64_t M, int64_t n0, int64_t n1, int64_t K) {
  using V = typename Tr::Vec;
  const int64_t Kv = K - K % Tr::kStep;
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    const typename Tr::In* a0 = A + m * lda;
    const typename Tr::In* a1 = a0 + lda;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const int8_t* b = B + n * ldb;
      V c0[4] = {Tr::zero(), Tr::zero(), Tr::zero(), Tr::zero()};
      V c1[4] = {Tr::zero(), Tr::zero(), Tr::zero(), Tr::zero()};
      for (int64_t k = 0; k < Kv; k += Tr::kStep) {
        const V x0 = Tr::load_a(a0 + k), x1 = Tr::load_a(a1 + k);
        for (int j = 0; j < 4; ++j) {
          const V bv = Tr::load_b(b + j * ldb + k);
          c0[j] = Tr::madd(c0[j], x0, bv);
          c1[j] = Tr::madd(c1[j], x1, bv);
        }
      }
      finish4<Tr>(c0, a0, b, ldb, Kv, K, C + m * ldc + n);
      finish4<Tr>(c1, a1, b, ldb, Kv, K, C + (m + 1) * ldc + n);
    }
    gemm_row<Tr>(a0, B, ldb, C + m * ldc, n, n1, Kv, K);
    gemm_row<Tr>(a1, B, ldb, C + (m + 1) * ldc, n, n1, Kv, K);
  }
  for (; m < M; ++m) gemm_row<Tr>(A + m * lda, B, ldb, C + m * ldc, n0, n1, Kv, K);
}

const Kernels kAvx2{"avx2", gemm_avx2<S8S8>, gemm_avx2<F32S8>};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2; }

// The weight-only kernel of the AVX-512 variant (its int8 kernel is its own).
F32S8Kernel avx2_f32s8() { return gemm_avx2<F32S8>; }

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

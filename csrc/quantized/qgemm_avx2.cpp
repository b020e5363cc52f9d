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
#define FASTNN_QGEMM_TARGET FASTNN_AVX2
#include "quantized/qgemm_tile.h"

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

// The two kernels differ only in their vector step; the tiled loop around it is qgemm_tile.h's.
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
  // Per 128-bit half, hadd(hadd(c0, c1), hadd(c2, c3)) holds the four half-sums in order; adding
  // the halves gives the four totals. (Integer sums: any order is exact.)
  FASTNN_AVX2 static void sum4(const Vec (&c)[4], Out* out) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(c[0], c[1]), _mm256_hadd_epi32(c[2], c[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
  }
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

const Kernels kAvx2{"avx2", gemm_tiled<S8S8>, gemm_tiled<F32S8>};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2; }

// The weight-only kernel of the AVX-512 variant (its int8 kernel is its own).
F32S8Kernel avx2_f32s8() { return gemm_tiled<F32S8>; }

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

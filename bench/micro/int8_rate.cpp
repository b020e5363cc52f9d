// What bounds fastnn's int8 products on an x86-64 CPU with AVX2: the rate of the instructions
// themselves (no loads: registers only) against fp32 FMA, and the rate of the avx2 int8 kernel
// (csrc/quantized/qgemm_avx2.cpp) at the shapes the int8 layers use. One thread; pin it to a
// quiet core. Build and run from the repository root:
//
//   g++ -O3 -std=c++17 -Icsrc bench/micro/int8_rate.cpp \
//       $(ls csrc/quantized/qgemm_*.cpp | grep -v select) -o /tmp/int8_rate && taskset -c 1 /tmp/int8_rate
//
// No -mavx2: the library compiles the int8 kernels portable, with target attributes, and GCC's
// code for them differs with the flags (here -mavx2 made the kernel ~20% slower).
//
// (qgemm_select.cpp needs libtorch: every other qgemm_*.cpp is compiled in.) Each rate is the best
// of five timings; on a shared machine run it a few times.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "quantized/qgemm.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr long kIters = 5000000;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// seconds = the best of five timings of `body` (a macro, not a lambda: a lambda would not inherit
// the function's target attribute, and the intrinsics would not compile in it)
#define BEST_OF_FIVE(seconds, body)                                 \
  do {                                                              \
    seconds = 1e30;                                                 \
    for (int rep_ = 0; rep_ < 5; ++rep_) {                          \
      const Clock::time_point t0_ = Clock::now();                   \
      body;                                                         \
      seconds = std::min(seconds, seconds_since(t0_));              \
    }                                                               \
  } while (0)

// 8 independent chains, so that latency does not bound the rate; 8 accumulators, 4 inputs and 2
// constants stay within the 16 vector registers (more would spill to the stack).
#define KEEP4(r) __asm__ volatile("" : "+x"(r[0]), "+x"(r[1]), "+x"(r[2]), "+x"(r[3]))
#define KEEP8(r) __asm__ volatile("" : "+x"(r[0]), "+x"(r[1]), "+x"(r[2]), "+x"(r[3]), "+x"(r[4]), "+x"(r[5]), \
                                  "+x"(r[6]), "+x"(r[7]))

__attribute__((target("avx2,fma"))) void instruction_rates() {
  __m256i acc[8], x[4];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_set1_epi32(i);
  for (int i = 0; i < 4; ++i) x[i] = _mm256_set1_epi8(static_cast<char>(i + 1));
  const __m256i b = _mm256_set1_epi8(5), ones = _mm256_set1_epi16(1);
  double s;
  BEST_OF_FIVE(s, {
    for (long n = 0; n < kIters; ++n) {
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x[i & 3], b), ones));
      KEEP8(acc);
      KEEP4(x);
    }
  });
  std::printf("vpmaddubsw + vpmaddwd + vpaddd: %.2f G/s = %.1f G int8 multiply-adds/s\n", kIters * 8 / s / 1e9,
              kIters * 8 * 32 / s / 1e9);
  BEST_OF_FIVE(s, {
    for (long n = 0; n < kIters; ++n) {
      for (int i = 0; i < 8; ++i) {
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(x[i & 3], b));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
      }
      KEEP8(acc);
      KEEP4(x);
    }
  });
  std::printf("  with the two vpsignb of the exact s8 x s8 form: %.1f G int8 multiply-adds/s\n", kIters * 8 * 32 / s / 1e9);
  __m256 f[8];
  for (int i = 0; i < 8; ++i) f[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 m = _mm256_set1_ps(1.0000001f);
  BEST_OF_FIVE(s, {
    for (long n = 0; n < kIters; ++n) {
      for (int i = 0; i < 8; ++i) f[i] = _mm256_fmadd_ps(f[i], m, m);
      KEEP8(f);
    }
  });
  std::printf("vfmadd (fp32): %.2f G/s = %.1f G fp32 multiply-adds/s\n", kIters * 8 / s / 1e9, kIters * 8 * 8 / s / 1e9);
  int32_t sink[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(sink), acc[0]);
  float fsink[8];
  _mm256_storeu_ps(fsink, f[0]);
  if (sink[0] == 42 && fsink[0] == 42.f) std::printf(" ");
}

void kernel_rate(int64_t M, int64_t N, int64_t K) {
  const fastnn::quantized::Kernels* k = fastnn::quantized::avx2_kernels();
  std::vector<int8_t> A(M * K), B(N * K);
  std::vector<int32_t> C(M * N);
  for (auto& v : A) v = static_cast<int8_t>(std::rand() % 255 - 127);
  for (auto& v : B) v = static_cast<int8_t>(std::rand() % 256 - 128);
  const long reps = std::max<long>(1, 400000000L / (M * N * K));
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const Clock::time_point t0 = Clock::now();
    for (long i = 0; i < reps; ++i) k->s8s8(A.data(), K, B.data(), K, C.data(), N, M, 0, N, K);
    best = std::min(best, seconds_since(t0) / reps);
  }
  std::printf("avx2 s8s8 kernel M=%ld N=%ld K=%ld: %.1f G int8 multiply-adds/s\n", static_cast<long>(M),
              static_cast<long>(N), static_cast<long>(K), M * N * K / best / 1e9);
}

}  // namespace

int main() {
  if (!fastnn::quantized::avx2_kernels() || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2+FMA\n");
    return 1;
  }
  instruction_rates();
  kernel_rate(1, 1024, 256);   // a batch-1 recurrent step (LSTM H=256)
  kernel_rate(16, 64, 256);    // the blocks of the larger products
  kernel_rate(32, 1024, 256);  // a batch-32 step
}

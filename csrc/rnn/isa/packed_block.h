// The vector blocks of the packed recurrent forward (packed_cpu.cpp): a block is one
// Vectorized<float> of hidden units (kBlock of them). block_products: the recurrent products of a
// block from its packed weights; dot_rows: kBlock rows' dot products with one vector (batch 1, and
// a streaming step's input projection), ending in sum_each. Apart from packed_cpu.cpp so that
// tests/cpp/vec_test.cpp checks them on every instruction set's at::vec, AVX-512's included (under
// emulation: scripts/check_microkernels.sh x86emu). Compiled once per variant, in its namespace.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"

namespace fastnn {
namespace rnn {
FASTNN_ISA_BEGIN
namespace packed {

using at::vec::Vectorized;

// Hidden units per block: one vector of floats (8 in the default and avx2 variants, 16 in avx512,
// 4 with NEON).
constexpr int64_t kBlock = Vectorized<float>::size();

// The packed layout of W_hh [NG*H, K] (pack_weights in packed_cpu.cpp): per block of kBlock hidden
// units, for each k, the NG gates' kBlock weights side by side: [nb][K][NG][kBlock], zero-padded
// past H.

// gh[b, g*H + j0 .. j0+kBlock] (+)= the recurrent products of one block over features [k0, k1), for R
// batch rows starting at b and the NGP gates g0 .. g0+NGP-1 (of NG in the packed layout). `wp` is
// the block's packed slice; `hin` the [B, K] input rows.
template <int NG, int NGP, int R>
inline void block_products(const float* wp, const float* hin, int64_t K, int64_t k0, int64_t k1, int64_t b,
                           int64_t H, int64_t j0, int64_t width, float* gh, bool accumulate, int g0) {
  using V = Vectorized<float>;
  const int64_t G = NG * H;
  V acc[R][NGP];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < NGP; ++g) {
      const float* src = gh + (b + r) * G + (g0 + g) * H + j0;
      acc[r][g] = !accumulate ? V(0.f) : (width == kBlock ? V::loadu(src) : V::loadu(src, (int)width));
    }
  }
  const float* h0 = hin + b * K;
  for (int64_t k = k0; k < k1; ++k) {
    V w[NGP];
    for (int g = 0; g < NGP; ++g) w[g] = V::loadu(wp + (k * NG + g0 + g) * kBlock);
    for (int r = 0; r < R; ++r) {
      const V hv(h0[r * K + k]);
      for (int g = 0; g < NGP; ++g) acc[r][g] = at::vec::fmadd(w[g], hv, acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < NGP; ++g) {
      float* dst = gh + (b + r) * G + (g0 + g) * H + j0;
      if (width == kBlock) {
        acc[r][g].store(dst);
      } else {
        acc[r][g].store(dst, (int)width);
      }
    }
  }
}

// All batch rows of one block over features [k0, k1), NGP gates at a time with R rows: R x NGP
// accumulators, NGP weight vectors and a broadcast fit AVX2's 16 vector registers (AVX-512 has
// 32) with enough independent FMA chains to hide their latency (LSTM: two passes of 2 gates x 4 rows; GRU: 3 x 3).
template <int NG>
void block_all_rows(const float* w, const float* hin, int64_t K, int64_t k0, int64_t k1, int64_t B, int64_t H,
                    int64_t j0, int64_t width, float* gh) {
  constexpr int NGP = NG == 4 ? 2 : NG;
  constexpr int R = NG == 4 ? 4 : 3;
  const bool acc = k0 > 0;
  const int64_t full = B - B % R;
  for (int g0 = 0; g0 < NG; g0 += NGP) {
    for (int64_t b = 0; b < full; b += R) block_products<NG, NGP, R>(w, hin, K, k0, k1, b, H, j0, width, gh, acc, g0);
  }
  // the last rows (all of them at batch 1): every gate at once, for more independent chains
  int64_t b = full;
  for (; b + 2 <= B; b += 2) block_products<NG, NG, 2>(w, hin, K, k0, k1, b, H, j0, width, gh, acc, 0);
  if (b < B) block_products<NG, NG, 1>(w, hin, K, k0, k1, b, H, j0, width, gh, acc, 0);
}

// The kBlock horizontal sums of a[0..kBlock) as one vector. The AVX2 form is written for 8 lanes
// (only the avx2 variant defines CPU_CAPABILITY_AVX2); the AVX-512 form sums each vector, whatever
// its width; the generic form serves any width.
inline Vectorized<float> sum_each(Vectorized<float> (&a)[kBlock]) {
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(kBlock == 8, "the AVX2 horizontal sums are written for 8 lanes");
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: low half [0 1 2 3 | ...] of each 128-bit lane; add the two lanes
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
#elif defined(CPU_CAPABILITY_AVX512)
  // one horizontal sum per vector (16 of them): the generic form's store and 256 scalar adds
  // would cost as much as the dot products themselves
  float out[kBlock];
  for (int r = 0; r < kBlock; ++r) out[r] = _mm512_reduce_add_ps(a[r]);
  return Vectorized<float>::loadu(out);
#else
  float out[kBlock];
  for (int r = 0; r < kBlock; ++r) {
    float v[kBlock];
    a[r].store(v);
    out[r] = 0.f;
    for (int l = 0; l < kBlock; ++l) out[r] += v[l];
  }
  return Vectorized<float>::loadu(out);
#endif
}

// y[r] = w[r, :] . x for the `rows` (at most kBlock) rows of K starting at w: batch 1's recurrent
// product on W_hh in its own row-major layout (nothing repacked), and a streaming step's input
// projection. kBlock rows at a time: kBlock independent FMA chains, one load of x per kBlock weight
// loads, one vector of kBlock sums at the end (kBlock accumulators: 8 of AVX2's 16 registers, 16
// of AVX-512's 32).
inline void dot_rows(const float* w, int64_t K, int64_t rows, const float* x, float* y) {
  using V = Vectorized<float>;
  const float* row[kBlock];
  for (int64_t r = 0; r < kBlock; ++r) row[r] = w + std::min(r, rows - 1) * K;  // past the end: repeat
  V acc[kBlock];
  for (auto& a : acc) a = V(0.f);
  int64_t k = 0;
  for (; k + kBlock <= K; k += kBlock) {
    const V xv = V::loadu(x + k);
    for (int r = 0; r < kBlock; ++r) acc[r] = at::vec::fmadd(V::loadu(row[r] + k), xv, acc[r]);
  }
  if (k < K) {
    const int n = (int)(K - k);
    const V xv = V::loadu(x + k, n);
    for (int r = 0; r < kBlock; ++r) acc[r] = at::vec::fmadd(V::loadu(row[r] + k, n), xv, acc[r]);
  }
  const V sums = sum_each(acc);
  if (rows == kBlock) {
    sums.store(y);
  } else {
    sums.store(y, (int)rows);
  }
}

}  // namespace packed
FASTNN_ISA_END
}  // namespace rnn
}  // namespace fastnn

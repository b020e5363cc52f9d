// The per-row int8 quantization of the int8 Linear and recurrences (isa/int8_cpu.cpp), with
// at::vec: symmetric, scale = max|row| / 127, round half to even as torch.round. Apart from
// int8_cpu.cpp so that tests/cpp/vec_test.cpp checks it on every instruction set's at::vec,
// AVX-512's included (under emulation: scripts/check_microkernels.sh x86emu). Compiled once per
// instruction-set variant, in its namespace (cpu_isa.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_isa.h"

namespace fastnn {
namespace quantized {
FASTNN_ISA_BEGIN
namespace rowq {

using Vec = at::vec::Vectorized<float>;
constexpr float kQmax = 127.f;

// max|x| over one row, or NaN when the row holds NaN or inf (x * 0 is NaN exactly for those).
inline float row_amax(const float* x, int64_t K) {
  Vec vmax(0.f), vbad(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    const Vec v = Vec::loadu(x + k);
    vmax = at::vec::maximum(vmax, v.abs());
    vbad = vbad + v * Vec(0.f);
  }
  float lanes_max[Vec::size()], lanes_bad[Vec::size()];
  vmax.store(lanes_max);
  vbad.store(lanes_bad);
  float amax = 0.f, bad = 0.f;
  for (int64_t l = 0; l < Vec::size(); ++l) {
    amax = std::max(amax, lanes_max[l]);
    bad += lanes_bad[l];
  }
  for (; k < K; ++k) {
    amax = std::max(amax, std::fabs(x[k]));
    bad += x[k] * 0.f;
  }
  return bad == 0.f ? amax : std::numeric_limits<float>::quiet_NaN();
}

// Quantizes one row; returns false (q zeros) when the row is to be computed exactly instead.
inline bool quantize_row(const float* x, int64_t K, float limit, int8_t* q, float* scale) {
  const float amax = row_amax(x, K);
  if (!(amax <= limit)) {  // NaN compares false
    std::fill(q, q + K, int8_t(0));
    *scale = 0.f;
    return false;
  }
  float s = amax / kQmax;
  if (s == 0.f) s = 1.f;  // an all-zero row, or one so small that amax / 127 underflows
  // x / s (not x * (1/s), which rounds differently), rounded half to even as torch.round
  const Vec vs(s), lo(-kQmax), hi(kQmax);
  float lanes[Vec::size()];
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    at::vec::clamp((Vec::loadu(x + k) / vs).round(), lo, hi).store(lanes);
    for (int64_t l = 0; l < Vec::size(); ++l) q[k + l] = static_cast<int8_t>(lanes[l]);
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::min(kQmax, std::max(-kQmax, std::nearbyint(x[k] / s))));
  *scale = s;
  return true;
}

}  // namespace rowq
FASTNN_ISA_END
}  // namespace quantized
}  // namespace fastnn

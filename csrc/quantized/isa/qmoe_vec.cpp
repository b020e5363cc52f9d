// The at::vec helpers of the int8 MoE experts (qmoe_vec.h), compiled once per instruction-set
// variant, in its namespace (cpu_isa.h).
//
// Vector width: Vec::size() floats (8 in the default and avx2 variants, 16 in avx512, 4 with
// NEON); each loop runs whole vectors, then one partial vector (loadu/store with a count), and the
// lane buffers are sized Vec::size().
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_isa.h"
#include "quantized/qmoe_vec.h"

namespace fastnn {
namespace quantized {
FASTNN_ISA_BEGIN
namespace {

using Vec = at::vec::Vectorized<float>;

Vec activate(Act act, Vec x) {
  switch (act) {
    case Act::SiLU:
      return x / (Vec(1.f) + x.neg().exp_u20());
    case Act::GeLU:
      return Vec(0.5f) * x * (Vec(1.f) + (x * Vec(static_cast<float>(M_SQRT1_2))).erf());
    case Act::GeLUTanh: {
      const Vec inner = Vec(0.7978845608028654f) * (x + Vec(0.044715f) * x * x * x);
      return Vec(0.5f) * x * (Vec(1.f) + inner.tanh());
    }
    default:
      return at::vec::clamp_min(x, Vec(0.f));
  }
}

void gated(Act act, const float* g, const float* u, float* h, int64_t n) {
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (activate(act, Vec::loadu(g + j)) * Vec::loadu(u + j)).store(h + j);
  if (j < n) {
    const int64_t r = n - j;
    (activate(act, Vec::loadu(g + j, r)) * Vec::loadu(u + j, r)).store(h + j, r);
  }
}

void quantize_row(const float* x, int64_t K, int8_t* q, float* scale) {
  Vec vmax(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + k).abs());
  float amax = 0.f;
  float lanes[Vec::size()];
  vmax.store(lanes);
  for (int64_t i = 0; i < Vec::size(); ++i) amax = std::isnan(lanes[i]) || amax < lanes[i] ? lanes[i] : amax;
  for (; k < K; ++k) amax = std::isnan(x[k]) || amax < std::fabs(x[k]) ? std::fabs(x[k]) : amax;
  if (!std::isfinite(amax)) {
    std::fill(q, q + K, int8_t(0));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float s = amax == 0.f ? 1.f : amax / 127.f;
  const Vec vs(s), lo(-127.f), hi(127.f);
  float buf[Vec::size()];
  for (k = 0; k < K; k += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), K - k);
    at::vec::clamp(Vec::loadu(x + k, n) / vs, lo, hi).round().store(buf, n);
    for (int64_t i = 0; i < n; ++i) q[k + i] = static_cast<int8_t>(static_cast<int32_t>(buf[i]));
  }
  *scale = s;
}

const MoeVecKernels kKernels{gated, quantize_row};

}  // namespace

const MoeVecKernels& moe_vec_kernels() { return kKernels; }

FASTNN_ISA_END
}  // namespace quantized
}  // namespace fastnn

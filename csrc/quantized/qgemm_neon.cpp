// AArch64 Advanced SIMD (NEON) int8 kernels, and the CPU's dot-product feature test. NEON is part
// of every AArch64 CPU, so these need no target attribute; the sdot kernel, which needs an optional
// extension, is qgemm_neon_dotprod.cpp. On other architectures this file defines only stubs.
//
// s8s8 without sdot: smull/smlal2 multiply 8 int8 pairs into int16 lanes and add a second 8; then
// sadalp adds adjacent int16 lanes into the int32 accumulator. Each int16 lane holds two products,
// each at most 128 * 127 = 16256 in magnitude because A is in [-127, 127] (qgemm.h's precondition;
// B may be -128): at most 32512 < 32767, so nothing wraps and the sums are exact. (With A = -128
// too, (-128)^2 * 2 = 32768 would wrap.)
#include "quantized/qgemm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // asm/hwcap.h's bit, for C libraries whose headers lack it
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#define FASTNN_QGEMM_TARGET
#include "quantized/qgemm_tile.h"

namespace fastnn {
namespace quantized {
namespace {

struct S8S8Neon {  // int8 x int8 -> int32, 16 products per step, int16 pairs (see above)
  using In = int8_t;
  using Out = int32_t;
  using Vec = int32x4_t;
  static constexpr int64_t kStep = 16;
  static Vec zero() { return vdupq_n_s32(0); }
  static int8x16_t load_a(const In* p) { return vld1q_s8(p); }
  static int8x16_t load_b(const int8_t* p) { return vld1q_s8(p); }
  static Vec madd(Vec acc, int8x16_t a, int8x16_t b) {
    const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b);
    return vpadalq_s16(acc, p);
  }
  static Out sum(Vec v) { return vaddvq_s32(v); }
};

struct F32x8 {  // eight floats: one step of the weight-only kernel
  float32x4_t lo, hi;
};

struct F32S8Neon {  // float x int8 (widened to float) -> float, 8 products per step
  using In = float;
  using Out = float;
  using Vec = F32x8;
  static constexpr int64_t kStep = 8;
  static Vec zero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
  static Vec load_a(const In* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
  static Vec load_b(const int8_t* p) {
    const int16x8_t w = vmovl_s8(vld1_s8(p));  // 8 bytes: exactly one step
    return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), vcvtq_f32_s32(vmovl_high_s16(w))};
  }
  static Vec madd(Vec acc, Vec a, Vec b) { return {vfmaq_f32(acc.lo, a.lo, b.lo), vfmaq_f32(acc.hi, a.hi, b.hi)}; }
  static Out sum(Vec v) { return vaddvq_f32(vaddq_f32(v.lo, v.hi)); }
};

const Kernels kNeon{"neon", gemm_tiled<S8S8Neon>, gemm_tiled<F32S8Neon>};

}  // namespace

const Kernels* neon_kernels() { return &kNeon; }

// The weight-only kernel of the dot-product variant (sdot has no float form).
F32S8Kernel neon_f32s8() { return gemm_tiled<F32S8Neon>; }

bool cpu_has_dotprod() {
#if defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  int has = 0;
  size_t size = sizeof(has);
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &size, nullptr, 0) == 0 && has != 0;
#else
  return false;  // no portable way to ask: the plain NEON kernel is used
#endif
}

}  // namespace quantized
}  // namespace fastnn

#else  // not AArch64

namespace fastnn {
namespace quantized {
const Kernels* neon_kernels() { return nullptr; }
F32S8Kernel neon_f32s8() { return nullptr; }
bool cpu_has_dotprod() { return false; }
}  // namespace quantized
}  // namespace fastnn

#endif

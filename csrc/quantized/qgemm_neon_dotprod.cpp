// AArch64 int8 kernel with the dot-product extension (sdot: four int8 products summed straight into
// each int32 lane, no 16-bit intermediate, so no range condition on A). The extension is optional
// before Armv8.4, so the kernel is compiled with a target attribute (not the build's -march) and
// called only when the CPU reports it (cpu_has_dotprod, qgemm_neon.cpp). The weight-only kernel is
// the plain NEON one. On other architectures, or with a compiler that cannot target the extension,
// neon_dotprod_kernels() is null.
#include "quantized/qgemm.h"

#if defined(__aarch64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8))
#include <arm_neon.h>

// GCC's arm_neon.h defines vdotq_s32 under arch=armv8.2-a+dotprod; a caller must enable at least
// that to inline it. Every CPU with the extension implements Armv8.2.
#if defined(__ARM_FEATURE_DOTPROD)
#define FASTNN_QGEMM_TARGET
#elif defined(__clang__)
#define FASTNN_QGEMM_TARGET __attribute__((target("dotprod")))
#else
#define FASTNN_QGEMM_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#include "quantized/qgemm_tile.h"

namespace fastnn {
namespace quantized {

F32S8Kernel neon_f32s8();

namespace {

struct S8S8Dot {  // int8 x int8 -> int32, 16 products per step
  using In = int8_t;
  using Out = int32_t;
  using Vec = int32x4_t;
  static constexpr int64_t kStep = 16;
  FASTNN_QGEMM_TARGET static Vec zero() { return vdupq_n_s32(0); }
  FASTNN_QGEMM_TARGET static int8x16_t load_a(const In* p) { return vld1q_s8(p); }
  FASTNN_QGEMM_TARGET static int8x16_t load_b(const int8_t* p) { return vld1q_s8(p); }
  FASTNN_QGEMM_TARGET static Vec madd(Vec acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
  FASTNN_QGEMM_TARGET static Out sum(Vec v) { return vaddvq_s32(v); }
};

}  // namespace

const Kernels* neon_dotprod_kernels() {
  static const Kernels k{"neon_dotprod", gemm_tiled<S8S8Dot>, neon_f32s8()};
  return &k;
}

}  // namespace quantized
}  // namespace fastnn

#else

namespace fastnn {
namespace quantized {
const Kernels* neon_dotprod_kernels() { return nullptr; }
}  // namespace quantized
}  // namespace fastnn

#endif

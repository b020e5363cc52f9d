// The portable int8 kernels (plain C++, any CPU) and the run-time choice of variant.
#include "quantized/qgemm.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace fastnn {
namespace quantized {
namespace {

// C[m, n] = sum_k A[m, k] * B[n, k], accumulated in Acc (int32 for int8 A: exact; float otherwise).
template <typename In, typename Acc>
void gemm_portable(const In* A, int64_t lda, const int8_t* B, int64_t ldb, Acc* C, int64_t ldc, int64_t M,
                   int64_t n0, int64_t n1, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const In* a = A + m * lda;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* b = B + n * ldb;
      Acc acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += Acc(a[k]) * Acc(b[k]);
      C[m * ldc + n] = acc;
    }
  }
}

const Kernels kPortable{"default", gemm_portable<int8_t, int32_t>, gemm_portable<float, float>};

const Kernels* by_name(const std::string& name) {
  const Kernels* all[3];
  const int n = available_kernels(all);
  if (name == "auto" || name.empty()) return all[n - 1];
  for (int i = 0; i < n; ++i)
    if (name == all[i]->name) return all[i];
  std::string have;
  for (int i = 0; i < n; ++i) have += std::string(i ? ", " : "") + all[i]->name;
  TORCH_CHECK_VALUE(false, "fastnn: FASTNN_CPU_ISA / quantized_set_isa: expected auto or one of the variants this "
                    "CPU runs (", have, "), got '", name, "'");
  return nullptr;
}

std::atomic<const Kernels*> g_active{nullptr};

}  // namespace

const Kernels* portable_kernels() { return &kPortable; }

int available_kernels(const Kernels* out[3]) {
  int n = 0;
  out[n++] = &kPortable;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (avx2_kernels() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out[n++] = avx2_kernels();
  if (avx512_vnni_kernels() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    out[n++] = avx512_vnni_kernels();
#endif
  return n;
}

const Kernels& active_kernels() {
  const Kernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    const char* env = std::getenv("FASTNN_CPU_ISA");
    k = by_name(env ? env : "auto");
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

const Kernels& set_kernels(const char* name) {
  const Kernels* k = by_name(name);
  g_active.store(k, std::memory_order_release);
  return *k;
}

}  // namespace quantized
}  // namespace fastnn

// The int8 kernel variant in use: FASTNN_CPU_ISA when first asked, else the best this CPU runs;
// set_kernels() changes it (quantized_set_isa, the tests). An unknown name raises a torch
// ValueError that lists the variants this CPU runs.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "quantized/qgemm.h"

namespace fastnn {
namespace quantized {
namespace {

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

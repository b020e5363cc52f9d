// The CPU instruction-set level in use (cpu_isa.h): detection, FASTNN_CPU_ISA, and the ops that
// report and change it:
//   fastnn::cpu_isa() -> str            the level in use
//   fastnn::cpu_isas() -> str[]         the levels this CPU runs, lowest first
//   fastnn::cpu_set_isa(str) -> str     use another level; returns the one that was in use
// (fastnn::quantized_isa / quantized_isas / quantized_set_isa, the int8 family's names for the
// same switch, go through quantized::set_kernels, which is set_level.)
#include "cpu_isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "quantized/qgemm.h"

namespace fastnn {
namespace cpu_isa {
namespace {


// The ladder of this architecture, lowest first, each with what the CPU must have. The fp32
// variant of a level is the widest at::vec copy its features allow; the int8 one the best int8
// kernel (AVX-512 without VNNI has no faster int8 kernel than AVX2's).
std::vector<Level> runnable() {
  std::vector<Level> out;
  out.push_back({"default", Fp32::Default, quantized::portable_kernels()});
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  if (quantized::avx2_kernels() && avx2) out.push_back({"avx2", Fp32::Avx2, quantized::avx2_kernels()});
  if (quantized::avx2_kernels() && avx512) out.push_back({"avx512", Fp32::Avx512, quantized::avx2_kernels()});
  if (quantized::avx512_vnni_kernels() && vnni)
    out.push_back({"avx512_vnni", Fp32::Avx512, quantized::avx512_vnni_kernels()});
#endif
  // Advanced SIMD is part of every AArch64 CPU (and at::vec uses it in the default variant); the
  // dot-product instructions are optional.
  if (quantized::neon_kernels()) out.push_back({"neon", Fp32::Default, quantized::neon_kernels()});
  if (quantized::neon_dotprod_kernels() && quantized::cpu_has_dotprod())
    out.push_back({"neon_dotprod", Fp32::Default, quantized::neon_dotprod_kernels()});
  return out;
}

const std::vector<Level>& levels() {
  static const std::vector<Level> all = runnable();
  return all;
}

const Level* by_name(const std::string& name) {
  std::string lower = name;  // level names are case-insensitive
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  const std::vector<Level>& all = levels();
  if (lower == "auto" || lower.empty()) return &all.back();
  for (const Level& l : all)
    if (lower == l.name) return &l;
  std::string have;
  for (size_t i = 0; i < all.size(); ++i) have += std::string(i ? ", " : "") + all[i].name;
  TORCH_CHECK_VALUE(false, "fastnn: FASTNN_CPU_ISA / set_isa: expected auto or one of the instruction sets this "
                    "CPU runs (", have, "), got '", name, "'");
  return nullptr;
}

std::atomic<const Level*> g_active{nullptr};

}  // namespace

int available_levels(const Level* out[kMaxLevels]) {
  int n = 0;
  for (const Level& l : levels())
    if (n < kMaxLevels) out[n++] = &l;
  return n;
}

const Level& active_level() {
  const Level* l = g_active.load(std::memory_order_acquire);
  if (l == nullptr) {
    const char* env = std::getenv("FASTNN_CPU_ISA");
    l = by_name(env ? env : "auto");
    g_active.store(l, std::memory_order_release);
  }
  return *l;
}

const Level& set_level(const char* name) {
  const Level* l = by_name(name);
  g_active.store(l, std::memory_order_release);
  return *l;
}

std::string exchange_level(const char* name) {
  const Level* before = g_active.load(std::memory_order_acquire);
  std::string previous = "auto";
  if (before != nullptr) {
    previous = before->name;
  } else {
    try {
      previous = active_level().name;
    } catch (const c10::Error&) {  // a bad FASTNN_CPU_ISA: the level asked for now replaces it
    }
  }
  set_level(name);
  return previous;
}

Fp32 fp32_variant() { return active_level().fp32; }

namespace {

std::string isa() { return active_level().name; }

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const Level& l : levels()) names.emplace_back(l.name);
  return names;
}

std::string set_isa(c10::string_view name) { return exchange_level(std::string(name.data(), name.size()).c_str()); }

}  // namespace
}  // namespace cpu_isa
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def("cpu_isa() -> str", &fastnn::cpu_isa::isa);
  m.def("cpu_isas() -> str[]", &fastnn::cpu_isa::isas);
  m.def("cpu_set_isa(str name) -> str", &fastnn::cpu_isa::set_isa);
}

// The CPU instruction-set ladder of fastnn's CPU kernels, chosen at run time (torch's CPU_CAPABILITY
// dispatch, for fastnn's own kernels).
//
// Levels, each runnable only where the CPU has its features (cpu_isa.cpp detects them):
//   x86-64:   default < avx2 (AVX2+FMA+F16C) < avx512 (AVX-512 F/BW/VL/DQ) < avx512_vnni (+VNNI)
//   AArch64:  default < neon < neon_dotprod
// Each level names the variant of two kernel sets:
//   - the fp32/bf16 kernels written with at::vec (csrc/<family>/isa/*.cpp), which setup.py compiles
//     once per variant: default, avx2, avx512 on x86-64 (default only elsewhere: at::vec is NEON
//     there without flags), each into its own namespace (FASTNN_ISA_BEGIN below);
//   - the int8 GEMM kernels (quantized/qgemm.h), compiled with target attributes.
// The level in use is FASTNN_CPU_ISA (auto or a level name; read when first needed), else the best
// this CPU runs; set_level changes it for the process (fastnn::quantized_set_isa, cpu_set_isa).
#pragma once

#include <string>

namespace fastnn {

namespace quantized {
struct Kernels;
}

namespace cpu_isa {

// The fp32 kernel variants, one per compiled copy of the isa/ sources.
enum class Fp32 : int { Default = 0, Avx2 = 1, Avx512 = 2 };

struct Level {
  const char* name;
  Fp32 fp32;
  const quantized::Kernels* int8;
};

// The levels this CPU runs, lowest first; returns how many (at most kMaxLevels).
constexpr int kMaxLevels = 4;
int available_levels(const Level* out[kMaxLevels]);

// The level in use (see above), and the change of it: an unknown name or one this CPU cannot run
// raises a ValueError that lists the levels it runs. "auto" is the best this CPU runs.
const Level& active_level();
const Level& set_level(const char* name);
// set_level, returning the name of the level before it; "auto" when none was chosen yet and
// FASTNN_CPU_ISA names no level this CPU runs, so that setting a valid level recovers from a bad
// environment variable instead of raising its error again.
std::string exchange_level(const char* name);

// The fp32 variant of the active level (an atomic load; the family dispatchers call it per call).
Fp32 fp32_variant();

// The table of the active fp32 variant among one family's three (select(isa_default::fn, ...)).
template <typename Table>
const Table& select(const Table& (*default_fn)(), const Table& (*avx2_fn)(), const Table& (*avx512_fn)()) {
  switch (fp32_variant()) {
    case Fp32::Avx512: return avx512_fn();
    case Fp32::Avx2: return avx2_fn();
    default: return default_fn();
  }
}

}  // namespace cpu_isa
}  // namespace fastnn

// Every definition of an isa/ source lies in a namespace of its variant (fastnn::rnn::isa_avx2,
// ...), inline functions and templates included: otherwise the linker, which keeps one copy of each
// inline function, could merge an AVX2 copy with the portable one. setup.py defines FASTNN_ISA
// (default, avx2, avx512) for each copy; without it (tests/cpp/vec_test.cpp compiles the headers
// alone) the namespace is left out.
#define FASTNN_ISA_CAT2(a, b) a##b
#define FASTNN_ISA_CAT(a, b) FASTNN_ISA_CAT2(a, b)
#ifdef FASTNN_ISA
#define FASTNN_ISA_NS FASTNN_ISA_CAT(isa_, FASTNN_ISA)
#define FASTNN_ISA_BEGIN namespace FASTNN_ISA_NS {
#define FASTNN_ISA_END }
#else
#define FASTNN_ISA_BEGIN
#define FASTNN_ISA_END
#endif

// Declares a family's table getter `const Table& fn()` in each variant's namespace (inside the
// family's namespace), and FASTNN_ISA_SELECT(fn) picks the active one. Only the default variant
// exists off x86-64.
#define FASTNN_ISA_DECLARE(Table, fn) \
  namespace isa_default {             \
  const Table& fn();                  \
  }                                   \
  namespace isa_avx2 {                \
  const Table& fn();                  \
  }                                   \
  namespace isa_avx512 {              \
  const Table& fn();                  \
  }
#if defined(__x86_64__) || defined(_M_X64)
#define FASTNN_ISA_SELECT(fn) ::fastnn::cpu_isa::select(isa_default::fn, isa_avx2::fn, isa_avx512::fn)
#else
#define FASTNN_ISA_SELECT(fn) isa_default::fn()
#endif

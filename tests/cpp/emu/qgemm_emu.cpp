// The AVX-512 VNNI int8 kernels (csrc/quantized/qgemm_avx512.cpp: s8s8 with vpdpbusd and its
// masked K tail; f32s8, the AVX2 kernel it shares) against the scalar reference, on every case of
// qgemm_cases.h (odd M, N, K, inner column ranges, padded leading dimensions, -128 in B, +-127 in
// A). Freestanding: scripts/emulate_x86.py runs it on an emulated CPU with AVX-512 VNNI, which
// this machine and CI lack. Exit status 0 when everything matches, 1 on a mismatch or when the
// CPU does not report the features.
#include "../qgemm_cases.h"
#include "emu_rt.h"
#include "quantized/qgemm.h"

namespace {

struct ArenaMemory {  // the case's buffers come from the arena; released after each case
  template <typename T>
  T* get(int64_t n) {
    return emu::alloc_array<T>(n);
  }
};

}  // namespace

int emu_main() {
  // --guest-arg 1: run the kernel even on a CPU without the features (the harness's check that
  // such a CPU faults instead of passing).
  if (!emu::has_avx512(/*vnni=*/true) && emu::arg() != 1) {
    emu::log("FAIL: the emulated CPU must report AVX-512 F/BW/DQ/VL and VNNI\n");
    return 1;
  }
  const fastnn::quantized::Kernels* kern = fastnn::quantized::avx512_vnni_kernels();
  if (kern == nullptr) {
    emu::log("FAIL: this build has no avx512_vnni kernels\n");
    return 1;
  }
  int failures = 0, cases = 0;
  qgemm_cases::Rng rng{12345};
  ArenaMemory mem;
  qgemm_cases::for_each_case([&](const qgemm_cases::Case& c) {
    const size_t mark = emu::mark();
    ++cases;
    qgemm_cases::run_case(*kern, c, rng, mem, [&](const qgemm_cases::Mismatch& x) {
      if (++failures > 50) return;
      emu::log("MISMATCH ", kern->name, " ", x.kernel, " M=", c.M, " N=", c.N, " K=", c.K, " n0=", c.n0,
               " n1=", c.n1, " lda=", c.lda, " ldb=", c.ldb, " ldc=", c.ldc,
               c.fill == qgemm_cases::Fill::Extreme ? " extreme" : "", ": C[", x.m, ", ", x.j, "] ");
      if (x.outside) {
        emu::log("wrote outside [n0, n1) or past the row\n");
      } else {
        emu::log("got ", x.got, ", expected ", x.expected, "\n");
      }
    });
    emu::release(mark);
  });
  emu::log(failures ? "FAIL " : "ok   ", kern->name, ": ", cases, " cases on the emulated CPU\n");
  emu::log(failures ? "FAILED" : "passed", ": ", failures, " failure(s)\n");
  return failures ? 1 : 0;
}

// Compares every int8 kernel variant that the build contains and this CPU runs (qgemm.h) with a
// scalar reference, on odd sizes: M, N, K that are not multiples of any vector width, column ranges
// [n0, n1) that start past 0 and end before N, leading dimensions larger than the rows, B holding
// -128, A at +-127. Plain C++17, no libtorch: scripts/check_microkernels.sh builds it natively and
// for AArch64 (run under qemu-aarch64, with and without the dot-product extension).
//
//   qgemm_test [--expect NAME]... [--expect-absent NAME]...
// --expect: fail unless variant NAME was tested (so an emulated CPU that silently lacks a feature,
// or a build that silently dropped a file, cannot pass); --expect-absent: fail if NAME is offered
// (the CPU feature test must say no on a CPU without the feature).
// Exit status 0 when everything matches; 1 with one line per mismatch otherwise.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "qgemm_cases.h"
#include "quantized/qgemm.h"

using fastnn::quantized::Kernels;

namespace {

using qgemm_cases::Case;

// Storage for one case's matrices, each allocated to its exact size (a read past a row's K
// elements, where the test's matrices end, is one past an allocation: the sanitizer reports it).
struct CaseMemory {
  std::vector<std::unique_ptr<char[]>> blocks;
  template <typename T>
  T* get(int64_t n) {
    blocks.emplace_back(new char[size_t(n > 0 ? n : 1) * sizeof(T)]);
    return reinterpret_cast<T*>(blocks.back().get());
  }
};

int g_failures = 0;

void run_case(const Kernels& kern, const Case& c, qgemm_cases::Rng& rng) {
  CaseMemory mem;
  qgemm_cases::run_case(kern, c, rng, mem, [&](const qgemm_cases::Mismatch& x) {
    if (++g_failures > 50) return;
    std::printf("MISMATCH %s %s M=%lld N=%lld K=%lld n0=%lld n1=%lld lda=%lld ldb=%lld ldc=%lld%s: C[%lld, %lld] ",
                kern.name, x.kernel, (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.n0,
                (long long)c.n1, (long long)c.lda, (long long)c.ldb, (long long)c.ldc,
                c.fill == qgemm_cases::Fill::Extreme ? " extreme" : "", (long long)x.m, (long long)x.j);
    if (x.outside) {
      std::printf("wrote outside [n0, n1) or past the row\n");
    } else {
      std::printf("got %.9g, expected %.9g\n", x.got, x.expected);
    }
  });
}

std::vector<Case> cases() {
  std::vector<Case> out;
  qgemm_cases::for_each_case([&](const Case& c) { out.push_back(c); });
  return out;
}

bool has(const std::vector<std::string>& names, const std::string& n) {
  for (const auto& x : names)
    if (x == n) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> expect, expect_absent;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--expect" || a == "--expect-absent") && i + 1 < argc) {
      (a == "--expect" ? expect : expect_absent).push_back(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--expect NAME]... [--expect-absent NAME]...\n", argv[0]);
      return 2;
    }
  }
  namespace q = fastnn::quantized;
  const Kernels* runnable[3];
  const int n_run = q::available_kernels(runnable);
  std::vector<std::string> offered;
  for (int i = 0; i < n_run; ++i) offered.push_back(runnable[i]->name);

  const Kernels* built[] = {q::portable_kernels(), q::avx2_kernels(), q::avx512_vnni_kernels(), q::neon_kernels(),
                            q::neon_dotprod_kernels()};
  const auto all = cases();
  std::vector<std::string> tested;
  for (const Kernels* k : built) {
    if (k == nullptr) continue;
    if (!has(offered, k->name)) {
      std::printf("skip %s: built, but this CPU lacks it\n", k->name);
      continue;
    }
    qgemm_cases::Rng rng{12345};
    const int before = g_failures;
    for (const Case& c : all) run_case(*k, c, rng);
    std::printf("%s %s: %zu cases\n", g_failures == before ? "ok  " : "FAIL", k->name, all.size());
    tested.push_back(k->name);
  }
  if (offered.empty() || offered[0] != "default") {
    std::printf("FAIL available_kernels: the portable variant must come first\n");
    ++g_failures;
  }
  for (const auto& n : expect)
    if (!has(tested, n)) {
      std::printf("FAIL expected variant %s was not tested (not built, or the CPU does not report it)\n", n.c_str());
      ++g_failures;
    }
  for (const auto& n : expect_absent)
    if (has(offered, n)) {
      std::printf("FAIL variant %s is offered on a CPU that should lack it\n", n.c_str());
      ++g_failures;
    }
  std::printf("%s: %d failure(s); variants tested:", g_failures ? "FAILED" : "passed", g_failures);
  for (const auto& n : tested) std::printf(" %s", n.c_str());
  std::printf("\n");
  return g_failures ? 1 : 0;
}

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
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "quantized/qgemm.h"

using fastnn::quantized::Kernels;

namespace {

struct Rng {  // a fixed sequence on every platform (std distributions are not portable)
  uint64_t s;
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return uint32_t(s >> 33);
  }
  int in(int lo, int hi) { return lo + int(next() % uint32_t(hi - lo + 1)); }
};

enum class Fill { Random, Extreme };

// A rows x K matrix with leading dimension ld >= K, allocated to end exactly at the last row's
// K-th element, so that a kernel reading past it touches memory a sanitizer reports.
template <typename T>
std::vector<T> matrix(int64_t rows, int64_t K, int64_t ld, Rng& rng, T lo, T hi, Fill fill, T pad) {
  std::vector<T> v(rows ? size_t((rows - 1) * ld + K) : 0, pad);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      T x;
      if (fill == Fill::Extreme) {  // even rows all lo (A -127, B -128), odd rows mixed
        x = (r % 2 == 0 || (r + k) % 3 == 0) ? lo : hi;
      } else if (std::is_integral<T>::value) {
        const int e = rng.in(0, 15);  // the extremes often: they are where 16-bit sums overflow
        x = e == 0 ? lo : (e == 1 ? hi : T(rng.in(int(lo), int(hi))));
      } else {
        x = T(lo + (hi - lo) * (rng.next() / 4294967296.0));
      }
      v[size_t(r * ld + k)] = x;
    }
  return v;
}

struct Case {
  int64_t M, N, K, n0, n1, lda, ldb, ldc;
  Fill fill;
};

int g_failures = 0;

void report(const char* variant, const char* kernel, const Case& c, const std::string& what) {
  if (++g_failures <= 50)
    std::printf("MISMATCH %s %s M=%lld N=%lld K=%lld n0=%lld n1=%lld lda=%lld ldb=%lld ldc=%lld%s: %s\n", variant,
                kernel, (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.n0, (long long)c.n1,
                (long long)c.lda, (long long)c.ldb, (long long)c.ldc, c.fill == Fill::Extreme ? " extreme" : "",
                what.c_str());
}

// Checks C: columns [n0, n1) of each row against ref, everything else still `sentinel`.
template <typename T, typename Check>
void compare(const char* variant, const char* kernel, const Case& c, const std::vector<T>& C, T sentinel,
             Check close) {
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t j = 0; j < c.ldc; ++j) {
      const T got = C[size_t(m * c.ldc + j)];
      std::string bad;
      if (j >= c.n0 && j < c.n1) {
        bad = close(m, j, got);
      } else if (std::memcmp(&got, &sentinel, sizeof(T)) != 0) {
        bad = "wrote outside [n0, n1) or past the row";
      }
      if (!bad.empty()) {
        report(variant, kernel, c, "C[" + std::to_string(m) + ", " + std::to_string(j) + "] " + bad);
        return;
      }
    }
}

void run_case(const Kernels& kern, const Case& c, Rng& rng) {
  const Fill f = c.fill;
  const auto A8 = matrix<int8_t>(c.M, c.K, c.lda, rng, -127, 127, f, 55);
  const auto B = matrix<int8_t>(c.N, c.K, c.ldb, rng, -128, 127, f, 77);
  const auto Af = matrix<float>(c.M, c.K, c.lda, rng, -2.f, 2.f, f, 9.f);

  // s8s8: exact.
  const int32_t s32 = -12345678;
  std::vector<int32_t> C32(size_t(c.M * c.ldc), s32);
  kern.s8s8(A8.data(), c.lda, B.data(), c.ldb, C32.data(), c.ldc, c.M, c.n0, c.n1, c.K);
  compare(kern.name, "s8s8", c, C32, s32, [&](int64_t m, int64_t n, int32_t got) -> std::string {
    int64_t ref = 0;
    for (int64_t k = 0; k < c.K; ++k) ref += int64_t(A8[size_t(m * c.lda + k)]) * B[size_t(n * c.ldb + k)];
    return got == ref ? "" : "got " + std::to_string(got) + ", expected " + std::to_string(ref);
  });

  // f32s8: float sums in any order; the bound is K roundings of the sum of |products|.
  const float sf = -7777.f;
  std::vector<float> Cf(size_t(c.M * c.ldc), sf);
  kern.f32s8(Af.data(), c.lda, B.data(), c.ldb, Cf.data(), c.ldc, c.M, c.n0, c.n1, c.K);
  compare(kern.name, "f32s8", c, Cf, sf, [&](int64_t m, int64_t n, float got) -> std::string {
    double ref = 0, mag = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      const double p = double(Af[size_t(m * c.lda + k)]) * B[size_t(n * c.ldb + k)];
      ref += p;
      mag += std::fabs(p);
    }
    const double tol = double(c.K + 1) * 1.2e-7 * mag + 1e-30;
    if (std::fabs(double(got) - ref) <= tol) return "";
    return "got " + std::to_string(got) + ", expected " + std::to_string(ref);
  });
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const int64_t Ms[] = {1, 2, 3, 5, 17};
  const int64_t Ns[] = {1, 3, 4, 5, 17, 33, 63, 130};
  const int64_t Ks[] = {1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130, 257};
  int i = 0;
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (int64_t K : Ks) {
        ++i;
        // Alternate full rows and inner column ranges; pad the leading dimensions by odd amounts.
        const int64_t n0 = (i % 2 && N > 2) ? 1 + i % (N / 2) : 0;
        const int64_t n1 = (i % 3 == 0 && N - n0 > 1) ? N - 1 : N;
        const int64_t pad = i % 4 == 0 ? 0 : 1 + i % 5;
        out.push_back({M, N, K, n0, n1, K + pad, K + 2 * pad, N + pad, Fill::Random});
      }
  // Every product at its largest magnitude: the int16 pairs of the NEON kernel and the saturating
  // u8 x s8 pairs of AVX2 at their limit, over a long K (int32 sums near 2^27).
  for (int64_t K : {16, 33, 64, 4099}) out.push_back({3, 9, K, 0, 9, K, K, 9, Fill::Extreme});
  out.push_back({2, 6, 130, 2, 5, 131, 133, 7, Fill::Extreme});
  // Empty ranges: nothing is written.
  out.push_back({0, 5, 17, 0, 5, 17, 17, 5, Fill::Random});
  out.push_back({3, 5, 17, 2, 2, 17, 17, 5, Fill::Random});
  out.push_back({3, 5, 0, 0, 5, 1, 1, 5, Fill::Random});
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
    Rng rng{12345};
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

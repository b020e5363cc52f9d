// The int8 kernel test's inputs and reference, shared by qgemm_test.cpp (native, and AArch64 under
// qemu) and emu/qgemm_emu.cpp (AVX-512 VNNI on an emulated CPU, freestanding: so nothing here uses
// the C++ library beyond <cstdint>-level headers).
#pragma once

#include <stdint.h>

namespace qgemm_cases {

struct Rng {  // a fixed sequence on every platform (std distributions are not portable)
  uint64_t s;
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return uint32_t(s >> 33);
  }
  int in(int lo, int hi) { return lo + int(next() % uint32_t(hi - lo + 1)); }
};

enum class Fill { Random, Extreme };

struct Case {
  int64_t M, N, K, n0, n1, lda, ldb, ldc;
  Fill fill;
};

// Elements of a rows x K matrix with leading dimension ld >= K that ends exactly at the last row's
// K-th element, so that a kernel reading past it touches memory a sanitizer reports.
inline int64_t matrix_elems(int64_t rows, int64_t K, int64_t ld) { return rows ? (rows - 1) * ld + K : 0; }

// Fills such a matrix: the padding between rows with `pad`, the elements in [lo, hi].
template <typename T>
void fill_matrix(T* v, int64_t rows, int64_t K, int64_t ld, Rng& rng, T lo, T hi, Fill fill, T pad) {
  for (int64_t i = 0; i < matrix_elems(rows, K, ld); ++i) v[i] = pad;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      T x;
      if (fill == Fill::Extreme) {  // even rows all lo (A -127, B -128), odd rows mixed
        x = (r % 2 == 0 || (r + k) % 3 == 0) ? lo : hi;
      } else if (T(0.5) == T(0)) {  // integral
        const int e = rng.in(0, 15);  // the extremes often: they are where 16-bit sums overflow
        x = e == 0 ? lo : (e == 1 ? hi : T(rng.in(int(lo), int(hi))));
      } else {
        x = T(lo + (hi - lo) * (rng.next() / 4294967296.0));
      }
      v[r * ld + k] = x;
    }
}

// The exact s8s8 product C[m, n].
inline int64_t s8s8_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t m, int64_t n, int64_t K) {
  int64_t ref = 0;
  for (int64_t k = 0; k < K; ++k) ref += int64_t(A[m * lda + k]) * B[n * ldb + k];
  return ref;
}

// Calls f(case) for every case: odd sizes (M, N, K not multiples of any vector width), column
// ranges [n0, n1) that start past 0 and end before N, leading dimensions larger than the rows;
// then products at their largest magnitude over a long K (int32 sums near 2^27; the int16 pairs of
// the NEON kernel and the saturating u8 x s8 pairs of AVX2 at their limit), and empty ranges
// (nothing is written).
template <typename F>
void for_each_case(F&& f) {
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
        f(Case{M, N, K, n0, n1, K + pad, K + 2 * pad, N + pad, Fill::Random});
      }
  const int64_t long_ks[] = {16, 33, 64, 4099};
  for (int64_t K : long_ks) f(Case{3, 9, K, 0, 9, K, K, 9, Fill::Extreme});
  f(Case{2, 6, 130, 2, 5, 131, 133, 7, Fill::Extreme});
  f(Case{0, 5, 17, 0, 5, 17, 17, 5, Fill::Random});
  f(Case{3, 5, 17, 2, 2, 17, 17, 5, Fill::Random});
  f(Case{3, 5, 0, 0, 5, 1, 1, 5, Fill::Random});
}

// What a mismatch report receives: the kernel ("s8s8" or "f32s8"), the case, the element C[m, j],
// and either the value found and the one expected, or (outside [n0, n1): a write where none was
// due) expected == got with `outside` set.
struct Mismatch {
  const char* kernel;
  const Case& c;
  int64_t m, j;
  double got, expected;
  bool outside;
};

// Checks C (row-major, c.ldc apart): columns [n0, n1) of each row against ref(m, j, got) (true: ok),
// everything else still `sentinel`. Reports the first bad element only.
template <typename T, typename Ref, typename Report>
void check_output(const char* kernel, const Case& c, const T* C, T sentinel, Ref&& ref, Report&& report) {
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t j = 0; j < c.ldc; ++j) {
      const T got = C[m * c.ldc + j];
      double expected = 0;
      if (j >= c.n0 && j < c.n1 ? !ref(m, j, got, expected) : got != sentinel) {
        report(Mismatch{kernel, c, m, j, double(got), expected, !(j >= c.n0 && j < c.n1)});
        return;
      }
    }
}

// Runs both kernels of `kern` (qgemm.h's Kernels) on case c with inputs from rng, and reports each
// mismatch. mem.get<T>(n) gives storage for n elements of T that lasts until the case is done
// (exactly n, so that a sanitizer sees a read past the end).
template <typename Kern, typename Mem, typename Report>
void run_case(const Kern& kern, const Case& c, Rng& rng, Mem& mem, Report&& report) {
  const Fill f = c.fill;
  int8_t* A8 = mem.template get<int8_t>(matrix_elems(c.M, c.K, c.lda));
  int8_t* B = mem.template get<int8_t>(matrix_elems(c.N, c.K, c.ldb));
  float* Af = mem.template get<float>(matrix_elems(c.M, c.K, c.lda));
  fill_matrix<int8_t>(A8, c.M, c.K, c.lda, rng, -127, 127, f, 55);
  fill_matrix<int8_t>(B, c.N, c.K, c.ldb, rng, -128, 127, f, 77);
  fill_matrix<float>(Af, c.M, c.K, c.lda, rng, -2.f, 2.f, f, 9.f);

  // s8s8: exact.
  const int32_t s32 = -12345678;
  int32_t* C32 = mem.template get<int32_t>(c.M * c.ldc);
  for (int64_t i = 0; i < c.M * c.ldc; ++i) C32[i] = s32;
  kern.s8s8(A8, c.lda, B, c.ldb, C32, c.ldc, c.M, c.n0, c.n1, c.K);
  check_output("s8s8", c, C32, s32, [&](int64_t m, int64_t n, int32_t got, double& expected) {
    const int64_t ref = s8s8_ref(A8, c.lda, B, c.ldb, m, n, c.K);
    expected = double(ref);
    return got == ref;
  }, report);

  // f32s8: float sums in any order; the bound is K roundings of the sum of |products|.
  const float sf = -7777.f;
  float* Cf = mem.template get<float>(c.M * c.ldc);
  for (int64_t i = 0; i < c.M * c.ldc; ++i) Cf[i] = sf;
  kern.f32s8(Af, c.lda, B, c.ldb, Cf, c.ldc, c.M, c.n0, c.n1, c.K);
  check_output("f32s8", c, Cf, sf, [&](int64_t m, int64_t n, float got, double& expected) {
    double ref = 0, mag = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      const double p = double(Af[m * c.lda + k]) * B[n * c.ldb + k];
      ref += p;
      mag += p < 0 ? -p : p;
    }
    expected = ref;
    const double err = double(got) - ref, tol = double(c.K + 1) * 1.2e-7 * mag + 1e-30;
    return err <= tol && -err <= tol;
  }, report);
}

}  // namespace qgemm_cases

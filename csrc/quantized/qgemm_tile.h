// The register-tiled loop shared by the vector int8 kernels (AVX2, NEON, NEON dot product). Each
// ISA file supplies a trait for its vector step and includes this file once, after defining
// FASTNN_QGEMM_TARGET as its target attribute (empty when the build's flags already allow the
// instructions), so that the loops below are compiled for that ISA and inline the trait's
// intrinsics.
//
// Everything here has internal linkage on purpose: two files instantiate these templates with
// different target attributes, and one shared (inline, weak) copy would let the linker keep the
// copy compiled for an instruction set the CPU may lack. So no include guard either: a file
// includes it exactly once.
//
// A trait Tr gives:
//   In, Out               element types of A and C (B is int8)
//   Vec                   the accumulator
//   kStep                 elements of K per step; a step reads exactly kStep elements of a row
//   zero()                a cleared accumulator
//   load_a(p), load_b(p)  one step's operands (any types madd accepts)
//   madd(acc, a, b)       acc + the products of one step
//   sum(acc)              the horizontal sum of an accumulator
//   sum4(acc[4], out[4])  optional: the four sums at once (AVX2: three horizontal adds instead of
//                         four reductions, a quarter of the work at K = 128)
// Elements past the last full step (K % kStep of them) are added in scalar code, so no load reads
// past a row's K elements.
#ifndef FASTNN_QGEMM_TARGET
#error "define FASTNN_QGEMM_TARGET (the target attribute, or nothing) before including qgemm_tile.h"
#endif

#include <cstdint>
#include <type_traits>

// The loops over the four accumulators must be unrolled so that the accumulators stay in registers
// (an array indexed in a loop lives on the stack); GCC leaves them rolled at -O2.
#ifndef FASTNN_UNROLL4
#if defined(__clang__)
#define FASTNN_UNROLL4 _Pragma("unroll 4")
#elif defined(__GNUC__) && __GNUC__ >= 8
#define FASTNN_UNROLL4 _Pragma("GCC unroll 4")
#else
#define FASTNN_UNROLL4
#endif
#endif

namespace fastnn {
namespace quantized {
namespace {

template <typename Tr, typename = void>
struct HasSum4 : std::false_type {};
template <typename Tr>
struct HasSum4<Tr, std::void_t<decltype(&Tr::sum4)>> : std::true_type {};

// Sums of four accumulators, stored at dst[0..3].
template <typename Tr>
FASTNN_QGEMM_TARGET inline void store4(const typename Tr::Vec (&c)[4], typename Tr::Out* dst) {
  if constexpr (HasSum4<Tr>::value) {
    Tr::sum4(c, dst);
  } else {
    for (int j = 0; j < 4; ++j) dst[j] = Tr::sum(c[j]);
  }
}

// Adds the products of the K tail (elements [Kv, K), fewer than a step) to c_row[n0, n1), in scalar
// code, so that no load reads past a row's K elements. A pass of its own after the vector loops:
// inside them, it kept GCC from holding the accumulators in registers (the AVX2 int8 kernel ran
// ~20% slower for it).
template <typename Tr>
FASTNN_QGEMM_TARGET void add_k_tail(const typename Tr::In* a, const int8_t* B, int64_t ldb, typename Tr::Out* c_row,
                                    int64_t n0, int64_t n1, int64_t Kv, int64_t K) {
  using Out = typename Tr::Out;
  if (Kv == K) return;
  for (int64_t n = n0; n < n1; ++n) {
    Out s = c_row[n];
    for (int64_t k = Kv; k < K; ++k) s += Out(a[k]) * Out(B[n * ldb + k]);
    c_row[n] = s;
  }
}

// Columns [n, n1) of one activation row: four weight rows per pass (each activation load serves
// four dot products), then one at a time.
template <typename Tr>
FASTNN_QGEMM_TARGET void gemm_row(const typename Tr::In* a, const int8_t* B, int64_t ldb, typename Tr::Out* c_row,
                                  int64_t n, int64_t n1, int64_t Kv, int64_t K) {
  const int64_t first = n;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* b = B + n * ldb;
    typename Tr::Vec c[4] = {Tr::zero(), Tr::zero(), Tr::zero(), Tr::zero()};
    for (int64_t k = 0; k < Kv; k += Tr::kStep) {
      const auto av = Tr::load_a(a + k);
      FASTNN_UNROLL4
      for (int j = 0; j < 4; ++j) c[j] = Tr::madd(c[j], av, Tr::load_b(b + j * ldb + k));
    }
    store4<Tr>(c, c_row + n);
  }
  for (; n < n1; ++n) {
    const int8_t* b = B + n * ldb;
    typename Tr::Vec c0 = Tr::zero();
    for (int64_t k = 0; k < Kv; k += Tr::kStep) c0 = Tr::madd(c0, Tr::load_a(a + k), Tr::load_b(b + k));
    c_row[n] = Tr::sum(c0);
  }
  add_k_tail<Tr>(a, B, ldb, c_row, first, n1, Kv, K);
}

// Two activation rows against four weight rows per pass: each weight load serves two rows and
// each activation load four columns (8 accumulators: within AVX2's 16 registers and NEON's 32);
// the rows and columns left over go through gemm_row.
template <typename Tr>
FASTNN_QGEMM_TARGET void gemm_tiled(const typename Tr::In* A, int64_t lda, const int8_t* B, int64_t ldb,
                                    typename Tr::Out* C, int64_t ldc, int64_t M, int64_t n0, int64_t n1,
                                    int64_t K) {
  using V = typename Tr::Vec;
  const int64_t Kv = K - K % Tr::kStep;
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    const typename Tr::In* a0 = A + m * lda;
    const typename Tr::In* a1 = a0 + lda;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      const int8_t* b = B + n * ldb;
      V c0[4] = {Tr::zero(), Tr::zero(), Tr::zero(), Tr::zero()};
      V c1[4] = {Tr::zero(), Tr::zero(), Tr::zero(), Tr::zero()};
      for (int64_t k = 0; k < Kv; k += Tr::kStep) {
        const auto x0 = Tr::load_a(a0 + k);
        const auto x1 = Tr::load_a(a1 + k);
        FASTNN_UNROLL4
        for (int j = 0; j < 4; ++j) {
          const auto bv = Tr::load_b(b + j * ldb + k);
          c0[j] = Tr::madd(c0[j], x0, bv);
          c1[j] = Tr::madd(c1[j], x1, bv);
        }
      }
      store4<Tr>(c0, C + m * ldc + n);
      store4<Tr>(c1, C + (m + 1) * ldc + n);
    }
    add_k_tail<Tr>(a0, B, ldb, C + m * ldc, n0, n, Kv, K);
    add_k_tail<Tr>(a1, B, ldb, C + (m + 1) * ldc, n0, n, Kv, K);
    gemm_row<Tr>(a0, B, ldb, C + m * ldc, n, n1, Kv, K);
    gemm_row<Tr>(a1, B, ldb, C + (m + 1) * ldc, n, n1, Kv, K);
  }
  for (; m < M; ++m) gemm_row<Tr>(A + m * lda, B, ldb, C + m * ldc, n0, n1, Kv, K);
}

}  // namespace
}  // namespace quantized
}  // namespace fastnn

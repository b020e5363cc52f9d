// CPU int8 Linear and recurrences (int8_cpu.h), compiled once per instruction-set variant, in its
// namespace (cpu_isa.h): the quantization, the epilogue and the gate math are vector code.
//
// Activations are quantized per row (symmetric, scale = max|row| / 127, round to nearest even),
// products accumulate exactly in int32 through the int8 kernel variant chosen at run time
// (qgemm.h), and everything after the product is fp32:
//   y[m, n] = float(acc[m, n]) * x_scale[m] * w_scale[n] + bias[n]
// A row holding NaN or inf, or one larger than exact_row_limit(K), is computed exactly instead
// (fp64 sums over the dequantized weights), in both modes: NaN and inf then propagate as in a float
// layer, a huge but finite row cannot overflow the fp32 path, and no other row sees it. Every other
// row keeps 127 * K * max|x| below FLT_MAX, so neither the int8 epilogue nor the fp32 sums of
// weight-only mode can overflow where the float layer does not.
//
// The recurrence runs as the fp32 packed one does (rnn/step_barrier.h): one parallel region for the
// whole sequence, each task owning a fixed range of hidden units (their rows of every gate in W_hh,
// so a task reads the same slice of W_hh every step, from its core's cache), the tasks meeting at a
// barrier twice per step: once the previous state is quantized, and once the new state is written
// (four times with an LSTM's projection h = W_hr z: also once z is quantized, and once h is written).
// At small batches every task quantizes the whole state itself and the first barrier goes.
// A fork and join per step instead costs more than the step itself at batch 1, and on a busy
// machine OpenMP's spinning join made a 64-step batch-1 sequence hundreds of times slower.
//
// Vector width: Vec::size() floats (8 in the default and avx2 variants, 16 in avx512, 4 with NEON);
// every loop runs whole vectors, then scalars, and nothing depends on the width.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_isa.h"
#include "quantized/int8_cpu.h"
#include "quantized/isa/quantize_row.h"
#include "quantized/qgemm.h"
#include "rnn/isa/step_barrier.h"

namespace fastnn {
namespace quantized {
FASTNN_ISA_BEGIN
namespace {

using Vec = at::vec::Vectorized<float>;
// The recurrent family's task count and step barrier, in this variant's copy.
#ifdef FASTNN_ISA
namespace rcpu = ::fastnn::rnn::FASTNN_ISA_NS::cpu;
#else
namespace rcpu = ::fastnn::rnn::cpu;
#endif
using rowq::quantize_row;
using rowq::row_amax;
constexpr int64_t kTileN = 64;  // output columns per parallel task of a Linear
constexpr int64_t kTileM = 16;  // rows per int8 kernel call (its int32 sums: 4 KB)
constexpr int64_t kLocalQuantize = 2048;  // see recurrence_of

// Rows with a larger max|x| are computed exactly; see the header comment.
float exact_row_limit(int64_t K) {
  return std::numeric_limits<float>::max() / (128.f * static_cast<float>(std::max<int64_t>(K, 1)));
}

// y[n] for n in [n0, n1) of one row, in fp64 from the fp32 input and the dequantized weights,
// rounded to fp32 once.
void exact_cols(const float* x, int64_t K, const int8_t* w, const float* w_scale, const float* bias, int64_t n0,
                int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    double acc = 0.0;
    for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(x[k]) * static_cast<double>(wn[k]);
    const float v = static_cast<float>(acc * static_cast<double>(w_scale[n]));
    y[n] = bias ? v + bias[n] : v;
  }
}

// Buffers of one product, kept across the steps of a recurrence.
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xs;
  std::vector<uint8_t> exact;  // per row: computed by exact_cols (not vector<bool>: written in parallel)

  void resize(int64_t M, int64_t K, bool weight_only) {
    exact.assign(M, 0);
    if (!weight_only) {
      xq.resize(M * K);
      xs.resize(M);
    }
  }
};

// Rows [m0, m1) of x: quantized into s (dynamic), or only flagged for the exact path (weight-only).
void prepare_rows(const float* x, int64_t K, bool weight_only, int64_t m0, int64_t m1, Scratch& s) {
  const float limit = exact_row_limit(K);
  for (int64_t m = m0; m < m1; ++m)
    s.exact[m] = weight_only ? !(row_amax(x + m * K, K) <= limit)
                             : !quantize_row(x + m * K, K, limit, s.xq.data() + m * K, s.xs.data() + m);
}

// Columns [n0, n1) of rows [m0, m1) of y = x w^T (scaled, + bias), rows prepared by prepare_rows.
// Rows flagged exact are left for exact_cols.
void product_tile(const float* x, int64_t K, const int8_t* w, const float* w_scale, const float* bias, int64_t N,
                  bool weight_only, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y, const Scratch& s) {
  const Kernels& kern = active_kernels();
  if (weight_only) {
    kern.f32s8(x + m0 * K, K, w, K, y + m0 * N, N, m1 - m0, n0, n1, K);
    for (int64_t m = m0; m < m1; ++m) {
      float* yr = y + m * N;
      if (bias) {
        for (int64_t n = n0; n < n1; ++n) yr[n] = yr[n] * w_scale[n] + bias[n];
      } else {
        for (int64_t n = n0; n < n1; ++n) yr[n] = yr[n] * w_scale[n];
      }
    }
    return;
  }
  // The int32 sums of kTileM rows x kTileN columns at a time, in a block that stays in L1: one
  // [M, N] int32 array would be written, then read back, through memory (13 MB for the input
  // projection of a 100-step batch-32 LSTM).
  alignas(64) int32_t acc[kTileM * kTileN];
  for (int64_t mb = m0; mb < m1; mb += kTileM) {
    const int64_t me = std::min(m1, mb + kTileM);
    for (int64_t nb = n0; nb < n1; nb += kTileN) {
      const int64_t nn = std::min(n1, nb + kTileN) - nb;
      kern.s8s8(s.xq.data() + mb * K, K, w + nb * K, K, acc, kTileN, me - mb, 0, nn, K);
      for (int64_t m = mb; m < me; ++m) {
        const float xs = s.xs[m];
        const int32_t* ar = acc + (m - mb) * kTileN;
        const float* ws = w_scale + nb;
        float* yr = y + m * N + nb;
        if (bias) {
          const float* br = bias + nb;
          for (int64_t n = 0; n < nn; ++n) yr[n] = static_cast<float>(ar[n]) * xs * ws[n] + br[n];
        } else {
          for (int64_t n = 0; n < nn; ++n) yr[n] = static_cast<float>(ar[n]) * xs * ws[n];
        }
      }
    }
  }
}

void linear_with(const LinearArgs& a, Scratch& s) {
  const int64_t M = a.M, K = a.K, N = a.N;
  if (M == 0 || N == 0) return;
  s.resize(M, K, a.weight_only);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                   [&](int64_t m0, int64_t m1) { prepare_rows(a.x, K, a.weight_only, m0, m1, s); });
  // Tasks: blocks of rows x blocks of kTileN columns, so that batch 1 still spreads over the threads.
  const int64_t tiles_n = (N + kTileN - 1) / kTileN;
  const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(M, 8));
  const int64_t tiles_m = (M + rows_per - 1) / rows_per;
  // A task of fewer than ~32K multiply-adds is not worth waking a thread for (a small layer at
  // batch 1 would spend more on the fork and join than on its products).
  const int64_t grain = std::max<int64_t>(1, 32768 / (rows_per * kTileN * std::max<int64_t>(K, 1)));
  at::parallel_for(0, tiles_m * tiles_n, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = (t / tiles_n) * rows_per, me = std::min(M, mb + rows_per);
      const int64_t nb = (t % tiles_n) * kTileN, ne = std::min(N, nb + kTileN);
      product_tile(a.x, K, a.w, a.w_scale, a.bias, N, a.weight_only, mb, me, nb, ne, a.y, s);
    }
  });
  for (int64_t m = 0; m < M; ++m) {
    if (!s.exact[m]) continue;
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
      exact_cols(a.x + m * K, K, a.w, a.w_scale, a.bias, n0, n1, a.y + m * N);
    });
  }
}

void linear(const LinearArgs& a) {
  Scratch s;
  linear_with(a, s);
}

// Gate math on one float or one vector of floats. The vector forms use exp_u20 (a few ULP) and
// tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7), as the fp32 recurrent kernels do: Sleef's
// 1-ULP versions cost more than the int8 recurrent product at batch 1. exp_u20 clamps its argument
// with min/max, which turn NaN into a finite bound, so sigmoid passes NaN through explicitly (as
// torch.sigmoid does); +-inf saturate to 1 and 0 as they should.
template <typename V>
struct Act;
template <>
struct Act<float> {
  static float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
  static float tanh(float x) { return std::tanh(x); }
  static float relu(float x) { return x != x ? x : (x > 0.f ? x : 0.f); }  // NaN propagates, as torch.relu
  static float ld(const float* p) { return *p; }
  static void st(float* p, float v) { *p = v; }
};
template <>
struct Act<Vec> {
  static Vec sigmoid(Vec x) { return Vec::blendv((Vec(1.f) + x.neg().exp_u20()).reciprocal(), x, x != x); }
  static Vec tanh(Vec x) { return Vec(2.f) * sigmoid(x + x) - Vec(1.f); }
  static Vec relu(Vec x) { return at::vec::clamp_min(x, Vec(0.f)); }
  static Vec ld(const float* p) { return Vec::loadu(p); }
  static void st(float* p, Vec v) { v.store(p); }
};

// Units j.. of one batch row: x = input projection (with b_ih), r = recurrent product (with b_hh),
// gates at offsets 0, H, 2H, 3H; hp the state before the step, hn (and out) receive the new one, c
// is updated in place.
template <typename V>
inline void lstm_units(const float* x, const float* r, float* c, const float*, float* hn, float* out, int64_t j,
                       int64_t H, bool) {
  using A = Act<V>;
  const V i = A::sigmoid(A::ld(x + j) + A::ld(r + j));
  const V f = A::sigmoid(A::ld(x + H + j) + A::ld(r + H + j));
  const V g = A::tanh(A::ld(x + 2 * H + j) + A::ld(r + 2 * H + j));
  const V o = A::sigmoid(A::ld(x + 3 * H + j) + A::ld(r + 3 * H + j));
  const V cn = f * A::ld(c + j) + i * g;
  const V h = o * A::tanh(cn);
  A::st(c + j, cn);
  A::st(hn + j, h);
  A::st(out + j, h);
}

template <typename V>
inline void gru_units(const float* x, const float* r, float*, const float* hp, float* hn, float* out, int64_t j,
                      int64_t H, bool) {
  using A = Act<V>;
  const V rr = A::sigmoid(A::ld(x + j) + A::ld(r + j));
  const V z = A::sigmoid(A::ld(x + H + j) + A::ld(r + H + j));
  const V n = A::tanh(A::ld(x + 2 * H + j) + rr * A::ld(r + 2 * H + j));
  const V h = (V(1.f) - z) * n + z * A::ld(hp + j);
  A::st(hn + j, h);
  A::st(out + j, h);
}

template <typename V>
inline void rnn_units(const float* x, const float* r, float*, const float*, float* hn, float* out, int64_t j,
                      int64_t, bool relu) {
  using A = Act<V>;
  const V h = relu ? A::relu(A::ld(x + j) + A::ld(r + j)) : A::tanh(A::ld(x + j) + A::ld(r + j));
  A::st(hn + j, h);
  A::st(out + j, h);
}

template <int NG>
struct Cell;
template <>
struct Cell<4> {
  template <typename V, typename... Args>
  static void units(Args... a) { lstm_units<V>(a...); }
};
template <>
struct Cell<3> {
  template <typename V, typename... Args>
  static void units(Args... a) { gru_units<V>(a...); }
};
template <>
struct Cell<1> {
  template <typename V, typename... Args>
  static void units(Args... a) { rnn_units<V>(a...); }
};

template <int NG>
void recurrence_of(const RecurrenceArgs& a) {
  const int64_t T = a.T, B = a.B, H = a.H, P = a.P, G = NG * H;
  const bool proj = a.w_hr != nullptr;  // h = W_hr z with z = o * tanh(c): an LSTM's projection
  if (T == 0 || B == 0) return;
  // The input projection of every step at once: one [T*B, I] x [I, G] product.
  std::unique_ptr<float[]> gi(new float[T * B * G]);  // every element is written: no zero fill
  Scratch in_proj;
  linear_with({a.input, T * B, a.I, a.w_ih, a.s_ih, a.b_ih, G, a.weight_only, gi.get()}, in_proj);

  Scratch s, sz;  // the products' buffers: of h (W_hh) and of z (W_hr)
  s.resize(B, P, a.weight_only);
  if (proj) sz.resize(B, H, a.weight_only);
  std::vector<float> gh((size_t)(B * G));
  std::vector<float> hbuf((size_t)(2 * B * P));
  std::vector<float> zbuf(proj ? (size_t)(B * H) : 0);
  std::copy(a.h, a.h + B * P, hbuf.begin());
  const bool relu = a.kind == Kind::RNN_RELU;

  // Tasks own blocks of Vec::size() hidden units (whole vectors for the gate math), blocks of the
  // projection's outputs, and rows of the batch to quantize; small problems run on one task
  // (cpu::packed_tasks).
  const int64_t threads =
      rcpu::packed_tasks(B * G * (P + (proj ? 1 : 0)), at::get_num_threads(), rcpu::available_cores());
  auto range = [&](int64_t n, int64_t v0, int64_t v1) {  // tasks [v0, v1)'s share of n units, in vectors
    const int64_t grain = ((n + Vec::size() - 1) / Vec::size() + threads - 1) / threads * Vec::size();
    return std::make_pair(std::min(n, v0 * grain), std::min(n, v1 * grain));
  };
  const int64_t row_grain = (B + threads - 1) / threads;
  auto live = [&](int64_t b, int64_t t) { return !a.lengths || t < a.lengths[b]; };
  // With few values to quantize per step (batch 1 to ~8), every task quantizes all rows itself, into
  // its own buffers, and goes straight on to its products: the duplicated work (B * P values) costs
  // less than the barrier it saves, one of two per product (a batch-1 step takes microseconds).
  const bool local = threads > 1 && B * std::max(P, H) <= kLocalQuantize;
  std::vector<Scratch> own(local ? threads : 0), own_z(local && proj ? threads : 0);
  for (Scratch& o : own) o.resize(B, P, a.weight_only);
  for (Scratch& o : own_z) o.resize(B, H, a.weight_only);

  // The phases of step t take tasks [v0, v1), the state before the step hp [B, P] and the one
  // after it hn [B, P].
  // Phase 1: their rows of the previous state, quantized (or flagged).
  auto quantize = [&](int64_t v0, int64_t v1, const float* hp) {
    prepare_rows(hp, P, a.weight_only, std::min(B, v0 * row_grain), std::min(B, v1 * row_grain), s);
  };
  // Phase 2: their hidden units' recurrent products (every gate's rows), then the gate math, which
  // writes the new h (or, with a projection, z).
  auto update = [&](int64_t v0, int64_t v1, int64_t t, const float* hp, float* hn, const Scratch& hs) {
    const auto [j0, j1] = range(H, v0, v1);
    if (j0 >= j1) return;
    for (int g = 0; g < NG; ++g) {
      // kTileN columns at a time: their W_hh rows (kTileN * P bytes) stay in L1 while every batch
      // row passes; the whole range at once would stream W_hh from L2 once per pair of rows.
      for (int64_t c0 = g * H + j0; c0 < g * H + j1; c0 += kTileN)
        product_tile(hp, P, a.w_hh, a.s_hh, a.b_hh, G, a.weight_only, 0, B, c0, std::min(c0 + kTileN, g * H + j1),
                     gh.data(), hs);
      for (int64_t b = 0; b < B; ++b)
        if (hs.exact[b]) exact_cols(hp + b * P, P, a.w_hh, a.s_hh, a.b_hh, g * H + j0, g * H + j1, gh.data() + b * G);
    }
    const float* git = gi.get() + t * B * G;
    float* ot = a.out + t * B * P;
    for (int64_t b = 0; b < B; ++b) {
      const float* hpb = hp + b * P;
      if (!live(b, t)) {  // past this sequence's end: state kept, output zero
        if (!proj) std::copy(hpb + j0, hpb + j1, hn + b * H + j0);
        continue;
      }
      const float* x = git + b * G;
      const float* r = gh.data() + b * G;
      float* cb = NG == 4 ? a.c + b * H : nullptr;
      float* hnb = proj ? zbuf.data() + b * H : hn + b * H;
      float* ob = proj ? hnb : ot + b * H;
      int64_t j = j0;
      for (; j + Vec::size() <= j1; j += Vec::size()) Cell<NG>::template units<Vec>(x, r, cb, hpb, hnb, ob, j, H, relu);
      for (; j < j1; ++j) Cell<NG>::template units<float>(x, r, cb, hpb, hnb, ob, j, H, relu);
    }
  };
  // Phase 3 (projection only): their rows of z, quantized (or flagged).
  auto quantize_z = [&](int64_t v0, int64_t v1) {
    prepare_rows(zbuf.data(), H, a.weight_only, std::min(B, v0 * row_grain), std::min(B, v1 * row_grain), sz);
  };
  // Phase 4 (projection only): their outputs of h = W_hr z, into the state and the output.
  auto project = [&](int64_t v0, int64_t v1, int64_t t, const float* hp, float* hn, const Scratch& zs) {
    const auto [p0, p1] = range(P, v0, v1);
    if (p0 >= p1) return;
    for (int64_t c0 = p0; c0 < p1; c0 += kTileN)
      product_tile(zbuf.data(), H, a.w_hr, a.s_hr, nullptr, P, a.weight_only, 0, B, c0, std::min(c0 + kTileN, p1),
                   hn, zs);
    for (int64_t b = 0; b < B; ++b) {
      if (!live(b, t)) {
        std::copy(hp + b * P + p0, hp + b * P + p1, hn + b * P + p0);
        continue;
      }
      if (zs.exact[b]) exact_cols(zbuf.data() + b * H, H, a.w_hr, a.s_hr, nullptr, p0, p1, hn + b * P);
      std::copy(hn + b * P + p0, hn + b * P + p1, a.out + (t * B + b) * P + p0);
    }
  };
  auto phase = [&](int p, int64_t v0, int64_t v1, int64_t step) {
    const int64_t t = a.reverse ? T - 1 - step : step;
    float* hp = hbuf.data() + (step % 2) * B * P;
    float* hn = hbuf.data() + (1 - step % 2) * B * P;
    if (local) {  // quantize every row, then the products: two phases with a projection, else one
      if (p == 0) {
        prepare_rows(hp, P, a.weight_only, 0, B, own[v0]);
        return update(v0, v1, t, hp, hn, own[v0]);
      }
      prepare_rows(zbuf.data(), H, a.weight_only, 0, B, own_z[v0]);
      return project(v0, v1, t, hp, hn, own_z[v0]);
    }
    switch (p) {
      case 0: return quantize(v0, v1, hp);
      case 1: return update(v0, v1, t, hp, hn, s);
      case 2: return quantize_z(v0, v1);
      default: return project(v0, v1, t, hp, hn, sz);
    }
  };
  const int phases = (proj ? 2 : 1) * (local ? 1 : 2);

  rcpu::run_in_lockstep(threads, T * phases,
                        [&](int64_t v0, int64_t v1, int64_t g) { phase(g % phases, v0, v1, g / phases); });
  std::copy(hbuf.begin() + (T % 2) * B * P, hbuf.begin() + (T % 2 + 1) * B * P, a.h);
}

void recurrence(const RecurrenceArgs& a) {
  switch (a.kind) {
    case Kind::LSTM: return recurrence_of<4>(a);
    case Kind::GRU: return recurrence_of<3>(a);
    default: return recurrence_of<1>(a);
  }
}

const Int8CpuKernels kKernels{linear, recurrence};

}  // namespace

const Int8CpuKernels& int8_cpu_kernels() { return kKernels; }

FASTNN_ISA_END
}  // namespace quantized
}  // namespace fastnn

// Compares the fp32 CPU microkernels written with at::vec with a double-precision reference, on odd
// widths (vector body plus scalar tail), so that each instruction set's at::vec (AVX2 here, NEON
// under qemu-aarch64) is checked:
//   - the fused recurrent step of csrc/rnn/isa/cpu_step.h: forward_block and backward_row for LSTM,
//     GRU, RNN tanh/relu, with padded rows (lengths), split column ranges, biases, double buffering;
//   - the optimizer update math of csrc/optim/math.h (Adam/AdamW/AMSGrad, SGD momentum/Nesterov)
//     on Vectorized<float>;
//   - the packed recurrent forward's blocks (csrc/rnn/isa/packed_block.h: dot_rows, sum_each,
//     block_products);
//   - the int8 MoE experts' vector helpers (csrc/quantized/isa/qmoe_vec.cpp, linked beside this
//     file): gated activations and per-row int8 quantization; and the int8 Linear's per-row
//     quantization (csrc/quantized/isa/quantize_row.h).
// torch's headers are used header-only (C++20, as they require); no libtorch is linked.
// scripts/check_microkernels.sh builds and runs it. Exit status 0 when all match, 1 otherwise.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "optim/math.h"
#include "rnn/isa/cpu_step.h"
#include "quantized/isa/quantize_row.h"
#include "quantized/qmoe_vec.h"
#include "rnn/isa/packed_block.h"

// csrc/quantized/isa/qmoe_vec.cpp, compiled beside this file without FASTNN_ISA: its table getter
// is then outside the variant namespaces.
namespace fastnn::quantized {
const MoeVecKernels& moe_vec_kernels();
}

// at::vec's AVX2/AVX-512 tanh and exp (erf uses exp) are Sleef's, in libtorch, which is not linked
// here: lane by lane with <cmath> instead, so that the code around them (qmoe_vec's GeLU forms) is
// what is checked. (The recurrent step's float math uses at::vec's inline exp_u20, not these.)
#define FASTNN_TEST_LANEWISE(name, V, n, load, store, fn) \
  extern "C" V name(V x) {                                \
    float l[n];                                           \
    store(l, x);                                          \
    for (float& v : l) v = fn(v);                         \
    return load(l);                                       \
  }
#if defined(CPU_CAPABILITY_AVX512)
FASTNN_TEST_LANEWISE(Sleef_tanhf16_u10, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, std::tanh)
FASTNN_TEST_LANEWISE(Sleef_expf16_u10, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, std::exp)
#elif defined(CPU_CAPABILITY_AVX2)
FASTNN_TEST_LANEWISE(Sleef_tanhf8_u10, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, std::tanh)
FASTNN_TEST_LANEWISE(Sleef_expf8_u10, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, std::exp)
#endif

namespace {

using namespace fastnn::rnn;
using at::vec::Vectorized;

int g_failures = 0;

void check(const std::string& what, const float* got, const std::vector<double>& ref, double tol = 2e-5) {
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(double(got[i]) - ref[i]);
    if (!(err <= tol * (1.0 + std::fabs(ref[i])))) {
      if (++g_failures <= 50) std::printf("MISMATCH %s [%zu]: got %.9g, expected %.9g\n", what.c_str(), i, got[i], ref[i]);
      return;
    }
  }
}

struct Rng {
  uint64_t s = 99;
  float uniform(float lo, float hi) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + (hi - lo) * float((s >> 40) / 16777216.0);
  }
  std::vector<float> vec(size_t n, float lo, float hi) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
  }
};

double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }
const char* kCellNames[] = {"lstm", "gru", "rnn_tanh", "rnn_relu"};

// One forward step of B rows; row 1 is padding (t >= lengths[1]).
void forward_case(Cell cell, int64_t H, bool bias, bool dbuf, Rng& rng) {
  const int64_t B = 3, G = num_gates(cell) * H, WS = ws_width(cell, H);
  const std::string name = std::string("forward ") + kCellNames[int(cell)] + " H=" + std::to_string(H) +
                           (bias ? " bias" : "") + (dbuf ? " h_prev" : "");
  auto gi = rng.vec(B * G, -3, 3), gh = rng.vec(B * G, -3, 3), gib = rng.vec(G, -1, 1), bhn = rng.vec(H, -1, 1);
  auto h = rng.vec(B * H, -1, 1), hp = rng.vec(B * H, -1, 1), c = rng.vec(B * H, -2, 2);
  std::vector<float> out(B * H, 5.f), ws(B * WS, 5.f);
  const std::vector<float> h_in = h, c_in = c;
  const int64_t lengths[] = {4, 2, 7};
  FwdStep<float> s{cell, B, H, H, gi.data(), gh.data(), bias && cell == Cell::GRU ? bhn.data() : nullptr, h.data(),
                   dbuf ? hp.data() : nullptr, c.data(), out.data(), ws.data(), nullptr, lengths, 3,
                   bias ? gib.data() : nullptr};
  for (int64_t b = 0; b < B; ++b) {  // two column blocks, as the parallel driver splits them
    const int64_t mid = H / 3;
    cpu::forward_block(s, b, 0, mid);
    cpu::forward_block(s, b, mid, H);
  }
  std::vector<double> rh(B * H), rc(B * H), rout(B * H), rws(B * WS);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < H; ++j) {
      const double hprev = (dbuf ? hp : h_in)[b * H + j];
      if (b == 1) {  // padding: state kept (copied when double-buffered), output and workspace zero
        rh[b * H + j] = hprev;
        rc[b * H + j] = c_in[b * H + j];
        continue;
      }
      auto in = [&](int k) { return double(gi[b * G + k * H + j]) + (bias ? gib[k * H + j] : 0.0); };
      auto pre = [&](int k) { return in(k) + gh[b * G + k * H + j]; };
      double hn = 0;
      double* w = &rws[b * WS];
      rc[b * H + j] = c_in[b * H + j];
      if (cell == Cell::LSTM) {
        const double i = sig(pre(0)), f = sig(pre(1)), g = std::tanh(pre(2)), o = sig(pre(3));
        const double cn = f * c_in[b * H + j] + i * g;
        hn = o * std::tanh(cn);
        w[j] = i, w[H + j] = f, w[2 * H + j] = g, w[3 * H + j] = o, w[4 * H + j] = cn;
        rc[b * H + j] = cn;
      } else if (cell == Cell::GRU) {
        const double ghn = gh[b * G + 2 * H + j] + (bias ? bhn[j] : 0.0);
        const double r = sig(pre(0)), z = sig(pre(1)), n = std::tanh(in(2) + r * ghn);
        hn = (1 - z) * n + z * hprev;
        w[j] = r, w[H + j] = z, w[2 * H + j] = n, w[3 * H + j] = ghn;
      } else {
        hn = cell == Cell::RNN_TANH ? std::tanh(pre(0)) : std::max(pre(0), 0.0);
      }
      rh[b * H + j] = rout[b * H + j] = hn;
    }
  check(name + " h", h.data(), rh);
  check(name + " out", out.data(), rout);
  check(name + " workspace", ws.data(), rws);
  if (cell == Cell::LSTM) check(name + " c", c.data(), rc);
}

// One backward step; row 1 is padding.
void backward_case(Cell cell, int64_t H, bool grad_out, Rng& rng) {
  const int64_t B = 3, G = num_gates(cell) * H, WS = ws_width(cell, H);
  const std::string name = std::string("backward ") + kCellNames[int(cell)] + " H=" + std::to_string(H) +
                           (grad_out ? " grad_out" : "");
  auto ws = rng.vec(B * WS, 0.05f, 0.95f), cp = rng.vec(B * H, -2, 2), hp = rng.vec(B * H, -1, 1);
  auto outv = rng.vec(B * H, -1, 1), go = rng.vec(B * H, -1, 1), dh = rng.vec(B * H, -1, 1), dc = rng.vec(B * H, -1, 1);
  const std::vector<float> dh_in = dh, dc_in = dc;
  std::vector<float> dgi(B * G, 5.f), dgh_buf(B * G, 5.f);
  float* dgh = cell == Cell::GRU ? dgh_buf.data() : dgi.data();
  const int64_t lengths[] = {4, 2, 7};
  BwdStep<float> s{cell, B, H, H, ws.data(), cp.data(), hp.data(), outv.data(), grad_out ? go.data() : nullptr,
                   dh.data(), false, dc.data(), dgi.data(), dgh, lengths, 3};
  for (int64_t b = 0; b < B; ++b) cpu::backward_row(s, b);
  std::vector<double> rdgi(B * G, 0.0), rdgh(B * G, 0.0), rdh(dh_in.begin(), dh_in.end()), rdc(dc_in.begin(), dc_in.end());
  for (int64_t b = 0; b < B; ++b) {
    if (b == 1) continue;  // padding: zero gate gradients, dh and dc pass through
    for (int64_t j = 0; j < H; ++j) {
      const float* w = &ws[b * WS];
      const double d = double(dh_in[b * H + j]) + (grad_out ? go[b * H + j] : 0.0);
      double* gi = &rdgi[b * G];
      rdh[b * H + j] = 0;
      if (cell == Cell::LSTM) {
        const double i = w[j], f = w[H + j], g = w[2 * H + j], o = w[3 * H + j], tc = std::tanh(double(w[4 * H + j]));
        const double dct = dc_in[b * H + j] + d * o * (1 - tc * tc);
        gi[j] = dct * g * i * (1 - i), gi[H + j] = dct * cp[b * H + j] * f * (1 - f);
        gi[2 * H + j] = dct * i * (1 - g * g), gi[3 * H + j] = d * tc * o * (1 - o);
        rdc[b * H + j] = dct * f;
      } else if (cell == Cell::GRU) {
        const double r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
        const double dnp = d * (1 - z) * (1 - n * n);
        gi[j] = rdgh[b * G + j] = dnp * hn * r * (1 - r);
        gi[H + j] = rdgh[b * G + H + j] = d * (hp[b * H + j] - n) * z * (1 - z);
        gi[2 * H + j] = dnp;
        rdgh[b * G + 2 * H + j] = dnp * r;
        rdh[b * H + j] = d * z;
      } else {
        const double y = outv[b * H + j];
        gi[j] = cell == Cell::RNN_TANH ? d * (1 - y * y) : (y > 0 ? d : 0.0);
      }
    }
  }
  check(name + " dgi", dgi.data(), rdgi);
  if (cell == Cell::GRU) check(name + " dgh", dgh_buf.data(), rdgh);
  check(name + " dh", dh.data(), rdh);
  if (cell == Cell::LSTM) check(name + " dc", dc.data(), rdc);
}

// csrc/optim/math.h on at::vec vectors (the CPU optimizer's Ops) against double scalars.
struct VOps {
  static Vectorized<float> sqrt(Vectorized<float> x) { return x.sqrt(); }
  static Vectorized<float> max(Vectorized<float> a, Vectorized<float> b) { return at::vec::maximum(a, b); }
};
struct DOps {
  static double sqrt(double x) { return std::sqrt(x); }
  static double max(double a, double b) { return a > b ? a : b; }
};

void optim_case(Rng& rng) {
  using namespace fastnn::optim;
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  const int64_t n = 3 * W;
  for (int variant = 0; variant < 6; ++variant) {
    const AdamFlags af{variant % 2 == 1, variant >= 2, variant >= 2 && variant < 4};
    const SgdFlags sf{variant != 0, variant % 2 == 1 && variant != 0, variant >= 3, variant == 4};
    AdamCoeffs<double> c{1e-2, 0.9, 0.999, 0.1, 0.001, 1e-8, 0.01, 1 - 1e-4, 1e-2 / (1 - 0.9 * 0.9),
                         std::sqrt(1 - 0.999 * 0.999)};
    const SgdCoeffs<double> sc{0.05, 0.9, 0.9, 0.01};
    auto p = rng.vec(n, -1, 1), g = rng.vec(n, -1, 1), m = rng.vec(n, -0.1f, 0.1f), v = rng.vec(n, 0, 0.01f);
    auto vm = rng.vec(n, 0, 0.02f), buf = rng.vec(n, -0.1f, 0.1f);
    std::vector<double> rp(n), rm(n), rv(n), rvm(n), sp(n), sb(n);
    for (int64_t i = 0; i < n; ++i) {
      double P = p[i], M = m[i], Vv = v[i], X = vm[i];
      adam_update<double, DOps>(P, double(g[i]), M, Vv, X, c, af);
      rp[i] = P, rm[i] = M, rv[i] = Vv, rvm[i] = X;
      double Q = p[i], Bf = buf[i];
      sgd_update<double>(Q, double(g[i]), Bf, sc, sf);
      sp[i] = Q, sb[i] = Bf;
    }
    AdamCoeffs<float> cf{float(c.lr), float(c.beta1), float(c.beta2), float(c.one_minus_beta1),
                         float(c.one_minus_beta2), float(c.eps), float(c.weight_decay), float(c.decay_factor),
                         float(c.step_size), float(c.bias_correction2_sqrt)};
    const SgdCoeffs<float> scf{float(sc.lr), float(sc.momentum), float(sc.one_minus_dampening), float(sc.weight_decay)};
    std::vector<float> q = p;
    for (int64_t i = 0; i < n; i += W) {
      V P = V::loadu(&p[i]), M = V::loadu(&m[i]), Vv = V::loadu(&v[i]), X = V::loadu(&vm[i]);
      adam_update<V, VOps>(P, V::loadu(&g[i]), M, Vv, X, cf, af);
      P.store(&p[i]), M.store(&m[i]), Vv.store(&v[i]), X.store(&vm[i]);
      V Q = V::loadu(&q[i]), Bf = V::loadu(&buf[i]);
      sgd_update<V>(Q, V::loadu(&g[i]), Bf, scf, sf);
      Q.store(&q[i]), Bf.store(&buf[i]);
    }
    const std::string name = "optim variant " + std::to_string(variant);
    check(name + " adam p", p.data(), rp, 1e-5);
    check(name + " adam m", m.data(), rm, 1e-5);
    check(name + " adam v", v.data(), rv, 1e-5);
    if (af.amsgrad) check(name + " adam vmax", vm.data(), rvm, 1e-5);
    check(name + " sgd p", q.data(), sp, 1e-5);
    check(name + " sgd buf", buf.data(), sb, 1e-5);
  }
}

// The packed forward's vector blocks (rnn/isa/packed_block.h): dot_rows (its sum_each is the
// reduction each instruction set writes its own way) and block_products on the packed layout, for
// widths and feature counts around one vector, against double sums. Returns the number of cases.
int packed_cases(Rng& rng) {
  using namespace fastnn::rnn::packed;
  int cases = 0;
  for (int64_t K : {int64_t(1), int64_t(5), kBlock - 1, kBlock, 2 * kBlock + 3})
    for (int64_t rows : {int64_t(1), kBlock - 1, kBlock}) {
      auto w = rng.vec(rows * K, -1, 1), x = rng.vec(K, -1, 1);
      std::vector<float> y(kBlock, 7.f);
      dot_rows(w.data(), K, rows, x.data(), y.data());
      std::vector<double> ref(kBlock, 7.0);  // past `rows`: untouched
      for (int64_t r = 0; r < rows; ++r) {
        ref[r] = 0;
        for (int64_t k = 0; k < K; ++k) ref[r] += double(w[r * K + k]) * x[k];
      }
      check("dot_rows K=" + std::to_string(K) + " rows=" + std::to_string(rows), y.data(), ref);
      ++cases;
    }
  // LSTM's four gates, H = one whole block and a partial one; R = 4 rows two gates at a time, then
  // the rows again accumulating features [k1, K) one row at a time with every gate.
  constexpr int NG = 4;
  const int64_t H = kBlock + 3, K = 7, B = 4, k1 = 3, G = NG * H, nb = 2;
  auto w = rng.vec(G * K, -1, 1), hin = rng.vec(B * K, -1, 1);
  std::vector<float> wp(nb * K * NG * kBlock, 0.f), gh(B * G, 7.f);
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t k = 0; k < K; ++k)
      for (int g = 0; g < NG; ++g)
        for (int64_t l = 0; l < kBlock && jb * kBlock + l < H; ++l)
          wp[((jb * K + k) * NG + g) * kBlock + l] = w[(g * H + jb * kBlock + l) * K + k];
  for (int64_t jb = 0; jb < nb; ++jb) {
    const int64_t j0 = jb * kBlock, width = std::min(kBlock, H - j0);
    const float* slice = wp.data() + jb * K * NG * kBlock;
    for (int g0 = 0; g0 < NG; g0 += 2) block_products<NG, 2, 4>(slice, hin.data(), K, 0, k1, 0, H, j0, width, gh.data(), false, g0);
    for (int64_t b = 0; b < B; ++b) block_products<NG, NG, 1>(slice, hin.data(), K, k1, K, b, H, j0, width, gh.data(), true, 0);
  }
  std::vector<double> ref(B * G, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < G; ++r)
      for (int64_t k = 0; k < K; ++k) ref[b * G + r] += double(w[r * K + k]) * hin[b * K + k];
  check("block_products", gh.data(), ref);
  return cases + 1;
}

// Row kinds for the quantization tests: 0 zeros, 1 a NaN, 2 uniform in [-3, 3], 3 an inf, 4 past
// int8_cpu's exact-row limit (1e33).
std::vector<float> row_of_kind(Rng& rng, int64_t n, int kind) {
  auto x = rng.vec(n, -3, 3);
  if (kind == 0) x.assign(n, 0.f);
  if (kind == 1) x[n / 2] = std::numeric_limits<float>::quiet_NaN();
  if (kind == 3) x[n - 1] = -std::numeric_limits<float>::infinity();
  if (kind == 4) x[0] = 1e33f;
  return x;
}

float abs_max(const std::vector<float>& x) {
  float amax = 0.f;
  for (float v : x) amax = std::fabs(v) > amax ? std::fabs(v) : amax;
  return amax;
}

// A quantized row: the scale as expected (NaN matches NaN); q[k] = x[k] / scale clamped to
// [-127, 127], rounded half to even, or all zeros when the scale is not positive and finite;
// q[n] (one past the row) untouched.
void check_quantized(const std::string& name, const std::vector<float>& x, const std::vector<int8_t>& q, float scale,
                     float expected) {
  const int64_t n = int64_t(x.size());
  const bool usable = expected > 0.f && expected < std::numeric_limits<float>::infinity();
  bool ok = (std::isnan(expected) ? std::isnan(scale) : scale == expected) && q[n] == 99;
  for (int64_t k = 0; k < n && ok; ++k) {
    float t = usable ? x[k] / expected : 0.f;
    t = t < -127.f ? -127.f : (t > 127.f ? 127.f : t);
    // ties to even: adding 1.5 * 2^23 leaves an integer in float's last bit, rounded to nearest even
    ok = q[k] == int8_t((t + 12582912.f) - 12582912.f);
  }
  if (!ok && ++g_failures <= 50) std::printf("MISMATCH %s: scale %.9g (expected %.9g) or q\n", name.c_str(), scale, expected);
}

// The int8 Linear's per-row quantization (csrc/quantized/isa/quantize_row.h): rows past the limit,
// or with NaN or inf, are refused (false, zeros, scale 0). Returns the number of cases.
int int8_row_cases(Rng& rng) {
  using namespace fastnn::quantized::rowq;
  const int64_t W = Vectorized<float>::size();
  int cases = 0;
  for (int64_t n : {int64_t(1), W - 1, W, 2 * W + 3, int64_t(37)})
    for (int kind = 0; kind < 5; ++kind, ++cases) {
      const auto x = row_of_kind(rng, n, kind);
      std::vector<int8_t> q(n + 1, 99);
      float scale = -1.f;
      const float limit = 1e30f, amax = abs_max(x);
      const bool kept = quantize_row(x.data(), n, limit, q.data(), &scale);
      const bool refuse = kind == 1 || kind == 3 || kind == 4;
      const std::string name = "int8 quantize_row n=" + std::to_string(n) + " kind=" + std::to_string(kind);
      if (kept == refuse && ++g_failures <= 50) std::printf("MISMATCH %s: returned %d\n", name.c_str(), int(kept));
      const float got_amax = row_amax(x.data(), n);
      if (!((kind == 1 || kind == 3) ? std::isnan(got_amax) : got_amax == amax) && ++g_failures <= 50)
        std::printf("MISMATCH %s: row_amax %.9g, expected %.9g\n", name.c_str(), got_amax, amax);
      check_quantized(name, x, q, scale, refuse ? 0.f : (amax == 0.f ? 1.f : amax / 127.f));
    }
  return cases;
}

// The int8 MoE experts' vector helpers (csrc/quantized/isa/qmoe_vec.cpp): the gated activations
// and the per-row int8 quantization, on widths around one vector. Returns the number of cases.
int moe_vec_cases(Rng& rng) {
  using fastnn::quantized::Act;
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const auto& kern = fastnn::quantized::moe_vec_kernels();
  const int64_t W = Vectorized<float>::size();
  int cases = 0;
  for (int64_t n : {int64_t(1), W - 1, W, 2 * W + 3, int64_t(37)}) {
    for (Act act : {Act::SiLU, Act::GeLU, Act::GeLUTanh, Act::ReLU}) {
      auto g = rng.vec(n, -4, 4), u = rng.vec(n, -2, 2);
      std::vector<float> h(n + 1, 7.f);
      kern.gated(act, g.data(), u.data(), h.data(), n);
      std::vector<double> ref(n + 1, 7.0);  // h[n]: untouched
      for (int64_t j = 0; j < n; ++j) {
        const double x = g[j];
        double a = x > 0 ? x : 0.0;
        if (act == Act::SiLU) a = x * sig(x);
        if (act == Act::GeLU) a = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        if (act == Act::GeLUTanh) a = 0.5 * x * (1 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
        ref[j] = a * u[j];
      }
      check("moe gated act=" + std::to_string(int(act)) + " n=" + std::to_string(n), h.data(), ref, 1e-5);
      ++cases;
    }
    // A zero row, a row with NaN, then an ordinary one: scale NaN and zeros for the NaN row.
    for (int kind = 0; kind < 3; ++kind, ++cases) {
      const auto x = row_of_kind(rng, n, kind);
      std::vector<int8_t> q(n + 1, 99);
      float scale = -1.f;
      kern.quantize_row(x.data(), n, q.data(), &scale);
      const float amax = abs_max(x);
      check_quantized("moe quantize_row n=" + std::to_string(n) + " kind=" + std::to_string(kind), x, q, scale,
                      kind == 1 ? kNaN : (amax == 0.f ? 1.f : amax / 127.f));
    }
  }
  return cases;
}

}  // namespace

int main() {
  Rng rng;
  int cases = 0;
  for (Cell cell : {Cell::LSTM, Cell::GRU, Cell::RNN_TANH, Cell::RNN_RELU})
    for (int64_t H : {1, 3, 8, 17, 33, 70}) {
      for (int flags = 0; flags < 4; ++flags, ++cases) forward_case(cell, H, flags & 1, flags & 2, rng);
      for (bool go : {false, true}) backward_case(cell, H, go, rng), ++cases;
    }
  optim_case(rng);
  const int packed = packed_cases(rng), moe = moe_vec_cases(rng), rows = int8_row_cases(rng);
  std::printf("%s: %d failure(s); %d recurrent-step cases, 6 optimizer cases, %d packed-block cases, %d int8 MoE "
              "vector cases, %d int8 row-quantization cases; at::vec float width %d\n",
              g_failures ? "FAILED" : "passed", g_failures, cases, packed, moe, rows, int(Vectorized<float>::size()));
  return g_failures ? 1 : 0;
}

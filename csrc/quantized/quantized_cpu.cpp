// CPU int8 Linear and recurrences. Activations are quantized per row (symmetric, scale =
// max|row| / 127, round to nearest even), products accumulate exactly in int32 through the
// kernel variant chosen at run time (qgemm.h), and everything after the product is fp32:
//   y[m, n] = float(acc[m, n]) * x_scale[m] * w_scale[n] + bias[n]
// A row holding NaN or inf, or one larger than exact_row_limit(K), is computed exactly instead
// (exact_row: fp64 sums over the dequantized weights), in both modes: NaN and inf then propagate
// as in a float layer, a huge but finite row cannot overflow the fp32 path, and no other row sees
// it. Every other row keeps 127 * K * max|x| below FLT_MAX, so neither the int8 epilogue nor the
// fp32 sums of weight-only mode can overflow where the float layer does not.
#include "quantized/quantized.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "quantized/qgemm.h"

namespace fastnn {
namespace quantized {
namespace {

constexpr float kQmax = 127.f;
constexpr int64_t kTileN = 64;  // output columns per parallel task

// Rows with a larger max|x| are computed exactly; see the header comment.
float exact_row_limit(int64_t K) {
  return std::numeric_limits<float>::max() / (128.f * static_cast<float>(std::max<int64_t>(K, 1)));
}

// max|x| over one row, or NaN when the row holds NaN or inf.
float row_amax(const float* x, int64_t K) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float v = x[k];
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  return finite ? amax : std::numeric_limits<float>::quiet_NaN();
}

// Quantizes one row; returns false (q zeros) when the row is to be computed exactly instead.
bool quantize_row(const float* x, int64_t K, float limit, int8_t* q, float* scale) {
  const float amax = row_amax(x, K);
  if (!(amax <= limit)) {  // NaN compares false
    std::fill(q, q + K, int8_t(0));
    *scale = 0.f;
    return false;
  }
  float s = amax / kQmax;
  if (s == 0.f) s = 1.f;  // an all-zero row, or one so small that amax / 127 underflows
  for (int64_t k = 0; k < K; ++k)
    q[k] = static_cast<int8_t>(std::min(kQmax, std::max(-kQmax, std::nearbyint(x[k] / s))));
  *scale = s;
  return true;
}

// y [N] for one row in fp64 from the fp32 input and the dequantized weights, rounded to fp32 once.
void exact_row(const float* x, int64_t K, const int8_t* w, const float* w_scale, const float* bias, int64_t N,
               float* y) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wn = w + n * K;
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(x[k]) * static_cast<double>(wn[k]);
      const float v = static_cast<float>(acc * static_cast<double>(w_scale[n]));
      y[n] = bias ? v + bias[n] : v;
    }
  });
}

// Buffers one linear product needs, kept across the steps of a recurrence.
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xs;
  std::vector<int32_t> acc;
  std::vector<uint8_t> exact;  // per row: computed by exact_row (not vector<bool>: written in parallel)
};

// y [M, N] = x [M, K] (fp32, row stride K) times w_q [N, K]^T, scaled, plus bias (may be null).
void linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* w_scale, const float* bias,
            int64_t N, bool weight_only, float* y, Scratch& s) {
  if (M == 0 || N == 0) return;
  const Kernels& kern = active_kernels();
  const float limit = exact_row_limit(K);
  s.exact.assign(M, 0);
  if (!weight_only) {
    s.xq.resize(M * K);
    s.xs.resize(M);
    s.acc.resize(M * N);
  }
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      s.exact[m] = weight_only ? !(row_amax(x + m * K, K) <= limit)
                               : !quantize_row(x + m * K, K, limit, s.xq.data() + m * K, s.xs.data() + m);
  });
  // Tasks: blocks of rows x blocks of kTileN columns, so that batch 1 still spreads over the threads.
  const int64_t tiles_n = (N + kTileN - 1) / kTileN;
  const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(M, 8));
  const int64_t tiles_m = (M + rows_per - 1) / rows_per;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = (t / tiles_n) * rows_per, me = std::min(M, mb + rows_per);
      const int64_t nb = (t % tiles_n) * kTileN, ne = std::min(N, nb + kTileN);
      if (weight_only) {
        kern.f32s8(x + mb * K, K, w, K, y + mb * N, N, me - mb, nb, ne, K);
        for (int64_t m = mb; m < me; ++m)
          for (int64_t n = nb; n < ne; ++n) {
            const float v = y[m * N + n] * w_scale[n];
            y[m * N + n] = bias ? v + bias[n] : v;
          }
      } else {
        int32_t* acc = s.acc.data();
        kern.s8s8(s.xq.data() + mb * K, K, w, K, acc + mb * N, N, me - mb, nb, ne, K);
        for (int64_t m = mb; m < me; ++m) {
          const float xs = s.xs[m];
          for (int64_t n = nb; n < ne; ++n) {
            const float v = static_cast<float>(acc[m * N + n]) * xs * w_scale[n];
            y[m * N + n] = bias ? v + bias[n] : v;
          }
        }
      }
    }
  });
  for (int64_t m = 0; m < M; ++m)
    if (s.exact[m]) exact_row(x + m * K, K, w, w_scale, bias, N, y + m * N);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_f32(const at::Tensor& t, const char* arg, std::initializer_list<int64_t> shape) {
  FASTNN_CHECK_ARG(t.scalar_type() == at::kFloat && t.sizes().equals(shape), arg,
                   "a float32 tensor of shape " + c10::str(at::IntArrayRef(shape)), describe(t));
}

void check_weight(const at::Tensor& w, const at::Tensor& scale, const char* arg, const char* scale_arg, int64_t N,
                  int64_t K) {
  FASTNN_CHECK_ARG(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(0) == N && w.size(1) == K, arg,
                   "an int8 tensor of shape [" + std::to_string(N) + ", " + std::to_string(K) + "]", describe(w));
  check_f32(scale, scale_arg, {N});
}

at::Tensor opt_f32(const Opt& t, const char* arg, int64_t N) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_f32(*t, arg, {N});
  return t->contiguous();
}

// The recurrence shared by LSTM (gates i, f, g, o), GRU (r, z, n) and the Elman RNN (one gate).
enum class Kind { LSTM, GRU, RNN_TANH, RNN_RELU };

struct Seq {
  Kind kind;
  bool lstm;
  at::Tensor input, h0, c0, w_ih, s_ih, w_hh, s_hh, b_ih, b_hh, lengths;
  bool reverse, weight_only;
};

Seq check_seq(Kind kind, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
              const at::Tensor& s_ih, const at::Tensor& w_hh, const at::Tensor& s_hh, const Opt& b_ih,
              const Opt& b_hh, const Opt& lengths, bool reverse, bool weight_only) {
  FASTNN_CHECK_ARG(input.scalar_type() == at::kFloat && input.dim() == 3, "input",
                   "a float32 tensor [T, B, input_size]", describe(input));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const bool lstm = kind == Kind::LSTM;
  const int64_t gates = lstm ? 4 : kind == Kind::GRU ? 3 : 1;
  FASTNN_CHECK_ARG(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1) && w_hh.size(1) > 0, "w_hh_q",
                   "an int8 tensor [" + std::to_string(gates) + "*hidden_size, hidden_size]", describe(w_hh));
  const int64_t H = w_hh.size(1), G = gates * H;
  check_weight(w_ih, s_ih, "w_ih_q", "w_ih_scale", G, I);
  check_weight(w_hh, s_hh, "w_hh_q", "w_hh_scale", G, H);
  check_f32(h0, "h0", {B, H});
  if (lstm) check_f32(c0, "c0", {B, H});
  Seq s{kind, lstm, input.contiguous(), h0.contiguous(), lstm ? c0.contiguous() : at::Tensor(), w_ih.contiguous(),
        s_ih.contiguous(), w_hh.contiguous(), s_hh.contiguous(), opt_f32(b_ih, "b_ih", G), opt_f32(b_hh, "b_hh", G),
        at::Tensor(), reverse, weight_only};
  if (lengths.has_value() && lengths->defined()) {
    FASTNN_CHECK_ARG(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == B &&
                         lengths->device().is_cpu(),
                     "lengths", "an int64 CPU tensor of shape [" + std::to_string(B) + "]", describe(*lengths));
    s.lengths = lengths->contiguous();
  }
  (void)T;
  return s;
}

// Gate math on one float or one vector of floats (the build's at::vec width). The vector forms use
// exp_u20 (a few ULP) and tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7), as the fp32 recurrent
// kernels do: Sleef's 1-ULP versions cost more than the int8 recurrent product at batch 1. exp_u20
// clamps its argument with min/max, which turn NaN into a finite bound, so sigmoid passes NaN
// through explicitly (as torch.sigmoid does); +-inf saturate to 1 and 0 as they should.
using Vec = at::vec::Vectorized<float>;

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

// Columns j.. of one batch row: x = input projection (with b_ih), r = recurrent product (with
// b_hh), gates i, f, g, o (LSTM) or r, z, n (GRU) at offsets 0, H, 2H, 3H; c and h updated in place.
template <typename V>
inline void lstm_cols(const float* x, const float* r, float* c, float* h, float* out, int64_t j, int64_t H) {
  using A = Act<V>;
  const V i = A::sigmoid(A::ld(x + j) + A::ld(r + j));
  const V f = A::sigmoid(A::ld(x + H + j) + A::ld(r + H + j));
  const V g = A::tanh(A::ld(x + 2 * H + j) + A::ld(r + 2 * H + j));
  const V o = A::sigmoid(A::ld(x + 3 * H + j) + A::ld(r + 3 * H + j));
  const V cn = f * A::ld(c + j) + i * g;
  const V hn = o * A::tanh(cn);
  A::st(c + j, cn);
  A::st(h + j, hn);
  A::st(out + j, hn);
}

template <typename V>
inline void gru_cols(const float* x, const float* r, float*, float* h, float* out, int64_t j, int64_t H) {
  using A = Act<V>;
  const V rr = A::sigmoid(A::ld(x + j) + A::ld(r + j));
  const V z = A::sigmoid(A::ld(x + H + j) + A::ld(r + H + j));
  const V n = A::tanh(A::ld(x + 2 * H + j) + rr * A::ld(r + 2 * H + j));
  const V hn = (V(1.f) - z) * n + z * A::ld(h + j);
  A::st(h + j, hn);
  A::st(out + j, hn);
}

template <typename V>
inline void rnn_cols(const float* x, const float* r, bool relu, float* h, float* out, int64_t j) {
  using A = Act<V>;
  const V hn = relu ? A::relu(A::ld(x + j) + A::ld(r + j)) : A::tanh(A::ld(x + j) + A::ld(r + j));
  A::st(h + j, hn);
  A::st(out + j, hn);
}

// Runs the recurrence; returns output [T, B, H] and fills h (and c) with the final state.
at::Tensor run(const Seq& s, at::Tensor& h, at::Tensor& c) {
  const int64_t T = s.input.size(0), B = s.input.size(1), I = s.input.size(2);
  const int64_t H = s.w_hh.size(1), G = s.w_hh.size(0);
  at::Tensor out = at::zeros({T, B, H}, s.input.options());
  h = s.h0.clone();
  if (s.lstm) c = s.c0.clone();
  if (T == 0 || B == 0) return out;
  Scratch scratch;
  // The input projection of every step at once: one [T*B, I] x [I, G] product.
  at::Tensor gi = at::empty({T, B, G}, s.input.options());
  linear(s.input.data_ptr<float>(), T * B, I, s.w_ih.data_ptr<int8_t>(), s.s_ih.data_ptr<float>(),
         ptr_or_null(s.b_ih), G, s.weight_only, gi.data_ptr<float>(), scratch);
  std::vector<float> gh(B * G);
  float* hp = h.data_ptr<float>();
  float* cp = s.lstm ? c.data_ptr<float>() : nullptr;
  const int64_t* len = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    // The recurrent product (h quantized per batch row in dynamic mode).
    linear(hp, B, H, s.w_hh.data_ptr<int8_t>(), s.s_hh.data_ptr<float>(), ptr_or_null(s.b_hh), G, s.weight_only,
           gh.data(), scratch);
    const float* git = gi.data_ptr<float>() + t * B * G;
    float* ot = out.data_ptr<float>() + t * B * H;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (len && t >= len[b]) continue;  // past this sequence's end: state kept, output zero
        const float* x = git + b * G;
        const float* r = gh.data() + b * G;
        float* cb = s.lstm ? cp + b * H : nullptr;
        float* hb = hp + b * H;
        float* ob = ot + b * H;
        int64_t j = 0;
        if (s.lstm) {
          for (; j + Vec::size() <= H; j += Vec::size()) lstm_cols<Vec>(x, r, cb, hb, ob, j, H);
          for (; j < H; ++j) lstm_cols<float>(x, r, cb, hb, ob, j, H);
        } else if (s.kind == Kind::GRU) {
          for (; j + Vec::size() <= H; j += Vec::size()) gru_cols<Vec>(x, r, cb, hb, ob, j, H);
          for (; j < H; ++j) gru_cols<float>(x, r, cb, hb, ob, j, H);
        } else {
          const bool relu = s.kind == Kind::RNN_RELU;
          for (; j + Vec::size() <= H; j += Vec::size()) rnn_cols<Vec>(x, r, relu, hb, ob, j);
          for (; j < H; ++j) rnn_cols<float>(x, r, relu, hb, ob, j);
        }
      }
    });
  }
  return out;
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& input, const at::Tensor& w_q, const at::Tensor& w_scale, const Opt& bias,
                       bool weight_only) {
  FASTNN_CHECK_ARG(input.scalar_type() == at::kFloat && input.dim() >= 1, "input",
                   "a float32 tensor [..., in_features]", describe(input));
  FASTNN_CHECK_ARG(w_q.dim() == 2, "w_q", "an int8 tensor [out_features, in_features]", describe(w_q));
  const int64_t N = w_q.size(0), K = input.size(-1);
  check_weight(w_q, w_scale, "w_q", "w_scale", N, K);
  at::Tensor b = opt_f32(bias, "bias", N);
  int64_t M = 1;  // not reshape(-1, K): with K = 0 the -1 would be ambiguous
  for (int64_t d = 0; d + 1 < input.dim(); ++d) M *= input.size(d);
  at::Tensor x = input.reshape({M, K}).contiguous();
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({M, N}, input.options());
  at::Tensor w = w_q.contiguous(), sw = w_scale.contiguous();
  Scratch scratch;
  linear(x.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), sw.data_ptr<float>(), ptr_or_null(b), N, weight_only,
         y.data_ptr<float>(), scratch);
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_lstm_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih_q,
    const at::Tensor& w_ih_scale, const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih,
    const Opt& b_hh, const Opt& lengths, bool reverse, bool weight_only) {
  Seq s = check_seq(Kind::LSTM, input, h0, c0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse,
                    weight_only);
  at::Tensor h, c;
  at::Tensor out = run(s, h, c);
  return {out, h, c};
}

std::tuple<at::Tensor, at::Tensor> int8_gru_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih_q, const at::Tensor& w_ih_scale,
    const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
    bool reverse, bool weight_only) {
  Seq s = check_seq(Kind::GRU, input, h0, at::Tensor(), w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                    reverse, weight_only);
  at::Tensor h, c;
  at::Tensor out = run(s, h, c);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> int8_rnn_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih_q, const at::Tensor& w_ih_scale,
    const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
    bool reverse, bool weight_only, c10::string_view nonlinearity) {
  const std::string nl(nonlinearity.data(), nonlinearity.size());
  FASTNN_CHECK_ARG(nl == "tanh" || nl == "relu", "nonlinearity", "'tanh' or 'relu'", "'" + nl + "'");
  Seq s = check_seq(nl == "tanh" ? Kind::RNN_TANH : Kind::RNN_RELU, input, h0, at::Tensor(), w_ih_q, w_ih_scale,
                    w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse, weight_only);
  at::Tensor h, c;
  at::Tensor out = run(s, h, c);
  return {out, h};
}

}  // namespace quantized
}  // namespace fastnn

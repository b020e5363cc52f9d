// CPU step kernels of the recurrent ops: the fused pointwise part of one time step (gates, state
// update, output, workspace; or their gradients), vectorised with at::vec over the hidden units
// and parallel over batch rows with one at::parallel_for. The math is cell_math.h's.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "rnn/cell_math.h"
#include "rnn/rnn.h"

namespace fastnn {
namespace rnn {
namespace {

using at::vec::Vectorized;

template <typename T>
struct ScalarOps {
  static T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
  static T tanh(T x) { return std::tanh(x); }
  static T relu(T x) { return x != x ? x : (x > T(0) ? x : T(0)); }  // NaN propagates, as torch.relu
  static T relu_grad(T h, T dh) { return h > T(0) ? dh : T(0); }
};

template <typename V>
struct VecOps {
  static V sigmoid(V x) { return (V(1) + x.neg().exp()).reciprocal(); }
  static V tanh(V x) { return x.tanh(); }
  static V relu(V x) { return at::vec::clamp_min(x, V(0)); }
  static V relu_grad(V h, V dh) { return V::blendv(V(0), dh, h > V(0)); }
};

// Columns j .. j+width-1 of a row as one value (a vector, or a scalar for the tail).
template <typename T>
struct ScalarIO {
  using W = T;
  using Ops = ScalarOps<T>;
  static constexpr int64_t kWidth = 1;
  static W load(const T* p) { return *p; }
  static void store(T* p, W v) { *p = v; }
};

template <typename T>
struct VecIO {
  using W = Vectorized<T>;
  using Ops = VecOps<W>;
  static constexpr int64_t kWidth = W::size();
  static W load(const T* p) { return W::loadu(p); }
  static void store(T* p, W v) { v.store(p); }
};

// Rows per parallel task: enough hidden units that a task outweighs the cost of a thread.
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)); }

bool row_active(const int64_t* lengths, int64_t b, int64_t t) { return !lengths || t < lengths[b]; }

template <typename T, typename IO>
inline void forward_cols(const FwdStep<T>& s, int64_t b, int64_t j) {
  using W = typename IO::W;
  using Ops = typename IO::Ops;
  const int64_t H = s.H, G = num_gates(s.cell) * H;
  const T* gi = s.gi + b * G;
  const T* gh = s.gh + b * G;
  T* ws = s.ws + b * ws_width(s.cell, H);
  auto pre = [&](int64_t k) { return IO::load(gi + k * H + j) + IO::load(gh + k * H + j); };
  W h_new;
  if (s.cell == Cell::LSTM) {
    LstmGates<W> a;
    W c_new;
    lstm_forward<W, Ops>(pre(0), pre(1), pre(2), pre(3), IO::load(s.c + b * H + j), a, c_new, h_new);
    IO::store(ws + j, a.i);
    IO::store(ws + H + j, a.f);
    IO::store(ws + 2 * H + j, a.g);
    IO::store(ws + 3 * H + j, a.o);
    IO::store(ws + 4 * H + j, c_new);
    IO::store(s.c + b * H + j, c_new);
    if (s.hpre) {
      IO::store(s.hpre + b * H + j, h_new);
      return;
    }
  } else if (s.cell == Cell::GRU) {
    W hn = IO::load(gh + 2 * H + j);
    if (s.b_hn) hn = hn + IO::load(s.b_hn + j);
    W r, z, n;
    gru_forward<W, Ops>(pre(0), pre(1), IO::load(gi + 2 * H + j), hn, IO::load(s.h + b * s.P + j), r, z,
                        n, h_new);
    IO::store(ws + j, r);
    IO::store(ws + H + j, z);
    IO::store(ws + 2 * H + j, n);
    IO::store(ws + 3 * H + j, hn);
  } else {
    h_new = rnn_forward<W, Ops>(pre(0), s.cell == Cell::RNN_RELU);
  }
  IO::store(s.h + b * s.P + j, h_new);
  IO::store(s.out + b * s.P + j, h_new);
}

template <typename T>
void forward_row(const FwdStep<T>& s, int64_t b) {
  const int64_t H = s.H;
  if (!row_active(s.lengths, b, s.t)) {
    const int64_t WS = ws_width(s.cell, H);
    std::fill_n(s.ws + b * WS, WS, T(0));
    if (s.hpre) {
      std::fill_n(s.hpre + b * H, H, T(0));
    } else {
      std::fill_n(s.out + b * s.P, s.P, T(0));
    }
    return;
  }
  int64_t j = 0;
  for (; j + VecIO<T>::kWidth <= H; j += VecIO<T>::kWidth) forward_cols<T, VecIO<T>>(s, b, j);
  for (; j < H; ++j) forward_cols<T, ScalarIO<T>>(s, b, j);
}

template <typename T, typename IO>
inline void backward_cols(const BwdStep<T>& s, int64_t b, int64_t j) {
  using W = typename IO::W;
  using Ops = typename IO::Ops;
  const int64_t H = s.H, G = num_gates(s.cell) * H;
  const T* ws = s.ws + b * ws_width(s.cell, H);
  T* dgi = s.dgi + b * G;
  T* dgh = s.dgh + b * G;
  // The gradient reaching this step's h: from later steps plus this step's output.
  W dh = IO::load(s.dh + b * H + j);
  if (s.grad_out) dh = dh + IO::load(s.grad_out + b * H + j);
  W direct(0);
  if (s.cell == Cell::LSTM) {
    LstmGates<W> a{IO::load(ws + j), IO::load(ws + H + j), IO::load(ws + 2 * H + j), IO::load(ws + 3 * H + j)};
    LstmGates<W> d;
    W dc = IO::load(s.dc + b * H + j);
    lstm_backward<W, Ops>(a, IO::load(ws + 4 * H + j), IO::load(s.c_prev + b * H + j), dh, dc, d);
    IO::store(s.dc + b * H + j, dc);
    IO::store(dgi + j, d.i);
    IO::store(dgi + H + j, d.f);
    IO::store(dgi + 2 * H + j, d.g);
    IO::store(dgi + 3 * H + j, d.o);
  } else if (s.cell == Cell::GRU) {
    W dxr, dxz, dxn, dhn;
    gru_backward<W, Ops>(IO::load(ws + j), IO::load(ws + H + j), IO::load(ws + 2 * H + j),
                         IO::load(ws + 3 * H + j), IO::load(s.h_prev + b * H + j), dh, dxr, dxz, dxn, dhn,
                         direct);
    IO::store(dgi + j, dxr);
    IO::store(dgi + H + j, dxz);
    IO::store(dgi + 2 * H + j, dxn);
    IO::store(dgh + j, dxr);
    IO::store(dgh + H + j, dxz);
    IO::store(dgh + 2 * H + j, dhn);
  } else {
    IO::store(dgi + j, rnn_backward<W, Ops>(IO::load(s.out + b * H + j), dh, s.cell == Cell::RNN_RELU));
  }
  if (!s.proj) IO::store(s.dh + b * H + j, direct);
}

template <typename T>
void backward_row(const BwdStep<T>& s, int64_t b) {
  const int64_t G = num_gates(s.cell) * s.H;
  if (!row_active(s.lengths, b, s.t)) {
    // Padding: no gate gradients; dh and dc pass through to the step before.
    std::fill_n(s.dgi + b * G, G, T(0));
    if (s.dgh != s.dgi) std::fill_n(s.dgh + b * G, G, T(0));
    return;
  }
  int64_t j = 0;
  for (; j + VecIO<T>::kWidth <= s.H; j += VecIO<T>::kWidth) backward_cols<T, VecIO<T>>(s, b, j);
  for (; j < s.H; ++j) backward_cols<T, ScalarIO<T>>(s, b, j);
}

}  // namespace

template <typename T>
void step_forward_cpu(const FwdStep<T>& s) {
  at::parallel_for(0, s.B, grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) forward_row<T>(s, b);
  });
}

template <typename T>
void step_backward_cpu(const BwdStep<T>& s) {
  at::parallel_for(0, s.B, grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) backward_row<T>(s, b);
  });
}

template void step_forward_cpu<float>(const FwdStep<float>&);
template void step_forward_cpu<double>(const FwdStep<double>&);
template void step_backward_cpu<float>(const BwdStep<float>&);
template void step_backward_cpu<double>(const BwdStep<double>&);

}  // namespace rnn
}  // namespace fastnn

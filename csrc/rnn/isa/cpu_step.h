// The CPU's fused pointwise step of the recurrent ops (gates, state update, output, workspace; or
// their gradients) for a range of hidden units of one batch row, vectorised with at::vec. The math
// is cell_math.h's. Used by the step-by-step path (step_cpu.cpp: one parallel region per step, after
// the recurrent GEMM) and by the packed whole-sequence path (packed_cpu.cpp: each block of hidden
// units right after its own recurrent products). Compiled once per instruction-set variant, inside
// that variant's namespace (cpu_isa.h: FASTNN_ISA_BEGIN). Width: VecIO's kWidth is
// Vectorized<T>::size() (8 floats in the default and avx2 variants, 16 in avx512, 4 with NEON);
// nothing here assumes a value, every loop runs whole vectors and then a scalar tail.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "cpu_isa.h"
#include "rnn/cell_math.h"
#include "rnn/rnn.h"

namespace fastnn {
namespace rnn {
FASTNN_ISA_BEGIN
namespace cpu {

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

// float: Sleef's 1-ULP exp and tanh cost more than the recurrent GEMM at batch 32; exp_u20 (a few
// ULP) and tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7, far inside fp32 GEMM noise) do not.
template <>
struct VecOps<Vectorized<float>> {
  using V = Vectorized<float>;
  // exp_u20 clamps its argument with min/max, which turns NaN into a number: keep NaN as NaN, as
  // torch's sigmoid does, so that a NaN input propagates through the gates.
  static V sigmoid(V x) { return V::blendv((V(1) + x.neg().exp_u20()).reciprocal(), x, x != x); }
  static V tanh(V x) { return V(2) * sigmoid(x + x) - V(1); }
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
inline int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)); }

inline bool row_active(const int64_t* lengths, int64_t b, int64_t t) { return !lengths || t < lengths[b]; }

template <typename T, typename IO>
inline void forward_cols(const FwdStep<T>& s, int64_t b, int64_t j) {
  using W = typename IO::W;
  using Ops = typename IO::Ops;
  const int64_t H = s.H, G = num_gates(s.cell) * H;
  const T* gi = s.gi + b * G;
  const T* gh = s.gh + b * G;
  T* ws = s.ws + b * ws_width(s.cell, H);
  auto input_part = [&](int64_t k) {
    const W x = IO::load(gi + k * H + j);
    return s.gi_bias ? x + IO::load(s.gi_bias + k * H + j) : x;
  };
  auto pre = [&](int64_t k) { return input_part(k) + IO::load(gh + k * H + j); };
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
    const T* h_prev = s.h_prev ? s.h_prev : s.h;
    gru_forward<W, Ops>(pre(0), pre(1), input_part(2), hn, IO::load(h_prev + b * s.P + j), r, z,
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

// Hidden units [j0, j1) of batch row b.
template <typename T>
inline void forward_block(const FwdStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.H;
  if (!row_active(s.lengths, b, s.t)) {
    // Padding: the state stays, output and workspace are zero.
    const int64_t WS = ws_width(s.cell, H);
    for (int64_t k = 0; k < WS; k += H) std::fill(s.ws + b * WS + k + j0, s.ws + b * WS + k + j1, T(0));
    if (s.hpre) {
      std::fill(s.hpre + b * H + j0, s.hpre + b * H + j1, T(0));
    } else {
      std::fill(s.out + b * s.P + j0, s.out + b * s.P + j1, T(0));
    }
    if (s.h_prev) std::copy(s.h_prev + b * s.P + j0, s.h_prev + b * s.P + j1, s.h + b * s.P + j0);
    return;
  }
  int64_t j = j0;
  for (; j + VecIO<T>::kWidth <= j1; j += VecIO<T>::kWidth) forward_cols<T, VecIO<T>>(s, b, j);
  for (; j < j1; ++j) forward_cols<T, ScalarIO<T>>(s, b, j);
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
inline void backward_row(const BwdStep<T>& s, int64_t b) {
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

// The step-by-step path's kernels (step_cpu.cpp).
template <typename T>
void step_forward(const FwdStep<T>& s);
template <typename T>
void step_backward(const BwdStep<T>& s);

}  // namespace cpu
FASTNN_ISA_END
}  // namespace rnn
}  // namespace fastnn

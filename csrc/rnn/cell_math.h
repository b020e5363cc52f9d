// The element-wise math of one recurrent step, written once for the CPU (at::vec vectors) and
// CUDA (scalars). `T` is the math type (float, double, or a Vectorized of them); `Ops` supplies
// sigmoid, tanh and relu for it. Gate order is torch.nn's: LSTM i, f, g, o; GRU r, z, n.
//
// Forward: `x*` are the pre-activations (input projection with the folded biases plus the
// recurrent product). Backward: `dh` is the gradient reaching this step's hidden output (from
// the next step and from `output`), `dc` the cell-state gradient from the next step; results are
// the gradients of the pre-activations (what the weight-gradient GEMMs consume).
#pragma once

#include <c10/macros/Macros.h>

namespace fastnn {
namespace rnn {

template <typename T>
struct LstmGates {
  T i, f, g, o;
};

// c_new = f*c + i*g, h = o*tanh(c_new); gates come back activated (they are the workspace).
template <typename T, typename Ops>
C10_HOST_DEVICE inline void lstm_forward(T xi, T xf, T xg, T xo, T c, LstmGates<T>& a, T& c_new,
                                         T& h) {
  a.i = Ops::sigmoid(xi);
  a.f = Ops::sigmoid(xf);
  a.g = Ops::tanh(xg);
  a.o = Ops::sigmoid(xo);
  c_new = a.f * c + a.i * a.g;
  h = a.o * Ops::tanh(c_new);
}

// dh: gradient of h (before any projection); dc: of c_new from later steps, replaced by the
// gradient of the previous cell state. d*: gradients of the four pre-activations.
template <typename T, typename Ops>
C10_HOST_DEVICE inline void lstm_backward(const LstmGates<T>& a, T c_new, T c_prev, T dh, T& dc,
                                          LstmGates<T>& d) {
  const T one(1);
  const T tc = Ops::tanh(c_new);
  const T dct = dc + dh * a.o * (one - tc * tc);
  d.i = dct * a.g * a.i * (one - a.i);
  d.f = dct * c_prev * a.f * (one - a.f);
  d.g = dct * a.i * (one - a.g * a.g);
  d.o = dh * tc * a.o * (one - a.o);
  dc = dct * a.f;
}

// torch's GRU: n = tanh(xn + r * hn) with hn = W_hn h + b_hn; h' = (1 - z) * n + z * h.
template <typename T, typename Ops>
C10_HOST_DEVICE inline void gru_forward(T xr, T xz, T xn, T hn, T h, T& r, T& z, T& n, T& h_new) {
  const T one(1);
  r = Ops::sigmoid(xr);
  z = Ops::sigmoid(xz);
  n = Ops::tanh(xn + r * hn);
  h_new = (one - z) * n + z * h;
}

// Gradients of the pre-activations on the input side (dxr, dxz, dxn) and of hn (dhn; the hidden
// side's r and z gradients equal dxr, dxz); dh_direct is the gradient reaching h through z*h.
template <typename T, typename Ops>
C10_HOST_DEVICE inline void gru_backward(T r, T z, T n, T hn, T h_prev, T dh, T& dxr, T& dxz,
                                         T& dxn, T& dhn, T& dh_direct) {
  const T one(1);
  const T dnp = dh * (one - z) * (one - n * n);
  dxn = dnp;
  dhn = dnp * r;
  dxr = dnp * hn * r * (one - r);
  dxz = dh * (h_prev - n) * z * (one - z);
  dh_direct = dh * z;
}

// Elman RNN: h = act(x). The derivative is taken from the output, as torch does.
template <typename T, typename Ops>
C10_HOST_DEVICE inline T rnn_forward(T x, bool relu) {
  return relu ? Ops::relu(x) : Ops::tanh(x);
}

template <typename T, typename Ops>
C10_HOST_DEVICE inline T rnn_backward(T h, T dh, bool relu) {
  return relu ? Ops::relu_grad(h, dh) : dh * (T(1) - h * h);
}

}  // namespace rnn
}  // namespace fastnn

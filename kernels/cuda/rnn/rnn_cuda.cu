// CUDA step kernels of the recurrent ops: the fused pointwise part of one time step (gates, state
// update, output, workspace; or their gradients), one thread per (batch row, hidden unit), on the
// current stream. The sequence driver (csrc/rnn/rnn_engine.cpp) runs the GEMMs with cuBLAS around
// them; the math is cell_math.h's, shared with the CPU kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "rnn/cell_math.h"
#include "rnn/rnn.h"

namespace fastnn {
namespace rnn {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct DevOps {
  static __device__ __forceinline__ T sigmoid(T x) { return T(1) / (T(1) + ::exp(-x)); }
  static __device__ __forceinline__ T tanh(T x) { return ::tanh(x); }
  static __device__ __forceinline__ T relu(T x) { return x != x ? x : (x > T(0) ? x : T(0)); }
  static __device__ __forceinline__ T relu_grad(T h, T dh) { return h > T(0) ? dh : T(0); }
};

__device__ __forceinline__ bool active(const int64_t* lengths, int64_t b, int64_t t) {
  return !lengths || t < lengths[b];
}

template <typename T>
__global__ void forward_kernel(FwdStep<T> s) {
  using Ops = DevOps<T>;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t H = s.H;
  if (idx >= s.B * H) return;
  const int64_t b = idx / H, j = idx % H;
  const int64_t G = num_gates(s.cell) * H, WS = ws_width(s.cell, H);
  T* ws = s.ws + b * WS;
  if (!active(s.lengths, b, s.t)) {
    for (int64_t k = j; k < WS; k += H) ws[k] = T(0);
    if (s.hpre) {
      s.hpre[b * H + j] = T(0);
    } else {
      s.out[b * s.P + j] = T(0);
    }
    return;
  }
  const T* gi = s.gi + b * G;
  const T* gh = s.gh + b * G;
  auto pre = [&](int k) { return gi[k * H + j] + gh[k * H + j]; };
  T h_new;
  if (s.cell == Cell::LSTM) {
    LstmGates<T> a;
    T c_new;
    lstm_forward<T, Ops>(pre(0), pre(1), pre(2), pre(3), s.c[b * H + j], a, c_new, h_new);
    ws[j] = a.i;
    ws[H + j] = a.f;
    ws[2 * H + j] = a.g;
    ws[3 * H + j] = a.o;
    ws[4 * H + j] = c_new;
    s.c[b * H + j] = c_new;
    if (s.hpre) {
      s.hpre[b * H + j] = h_new;
      return;
    }
  } else if (s.cell == Cell::GRU) {
    T hn = gh[2 * H + j] + (s.b_hn ? s.b_hn[j] : T(0));
    T r, z, n;
    gru_forward<T, Ops>(pre(0), pre(1), gi[2 * H + j], hn, s.h[b * s.P + j], r, z, n, h_new);
    ws[j] = r;
    ws[H + j] = z;
    ws[2 * H + j] = n;
    ws[3 * H + j] = hn;
  } else {
    h_new = rnn_forward<T, Ops>(pre(0), s.cell == Cell::RNN_RELU);
  }
  s.h[b * s.P + j] = h_new;
  s.out[b * s.P + j] = h_new;
}

template <typename T>
__global__ void backward_kernel(BwdStep<T> s) {
  using Ops = DevOps<T>;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t H = s.H;
  if (idx >= s.B * H) return;
  const int64_t b = idx / H, j = idx % H;
  const int64_t G = num_gates(s.cell) * H;
  T* dgi = s.dgi + b * G;
  T* dgh = s.dgh + b * G;
  if (!active(s.lengths, b, s.t)) {
    // padding: no gate gradients; dh and dc pass through to the step before
    for (int64_t k = j; k < G; k += H) {
      dgi[k] = T(0);
      dgh[k] = T(0);
    }
    return;
  }
  const T* ws = s.ws + b * ws_width(s.cell, H);
  T dh = s.dh[b * H + j];
  if (s.grad_out) dh += s.grad_out[b * H + j];
  T direct(0);
  if (s.cell == Cell::LSTM) {
    LstmGates<T> a{ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j]};
    LstmGates<T> d;
    T dc = s.dc[b * H + j];
    lstm_backward<T, Ops>(a, ws[4 * H + j], s.c_prev[b * H + j], dh, dc, d);
    s.dc[b * H + j] = dc;
    dgi[j] = d.i;
    dgi[H + j] = d.f;
    dgi[2 * H + j] = d.g;
    dgi[3 * H + j] = d.o;
  } else if (s.cell == Cell::GRU) {
    T dxr, dxz, dxn, dhn;
    gru_backward<T, Ops>(ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j], s.h_prev[b * H + j], dh, dxr,
                         dxz, dxn, dhn, direct);
    dgi[j] = dxr;
    dgi[H + j] = dxz;
    dgi[2 * H + j] = dxn;
    dgh[j] = dxr;
    dgh[H + j] = dxz;
    dgh[2 * H + j] = dhn;
  } else {
    dgi[j] = rnn_backward<T, Ops>(s.out[b * H + j], dh, s.cell == Cell::RNN_RELU);
  }
  if (!s.proj) s.dh[b * H + j] = direct;
}

unsigned blocks_for(int64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
void step_forward_cuda(const FwdStep<T>& s) {
  const int64_t n = s.B * s.H;
  if (n == 0) return;
  forward_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void step_backward_cuda(const BwdStep<T>& s) {
  const int64_t n = s.B * s.H;
  if (n == 0) return;
  backward_kernel<T><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void step_forward_cuda<float>(const FwdStep<float>&);
template void step_forward_cuda<double>(const FwdStep<double>&);
template void step_backward_cuda<float>(const BwdStep<float>&);
template void step_backward_cuda<double>(const BwdStep<double>&);

}  // namespace rnn
}  // namespace fastnn

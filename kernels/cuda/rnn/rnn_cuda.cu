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

// The pointwise step for (b, j), given this unit's recurrent products rec[k] of gate k (without
// bias). Shared by the step kernel (products from cuBLAS) and the persistent kernel (its own).
template <typename T>
__device__ __forceinline__ void point_forward(const FwdStep<T>& s, int64_t b, int64_t j, const T* rec) {
  using Ops = DevOps<T>;
  const int64_t H = s.H;
  const int64_t G = num_gates(s.cell) * H, WS = ws_width(s.cell, H);
  T* ws = s.ws + b * WS;
  const T* h_prev = s.h_prev ? s.h_prev : s.h;
  if (!active(s.lengths, b, s.t)) {
    for (int64_t k = j; k < WS; k += H) ws[k] = T(0);
    if (s.hpre) {
      s.hpre[b * H + j] = T(0);
    } else {
      s.out[b * s.P + j] = T(0);
    }
    if (s.h_prev) s.h[b * s.P + j] = h_prev[b * s.P + j];
    return;
  }
  const T* gi = s.gi + b * G;
  auto pre = [&](int k) { return gi[k * H + j] + rec[k]; };
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
    T hn = rec[2] + (s.b_hn ? s.b_hn[j] : T(0));
    T r, z, n;
    gru_forward<T, Ops>(pre(0), pre(1), gi[2 * H + j], hn, h_prev[b * s.P + j], r, z, n, h_new);
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
__global__ void forward_kernel(FwdStep<T> s) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t H = s.H;
  if (idx >= s.B * H) return;
  const int64_t b = idx / H, j = idx % H;
  const int64_t G = num_gates(s.cell) * H;
  T rec[4];
  for (int k = 0; k < num_gates(s.cell); ++k) rec[k] = s.gh[b * G + k * H + j];
  point_forward<T>(s, b, j, rec);
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


// ---------------------------------------------------------------------------------------------
// Persistent recurrent kernel (forward, float math, no projection, no recurrent mask). Opt-in
// (FASTNN_RNN_PERSISTENT=1, see rnn_engine.cpp): it has not yet been measured against the
// cuBLAS + step-kernel path it replaces.
//
// One block per 8 hidden units keeps those units' rows of W_hh (all gates: NG*8 rows of H) in
// shared memory for the whole sequence, so the recurrent weights are read from device memory once
// instead of once per step. Per step, for kRows batch rows at a time, the block stages those rows
// of h(t-1) in shared memory (coalesced loads, from L2: other blocks wrote them), then each warp
// computes one hidden unit's NG dot products for those rows, its 32 lanes splitting the H features
// (consecutive lanes read consecutive words: no bank conflicts) and a shuffle reduction summing
// them; lane 0 runs the pointwise step. Every thread is busy whatever B is. After the step all
// blocks meet at a grid barrier. The launch is cooperative, so that every block is resident (the
// barrier would hang otherwise); a sequence that does not fit (shared memory, block count) goes the
// step-by-step way.

constexpr int kUnits = 8;                     // hidden units per block, one warp each
constexpr int kPersistThreads = kUnits * 32;  // one warp per unit
constexpr int kRows = 4;                      // batch rows of h(t-1) staged at a time

// Sense-free generation barrier over `blocks` resident blocks. count/gen: two zeroed words.
__device__ __forceinline__ void grid_barrier(unsigned* count, volatile unsigned* gen, unsigned blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned my_gen = *gen;
    __threadfence();
    if (atomicAdd(count, 1u) == blocks - 1) {
      *count = 0;
      __threadfence();
      atomicAdd((unsigned*)gen, 1u);
    } else {
      while (*gen == my_gen) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

size_t persistent_smem(int NG, int64_t H) { return (size_t)(NG * kUnits + kRows) * H * sizeof(float); }

template <int NG>
__global__ void __launch_bounds__(kPersistThreads)
persistent_forward_kernel(FwdStep<float> s, const float* __restrict__ w_hh, float* hbuf, int64_t T,
                          bool reverse, unsigned* barrier) {
  extern __shared__ float smem[];
  const int64_t H = s.H, B = s.B, G = NG * H;
  float* w_s = smem;                   // [NG * kUnits][H]: row g * kUnits + u is gate g of unit j0 + u
  float* h_s = smem + NG * kUnits * H;  // [kRows][H]: the staged rows of h(t-1)
  const int64_t j0 = (int64_t)blockIdx.x * kUnits;
  for (int64_t i = threadIdx.x; i < NG * kUnits * H; i += blockDim.x) {
    const int64_t row = i / H, k = i % H;
    const int64_t g = row / kUnits, u = row % kUnits;
    w_s[i] = (j0 + u < H) ? w_hh[(g * H + j0 + u) * H + k] : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = j0 + warp;
  const float* w_unit = w_s + warp * H;  // gate g's row: w_unit + g * kUnits * H
  const int64_t WS = ws_width(s.cell, H);
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? T - 1 - step : step;
    FwdStep<float> st = s;
    st.h_prev = hbuf + (step & 1) * B * H;
    st.h = hbuf + ((step + 1) & 1) * B * H;
    st.gi = s.gi + t * B * G;
    st.out = s.out + t * B * H;
    st.ws = s.ws + t * B * WS;
    st.t = t;
    for (int64_t b0 = 0; b0 < B; b0 += kRows) {
      const int rows = (int)min((int64_t)kRows, B - b0);
      for (int64_t i = threadIdx.x; i < rows * H; i += blockDim.x) h_s[i] = __ldcg(st.h_prev + b0 * H + i);
      __syncthreads();
      float acc[kRows][NG];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int g = 0; g < NG; ++g) acc[r][g] = 0.f;
      }
      if (j < H) {
        for (int64_t k = lane; k < H; k += 32) {
          float w[NG];
#pragma unroll
          for (int g = 0; g < NG; ++g) w[g] = w_unit[g * kUnits * H + k];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r < rows) {
              const float hv = h_s[r * H + k];
#pragma unroll
              for (int g = 0; g < NG; ++g) acc[r][g] = fmaf(w[g], hv, acc[r][g]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int g = 0; g < NG; ++g) {
#pragma unroll
          for (int offset = 16; offset > 0; offset /= 2) acc[r][g] += __shfl_down_sync(0xffffffffu, acc[r][g], offset);
        }
      }
      if (lane == 0 && j < H) {
        for (int r = 0; r < rows; ++r) point_forward<float>(st, b0 + r, j, acc[r]);
      }
      __syncthreads();  // h_s is restaged for the next rows
    }
    __threadfence();
    grid_barrier(barrier, barrier + 1, gridDim.x);
  }
}

template <int NG>
bool launch_persistent(const FwdStep<float>& s, const float* w_hh, float* hbuf, int64_t T, bool reverse,
                       unsigned* barrier) {
  const int64_t blocks = (s.H + kUnits - 1) / kUnits;
  const size_t smem = persistent_smem(NG, s.H);
  int device = 0, sms = 0, max_smem = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem > (size_t)max_smem) return false;
  auto kernel = persistent_forward_kernel<NG>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistThreads, smem));
  if (blocks > (int64_t)per_sm * sms) return false;
  FwdStep<float> args = s;
  void* params[] = {&args, (void*)&w_hh, &hbuf, &T, &reverse, &barrier};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel((const void*)kernel, dim3((unsigned)blocks), dim3(kPersistThreads),
                                             params, smem, at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace

bool persistent_forward_cuda(const FwdStep<float>& s, const float* w_hh, float* hbuf, int64_t T, bool reverse,
                             unsigned* barrier) {
  switch (s.cell) {
    case Cell::LSTM: return launch_persistent<4>(s, w_hh, hbuf, T, reverse, barrier);
    case Cell::GRU: return launch_persistent<3>(s, w_hh, hbuf, T, reverse, barrier);
    default: return launch_persistent<1>(s, w_hh, hbuf, T, reverse, barrier);
  }
}

namespace {

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

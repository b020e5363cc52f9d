// CPU step kernels of the recurrent ops: the fused pointwise part of one time step (gates, state
// update, output, workspace; or their gradients), vectorised with at::vec over the hidden units
// and parallel over batch rows with one at::parallel_for. The math is cell_math.h's.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/Config.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

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

// float: Sleef's 1-ULP exp and tanh cost more than the recurrent GEMM at batch 32; exp_u20 (a few
// ULP) and tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7, far inside fp32 GEMM noise) do not.
template <>
struct VecOps<Vectorized<float>> {
  using V = Vectorized<float>;
  static V sigmoid(V x) { return (V(1) + x.neg().exp_u20()).reciprocal(); }
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
void forward_block(const FwdStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
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
    for (int64_t b = begin; b < end; ++b) forward_block<T>(s, b, 0, s.H);
  });
}

template <typename T>
void step_backward_cpu(const BwdStep<T>& s) {
  at::parallel_for(0, s.B, grain_rows(s.H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) backward_row<T>(s, b);
  });
}


// ---------------------------------------------------------------------------------------------
// Packed whole-sequence forward (see rnn.h, PackedForward).

namespace {

constexpr int64_t kBlock = 8;  // hidden units per block: one AVX2 vector of floats

// W_hh [G, K] -> per block of 8 hidden units, for each k, the NG gates' 8 weights side by side:
// [nb][K][NG][8], zero-padded past H. A block's slice (K*NG*8 floats) is contiguous. The buffer is
// the calling thread's and is reused across calls: a fresh 1 MB allocation per call costs more in
// page faults than the packing itself. (Packed weights are not cached across calls: a cache keyed
// on the tensor cannot see writes through `.data`, and would silently go stale.)
const float* pack_weights(const float* w, int64_t NG, int64_t H, int64_t K) {
  static thread_local std::vector<float> buffer;
  const int64_t nb = (H + kBlock - 1) / kBlock;
  const size_t n = (size_t)(nb * K * NG * kBlock);
  if (buffer.size() < n) buffer.resize(n);
  float* p = buffer.data();
  at::parallel_for(0, nb, std::max<int64_t>(1, nb / 8), [&](int64_t b0, int64_t b1) {
    for (int64_t jb = b0; jb < b1; ++jb) {
      float* dst = p + jb * K * NG * kBlock;
      const int64_t width = std::min(kBlock, H - jb * kBlock);
      for (int64_t g = 0; g < NG; ++g) {
        const float* rows = w + (g * H + jb * kBlock) * K;
        // contiguous reads of 8 rows at once, writes 8 apart within the block's slice
        for (int64_t k = 0; k < K; ++k) {
          float* d = dst + (k * NG + g) * kBlock;
          for (int64_t l = 0; l < width; ++l) d[l] = rows[l * K + k];
          for (int64_t l = width; l < kBlock; ++l) d[l] = 0.f;
        }
      }
    }
  });
  return p;
}

// gh[b, g*H + j0 .. j0+8] (+)= the recurrent products of one block over features [k0, k1), for R
// batch rows starting at b and the NGP gates g0 .. g0+NGP-1 (of NG in the packed layout). `wp` is
// the block's packed slice; `hin` the [B, K] input rows.
template <int NG, int NGP, int R>
inline void block_products(const float* wp, const float* hin, int64_t K, int64_t k0, int64_t k1, int64_t b,
                           int64_t H, int64_t j0, int64_t width, float* gh, bool accumulate, int g0) {
  using V = Vectorized<float>;
  const int64_t G = NG * H;
  V acc[R][NGP];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < NGP; ++g) {
      const float* src = gh + (b + r) * G + (g0 + g) * H + j0;
      acc[r][g] = !accumulate ? V(0.f) : (width == kBlock ? V::loadu(src) : V::loadu(src, (int)width));
    }
  }
  const float* h0 = hin + b * K;
  for (int64_t k = k0; k < k1; ++k) {
    V w[NGP];
    for (int g = 0; g < NGP; ++g) w[g] = V::loadu(wp + (k * NG + g0 + g) * kBlock);
    for (int r = 0; r < R; ++r) {
      const V hv(h0[r * K + k]);
      for (int g = 0; g < NGP; ++g) acc[r][g] = at::vec::fmadd(w[g], hv, acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < NGP; ++g) {
      float* dst = gh + (b + r) * G + (g0 + g) * H + j0;
      if (width == kBlock) {
        acc[r][g].store(dst);
      } else {
        acc[r][g].store(dst, (int)width);
      }
    }
  }
}

// All batch rows of one block over features [k0, k1), NGP gates at a time with R rows: R x NGP
// accumulators, NGP weight vectors and a broadcast fit the 16 vector registers with enough
// independent FMA chains to hide their latency (LSTM: two passes of 2 gates x 4 rows; GRU: 3 x 3).
template <int NG>
void block_all_rows(const float* w, const float* hin, int64_t K, int64_t k0, int64_t k1, int64_t B, int64_t H,
                    int64_t j0, int64_t width, float* gh) {
  constexpr int NGP = NG == 4 ? 2 : NG;
  constexpr int R = NG == 4 ? 4 : 3;
  const bool acc = k0 > 0;
  const int64_t full = B - B % R;
  for (int g0 = 0; g0 < NG; g0 += NGP) {
    for (int64_t b = 0; b < full; b += R) block_products<NG, NGP, R>(w, hin, K, k0, k1, b, H, j0, width, gh, acc, g0);
  }
  // the last rows (all of them at batch 1): every gate at once, for more independent chains
  int64_t b = full;
  for (; b + 2 <= B; b += 2) block_products<NG, NG, 2>(w, hin, K, k0, k1, b, H, j0, width, gh, acc, 0);
  if (b < B) block_products<NG, NG, 1>(w, hin, K, k0, k1, b, H, j0, width, gh, acc, 0);
}

// The eight horizontal sums of a[0..8) as one vector.
inline Vectorized<float> sum_each(Vectorized<float> (&a)[8]) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: low half [0 1 2 3 | ...] of each 128-bit lane; add the two lanes
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
#else
  float out[8];
  for (int r = 0; r < 8; ++r) {
    float v[8];
    a[r].store(v);
    out[r] = 0.f;
    for (int l = 0; l < 8; ++l) out[r] += v[l];
  }
  return Vectorized<float>::loadu(out);
#endif
}

// y[r] = w[r, :] . x for the `rows` (at most 8) rows of K starting at w: batch 1's recurrent
// product on W_hh in its own row-major layout (nothing repacked), and a streaming step's input
// projection. Eight rows at a time: eight independent FMA chains, one load of x per eight weight
// loads, one vector of eight sums at the end.
inline void dot_rows(const float* w, int64_t K, int64_t rows, const float* x, float* y) {
  using V = Vectorized<float>;
  const float* row[kBlock];
  for (int64_t r = 0; r < kBlock; ++r) row[r] = w + std::min(r, rows - 1) * K;  // past the end: repeat
  V acc[kBlock];
  for (auto& a : acc) a = V(0.f);
  int64_t k = 0;
  for (; k + kBlock <= K; k += kBlock) {
    const V xv = V::loadu(x + k);
    for (int r = 0; r < kBlock; ++r) acc[r] = at::vec::fmadd(V::loadu(row[r] + k), xv, acc[r]);
  }
  if (k < K) {
    const int n = (int)(K - k);
    const V xv = V::loadu(x + k, n);
    for (int r = 0; r < kBlock; ++r) acc[r] = at::vec::fmadd(V::loadu(row[r] + k, n), xv, acc[r]);
  }
  const V sums = sum_each(acc);
  if (rows == kBlock) {
    sums.store(y);
  } else {
    sums.store(y, (int)rows);
  }
}

// gh[g*H + j0 .. j0+width) = W_hh[g*H + j0 + r, :] . hin for every gate g (hin: one row of K).
template <int NG>
void block_dots(const float* w_hh, const float* hin, int64_t K, int64_t H, int64_t j0, int64_t width,
                float* gh) {
  for (int g = 0; g < NG; ++g) dot_rows(w_hh + (g * H + j0) * K, K, width, hin, gh + g * H + j0);
}

// at::parallel_for's tasks run at the same time, one per thread of an OpenMP team, so they may
// wait for each other. (ATen's native thread pool may run them one after another.)
constexpr bool kTasksRunConcurrently = AT_PARALLEL_OPENMP;

// A barrier for the tasks of one at::parallel_for over [0, n): a task covering tasks [v0, v1)
// (all n of them when the call runs inline) counts v1 - v0. The count only grows: generation g
// opens when it reaches n * g. A waiter spins for a while (the others are a microsecond away when
// every thread has a core), then sleeps, so that a busy machine, where the thread it waits for may
// not be running, does not lose that thread's core to the spinning.
class StepBarrier {
 public:
  explicit StepBarrier(int64_t n) : n_(n) {}
  void arrive_and_wait(int64_t tasks, int64_t generation) {
    const int64_t target = n_ * generation;
    if (arrived_.fetch_add(tasks) + tasks >= target) {
      if (sleepers_.load() > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        opened_.notify_all();
      }
      return;
    }
    for (int spin = 0; spin < kSpins; ++spin) {
      if (arrived_.load(std::memory_order_acquire) >= target) return;
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1);  // before the check in wait(): an arrival after it sees a sleeper
    opened_.wait(lock, [&] { return arrived_.load() >= target; });
    sleepers_.fetch_sub(1);
  }

 private:
  static constexpr int kSpins = 2000;  // some tens of microseconds
  const int64_t n_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable opened_;
};

// Features per pass over the batch: a block's weights for them (kChunkK * NG * 8 floats, 8 KB for
// an LSTM) stay in L1 while every batch row uses them.
constexpr int64_t kChunkK = 64;

template <int NG>
void packed_forward(const PackedForward& f) {
  static_assert(Vectorized<float>::size() == kBlock, "a block is one vector of floats");
  const int64_t T = f.T, B = f.B, H = f.H, G = NG * H, WS = ws_width(f.cell, H);
  const int64_t nb = (H + kBlock - 1) / kBlock;
  // Batch 1 reads W_hh in place; larger batches repack it so that a block's weights serve every row.
  const bool dots = B == 1;
  const float* wp = dots ? nullptr : pack_weights(f.w_hh, NG, H, H);
  std::vector<float> gh((size_t)(B * G));
  std::vector<float> hbuf((size_t)(2 * B * H));
  std::copy(f.h, f.h + B * H, hbuf.begin());
  // One task per thread, each a fixed range of blocks (the same range every step, so a thread's
  // weights stay in its core's caches); small problems run on one thread.
  const int64_t macs = B * G * H;
  const int64_t threads = macs < 32768 ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = (nb + threads - 1) / threads;
  std::vector<float> hm(f.h_mask ? (size_t)(threads * B * H) : 0);  // each task's masked state

  // One step for tasks [v0, v1) of `threads`.
  auto one_step = [&](int64_t v0, int64_t v1, int64_t step) {
    const int64_t b0 = std::min(nb, v0 * grain), b1 = std::min(nb, v1 * grain);
    const int64_t t = f.reverse ? T - 1 - step : step;
    const int64_t cur = step % 2;  // double-buffered state: h_prev, then h_new
    const float* h_prev = hbuf.data() + cur * B * H;
    float* h_new = hbuf.data() + (1 - cur) * B * H;
    const float* hin = h_prev;
    if (f.h_mask) {
      float* m = hm.data() + v0 * B * H;
      for (int64_t i = 0; i < B * H; ++i) m[i] = h_prev[i] * f.h_mask[i];
      hin = m;
    }
    FwdStep<float> s{f.cell, B, H, H, f.gi + t * B * G, gh.data(), f.b_hn, h_new, h_prev, f.c,
                     f.out + t * B * H, f.ws + t * B * WS, nullptr, f.lengths, t, f.gi_bias};
    // Serpentine order: every other step walks this thread's blocks backwards, so the weights
    // it streamed last are used first, while they are still in its core's L2. (Walking a slice
    // about the size of L2 in the same order every step misses on every line under LRU.)
    for (int64_t n = 0; n < b1 - b0; ++n) {
      const int64_t jb = (step % 2 == 0) ? b0 + n : b1 - 1 - n;
      const int64_t j0 = jb * kBlock, width = std::min(kBlock, H - j0);
      if (dots) {
        block_dots<NG>(f.w_hh, hin, H, H, j0, width, gh.data());
        forward_block<float>(s, 0, j0, j0 + width);
        continue;
      }
      const float* w = wp + jb * H * NG * kBlock;
      for (int64_t k0 = 0; k0 < H; k0 += kChunkK) {
        const int64_t k1 = std::min(H, k0 + kChunkK);
        block_all_rows<NG>(w, hin, H, k0, k1, B, H, j0, width, gh.data());
      }
      for (int64_t b = 0; b < B; ++b) forward_block<float>(s, b, j0, j0 + width);
    }
  };
  if (threads == 1) {
    for (int64_t step = 0; step < T; ++step) one_step(0, 1, step);
  } else if (kTasksRunConcurrently) {
    // One parallel region for the whole sequence, the tasks meeting at a barrier after every step
    // (the next step reads every task's part of h_new and overwrites h_prev): a fork and a join
    // per step would cost about a tenth of a batch-1 step.
    StepBarrier barrier(threads);
    at::parallel_for(0, threads, 1, [&](int64_t v0, int64_t v1) {
      for (int64_t step = 0; step < T; ++step) {
        one_step(v0, v1, step);
        barrier.arrive_and_wait(v1 - v0, step + 1);
      }
    });
  } else {
    for (int64_t step = 0; step < T; ++step) {
      at::parallel_for(0, threads, 1, [&](int64_t v0, int64_t v1) { one_step(v0, v1, step); });
    }
  }
  const int64_t cur = T % 2;
  std::copy(hbuf.begin() + cur * B * H, hbuf.begin() + (cur + 1) * B * H, f.h);
}

}  // namespace

void matvec_cpu(const float* w, int64_t R, int64_t K, const float* x, float* y) {
  const int64_t nb = (R + kBlock - 1) / kBlock;
  // a task reads at least 256 KB of weights: less is not worth waking a thread
  const int64_t grain = std::max<int64_t>(1, (int64_t)65536 / (kBlock * std::max<int64_t>(K, 1)));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) dot_rows(w + b * kBlock * K, K, std::min(kBlock, R - b * kBlock), x, y + b * kBlock);
  });
}

void packed_forward_cpu(const PackedForward& f) {
  switch (f.cell) {
    case Cell::LSTM: return packed_forward<4>(f);
    case Cell::GRU: return packed_forward<3>(f);
    default: return packed_forward<1>(f);
  }
}

template void step_forward_cpu<float>(const FwdStep<float>&);
template void step_forward_cpu<double>(const FwdStep<double>&);
template void step_backward_cpu<float>(const BwdStep<float>&);
template void step_backward_cpu<double>(const BwdStep<double>&);

}  // namespace rnn
}  // namespace fastnn

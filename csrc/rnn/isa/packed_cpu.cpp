// The packed whole-sequence CPU forward of the recurrent ops (float, no projection; see rnn.h,
// PackedForward): per step one parallel region over blocks of hidden units; each block computes
// its own gates' recurrent products from a packed copy of W_hh (batch 1: W_hh in place, with dot
// products) and then their pointwise step (cpu_step.h). The tasks meet at a barrier after every
// step (step_barrier.h). Also the matrix-vector product of a streaming step's input projection.
// Compiled once per instruction-set variant, in its namespace (cpu_isa.h); this file also holds the
// variant's table of CPU kernels (rnn.h, CpuKernels).
//
// Vector width: a block is one Vectorized<float> of hidden units, kBlock = its size(): 8 in the
// default and avx2 variants, 16 in avx512, 4 with NEON. Every loop, buffer and layout below is
// written in kBlock (packed_block.h: the blocks' products, and sum_each's per-ISA reductions).
#include <ATen/Parallel.h>

#include <vector>

#include "rnn/isa/cpu_step.h"
#include "rnn/isa/packed_block.h"
#include "rnn/rnn.h"
#include "rnn/isa/step_barrier.h"

namespace fastnn {
namespace rnn {
FASTNN_ISA_BEGIN

using at::vec::Vectorized;
using cpu::forward_block;
using namespace packed;

namespace {

// W_hh [G, K] -> per block of kBlock hidden units, for each k, the NG gates' kBlock weights side by side:
// [nb][K][NG][kBlock], zero-padded past H. A block's slice (K*NG*kBlock floats) is contiguous. The buffer is
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
        // contiguous reads of kBlock rows at once, writes kBlock apart within the block's slice
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

// gh[g*H + j0 .. j0+width) = W_hh[g*H + j0 + r, :] . hin for every gate g (hin: one row of K).
template <int NG>
void block_dots(const float* w_hh, const float* hin, int64_t K, int64_t H, int64_t j0, int64_t width,
                float* gh) {
  for (int g = 0; g < NG; ++g) dot_rows(w_hh + (g * H + j0) * K, K, width, hin, gh + g * H + j0);
}

// Features per pass over the batch: a block's weights for them (kChunkK * NG * kBlock floats, 8 KB
// for an LSTM with 8 lanes, 16 KB with 16) stay in L1 while every batch row uses them.
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
  const int64_t threads = cpu::packed_tasks(B * G * H, at::get_num_threads(), cpu::available_cores());
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
  cpu::run_in_lockstep(threads, T, one_step);  // the next step reads every task's part of h_new
  const int64_t cur = T % 2;
  std::copy(hbuf.begin() + cur * B * H, hbuf.begin() + (cur + 1) * B * H, f.h);
}

void matvec(const float* w, int64_t R, int64_t K, const float* x, float* y) {
  const int64_t nb = (R + kBlock - 1) / kBlock;
  // a task reads at least 256 KB of weights: less is not worth waking a thread
  const int64_t grain = std::max<int64_t>(1, (int64_t)65536 / (kBlock * std::max<int64_t>(K, 1)));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) dot_rows(w + b * kBlock * K, K, std::min(kBlock, R - b * kBlock), x, y + b * kBlock);
  });
}

void packed_forward_any(const PackedForward& f) {
  switch (f.cell) {
    case Cell::LSTM: return packed_forward<4>(f);
    case Cell::GRU: return packed_forward<3>(f);
    default: return packed_forward<1>(f);
  }
}

const CpuKernels kKernels{packed_forward_any,        matvec,
                          cpu::step_forward<float>,  cpu::step_forward<double>,
                          cpu::step_backward<float>, cpu::step_backward<double>};

}  // namespace

const CpuKernels& cpu_kernels() { return kKernels; }

FASTNN_ISA_END
}  // namespace rnn
}  // namespace fastnn

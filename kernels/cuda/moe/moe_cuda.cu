// CUDA kernels of the MoE routing ops: gating + permutation metadata with no host synchronisation,
// the token gather, and the weighted combine (and its backward).
//
//   gating_kernel          one warp per token: scores (softmax / sigmoid / logits), selection bias,
//                          grouped routing (groups <= 32), top-k by k warp arg-max rounds (ties:
//                          lower index; NaN ranks as -inf), the weights, and a histogram of the
//                          choices (atomics).
//   layout: a counting sort of the slots by expert (bucket E: dropped slots, after every kept one),
//   O(T*k + tiles*E) work:
//     tile_histogram_kernel  one block per tile of kTileSlots slots: its count per bucket (shared
//                            atomics);
//     tile_offsets_kernel    one block: every (tile, bucket)'s first row, i.e. the slots of lower
//                            buckets plus those of the same bucket in earlier tiles;
//     scatter_kernel         one warp per tile, walking it in slot order 32 slots at a time: a
//                            slot's row is its bucket's running row in the tile plus its rank among
//                            the lanes of the same bucket (__match_any_sync), so rows within an
//                            expert keep slot order (the reference's stable sort).
//   Capacity routing is not done here (the ops layer sends it to the reference path, which also
//   runs on the GPU without synchronising).
//
// Every index read from a tensor (slots, rows) is range-checked on the device: an index out of
// range reads nothing and gives zeros. The ops check index values on CPU tensors; on the GPU
// that would synchronise, so bad input there can give a wrong answer but never an out-of-bounds
// access. Index arithmetic is 64-bit wherever it grows with tokens x experts or tokens x hidden.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <climits>
#include <limits>

#include "common.h"
#include "moe/moe.h"

namespace fastnn {
namespace moe {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// (value, index) arg-max across the warp: larger value wins, ties and -inf go to the lower index;
// index INT_MAX marks "no candidate" and never wins over a real one.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    T ov = __shfl_xor_sync(kFull, v, o);
    int oi = __shfl_xor_sync(kFull, i, o);
    bool take = (oi != INT_MAX) && (i == INT_MAX || ov > v || (ov == v && oi < i));
    if (take) {
      v = ov;
      i = oi;
    }
  }
}

template <typename T>
__device__ __forceinline__ bool is_nan(T v) {
  return v != v;
}

template <typename scalar_t, typename acc_t>
__global__ void gating_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ bias,
                              acc_t* __restrict__ weights, int64_t* __restrict__ ids,
                              unsigned long long* __restrict__ counts, int64_t T, int E, int k, int score,
                              bool renorm, int groups, int topk_groups, bool top2, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // holds double scores too
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Per warp: x[E], scores[E] (acc_t), then flags[E] (0 ineligible, 1 eligible, 2 picked).
  acc_t* x = reinterpret_cast<acc_t*>(smem_raw) + static_cast<int64_t>(warp) * 2 * E;
  unsigned char* flags = smem_raw + kWarpsPerBlock * 2 * E * sizeof(acc_t) + static_cast<int64_t>(warp) * E;
  acc_t* sc = x + E;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= T) return;  // whole warps exit together: only __syncwarp below
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const scalar_t* row = logits + t * E;
  acc_t mx = -inf;
  bool nan = false;
  for (int e = lane; e < E; e += 32) {
    acc_t v = static_cast<acc_t>(row[e]);
    x[e] = v;
    nan = nan || is_nan(v);
    mx = max(mx, v);
  }
  mx = warp_max(mx);
  nan = __any_sync(kFull, nan);
  if (score == 0) {  // softmax over every expert
    acc_t s = 0;
    for (int e = lane; e < E; e += 32) s += exp(x[e] - mx);
    s = warp_sum(s);
    for (int e = lane; e < E; e += 32) sc[e] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : exp(x[e] - mx) / s;
  } else if (score == 2) {  // sigmoid
    for (int e = lane; e < E; e += 32) sc[e] = acc_t(1) / (acc_t(1) + exp(-x[e]));
  } else {  // topk_softmax ranks the logits
    for (int e = lane; e < E; e += 32) sc[e] = x[e];
  }
  __syncwarp();
  // Selection scores live in registers as a function of the shared scores.
  auto sel = [&](int e) {
    acc_t v = sc[e] + (bias ? bias[e] : acc_t(0));
    return is_nan(v) ? -inf : v;
  };
  if (groups > 1) {
    const int gsz = E / groups;
    acc_t gs = -inf;
    if (lane < groups) {
      acc_t best = -inf, second = -inf;
      for (int i = 0; i < gsz; ++i) {
        acc_t v = sel(lane * gsz + i);
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      gs = top2 ? (gsz > 1 ? best + second : best) : best;
      if (is_nan(gs)) gs = -inf;
    }
    unsigned chosen = 0;
    for (int r = 0; r < topk_groups; ++r) {
      acc_t v = (lane < groups && !((chosen >> lane) & 1u)) ? gs : -inf;
      int i = (lane < groups && !((chosen >> lane) & 1u)) ? lane : INT_MAX;
      warp_argmax(v, i);
      chosen |= 1u << i;
    }
    for (int e = lane; e < E; e += 32) flags[e] = (chosen >> (e / gsz)) & 1u;
  } else {
    for (int e = lane; e < E; e += 32) flags[e] = 1;
  }
  __syncwarp();
  int my_id = -1;  // lane j < k holds the j-th choice
  for (int j = 0; j < k; ++j) {
    acc_t v = -inf;
    int i = INT_MAX;
    for (int e = lane; e < E; e += 32) {
      if (flags[e] != 1) continue;
      acc_t s = sel(e);
      if (i == INT_MAX || s > v) {  // lanes visit their experts in increasing order: ties keep the lower
        v = s;
        i = e;
      }
    }
    warp_argmax(v, i);
    if (lane == 0) flags[i] = 2;
    if (lane == j) my_id = i;
    __syncwarp();
  }
  const bool mine = lane < k;
  acc_t w = 0;
  if (score == 1) {
    acc_t xv = mine ? x[my_id] : -inf;
    acc_t m = warp_max(xv);
    acc_t ev = mine ? exp(xv - m) : acc_t(0);
    acc_t s = warp_sum(ev);
    w = nan ? std::numeric_limits<acc_t>::quiet_NaN() : ev / s;
  } else {
    w = mine ? sc[my_id] : acc_t(0);
    if (renorm) {
      acc_t denom = warp_sum(w) + (score == 2 ? acc_t(1e-20) : acc_t(0));
      if (denom == 0) denom = 1;
      w = w / denom;
    }
  }
  if (mine) {
    weights[t * k + lane] = w * scale;
    ids[t * k + lane] = my_id;
    atomicAdd(counts + my_id, 1ULL);
  }
}

constexpr int kTileSlots = 1024;

__device__ __forceinline__ int64_t bucket_of(int64_t id, int E) { return (id >= 0 && id < E) ? id : E; }

__global__ void tile_histogram_kernel(const int64_t* __restrict__ ids, int64_t* __restrict__ hist, int64_t N, int E) {
  extern __shared__ int counts_smem[];  // E + 1 buckets
  for (int b = threadIdx.x; b <= E; b += blockDim.x) counts_smem[b] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTileSlots;
  for (int i = threadIdx.x; i < kTileSlots && base + i < N; i += blockDim.x)
    atomicAdd(counts_smem + bucket_of(ids[base + i], E), 1);
  __syncthreads();
  int64_t* row = hist + static_cast<int64_t>(blockIdx.x) * (E + 1);
  for (int b = threadIdx.x; b <= E; b += blockDim.x) row[b] = counts_smem[b];
}

template <int kThreads>
__global__ void tile_offsets_kernel(int64_t* __restrict__ hist, int64_t n_tiles, int E) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const int buckets = E + 1;
  for (int b0 = 0; b0 < buckets; b0 += kThreads) {
    const int b = b0 + threadIdx.x;
    int64_t total = 0;
    if (b < buckets)
      for (int64_t t = 0; t < n_tiles; ++t) total += hist[t * buckets + b];
    int64_t start, chunk_total;
    Scan(tmp).ExclusiveSum(total, start, chunk_total);
    start += carry;
    if (b < buckets) {
      for (int64_t t = 0; t < n_tiles; ++t) {  // running first rows down the tiles
        const int64_t c = hist[t * buckets + b];
        hist[t * buckets + b] = start;
        start += c;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += chunk_total;
    __syncthreads();
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ first,
                               int64_t* __restrict__ sorted_slots, int64_t* __restrict__ positions, int64_t N,
                               int E) {
  extern __shared__ int64_t next_row[];  // E + 1 buckets: this tile's next row per bucket
  const int lane = threadIdx.x;
  const int64_t tile = blockIdx.x;
  for (int b = lane; b <= E; b += 32) next_row[b] = first[tile * (E + 1) + b];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  for (int i0 = 0; i0 < kTileSlots; i0 += 32) {
    const int64_t s = tile * kTileSlots + i0 + lane;
    const bool valid = s < N;
    const int b = valid ? static_cast<int>(bucket_of(ids[s], E)) : -1;
    const unsigned peers = __match_any_sync(kFull, b);
    const int64_t row = valid ? next_row[b] + __popc(peers & lower) : 0;
    __syncwarp();
    if (valid) {
      sorted_slots[row] = s;
      positions[s] = row;
      if ((peers >> lane) == 1u) next_row[b] += __popc(peers);  // the highest lane of the bucket
    }
    __syncwarp();
  }
}

template <typename scalar_t>
__global__ void permute_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ slots,
                               scalar_t* __restrict__ out, int64_t T, int64_t H, int64_t top_k) {
  const int64_t p = blockIdx.x;
  const int64_t s = slots[p];
  const bool ok = s >= 0 && s / top_k < T;
  const int64_t tok = ok ? s / top_k : 0;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) out[p * H + h] = ok ? x[tok * H + h] : scalar_t(0);
}

template <typename scalar_t, typename acc_t>
__global__ void combine_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ pos,
                               const acc_t* __restrict__ w, scalar_t* __restrict__ out, int64_t N, int64_t H, int k) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    acc_t acc = 0;
    for (int j = 0; j < k; ++j) {
      const int64_t p = pos[t * k + j];
      if (p >= 0 && p < N) acc += w[t * k + j] * static_cast<acc_t>(y[p * H + h]);
    }
    out[t * H + h] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void weighted_rows_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ slots,
                                     const acc_t* __restrict__ w, scalar_t* __restrict__ out, int64_t N, int64_t H,
                                     int64_t k) {
  const int64_t p = blockIdx.x;
  const int64_t s = slots[p];
  const bool ok = s >= 0 && s < N;  // -1: a row no slot reaches (see fastnn/ops/moe/_library.py)
  const acc_t ws = ok ? w[s] : acc_t(0);
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
    out[p * H + h] = ok ? static_cast<scalar_t>(ws * static_cast<acc_t>(g[(s / k) * H + h])) : scalar_t(0);
}

template <typename scalar_t, typename acc_t>
__global__ void row_dot_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                               const int64_t* __restrict__ pos, acc_t* __restrict__ out, int64_t S, int64_t H,
                               int64_t k) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (s >= S) return;
  const int64_t p = pos[s];
  if (p < 0 || p >= S) {  // out of range: reads nothing
    if (lane == 0) out[s] = acc_t(0);
    return;
  }
  const scalar_t* a = g + (s / k) * H;
  const scalar_t* b = y + p * H;
  acc_t acc = 0;
  for (int64_t h = lane; h < H; h += 32) acc += static_cast<acc_t>(a[h]) * static_cast<acc_t>(b[h]);
  acc = warp_sum(acc);
  if (lane == 0) out[s] = acc;
}

int threads_for(int64_t H) { return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (H + 31) / 32 * 32))); }

}  // namespace

GatingResult topk_gating_cuda(const at::Tensor& logits_in, const Routing& r) {
  FASTNN_CHECK_ARG(r.capacity == 0, "capacity_factor",
                   "0 on the CUDA kernel (capacity routing runs on the reference path; fastnn.ops picks it)",
                   "a capacity limit");
  const c10::cuda::OptionalCUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0);
  const int E = static_cast<int>(logits.size(1));
  const int k = static_cast<int>(r.top_k);
  FASTNN_CHECK_ARG(k <= 32, "top_k", "at most 32 on the CUDA kernel (one warp lane per choice)", std::to_string(k));
  FASTNN_CHECK_ARG(r.num_groups <= 32, "num_groups", "at most 32 on the CUDA kernel", std::to_string(r.num_groups));
  const auto wdtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(wdtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({E}, ids.options());
  at::Tensor sorted_slots = at::empty({T * k}, ids.options());
  at::Tensor positions = at::empty({T, k}, ids.options());
  if (T == 0) return {weights, ids, counts, sorted_slots, positions};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int score = r.score == ScoreFunc::Softmax ? 0 : (r.score == ScoreFunc::TopkSoftmax ? 1 : 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor bias;
    if (r.selection_bias.defined()) bias = r.selection_bias.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const size_t smem = kWarpsPerBlock * E * (2 * sizeof(acc_t) + 1);
    FASTNN_CHECK_ARG(smem <= 48 * 1024, "logits",
                     "at most " + std::to_string(48 * 1024 / (kWarpsPerBlock * (2 * sizeof(acc_t) + 1))) +
                         " experts on the CUDA gating kernel for this dtype (a token's scores live in shared memory)",
                     describe(logits));
    const unsigned blocks = static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
    gating_kernel<scalar_t, acc_t><<<blocks, kWarpsPerBlock * 32, smem, stream>>>(
        logits.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<acc_t>() : nullptr, weights.data_ptr<acc_t>(),
        ids.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), T, E, k, score,
        r.renormalize, static_cast<int>(r.num_groups), static_cast<int>(r.topk_groups), r.group_top2_sum,
        static_cast<acc_t>(r.scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t N = T * k, n_tiles = (N + kTileSlots - 1) / kTileSlots;
  at::Tensor hist = at::empty({n_tiles, E + 1}, ids.options());
  tile_histogram_kernel<<<static_cast<unsigned>(n_tiles), 256, (E + 1) * sizeof(int), stream>>>(
      ids.data_ptr<int64_t>(), hist.data_ptr<int64_t>(), N, E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tile_offsets_kernel<256><<<1, 256, 0, stream>>>(hist.data_ptr<int64_t>(), n_tiles, E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scatter_kernel<<<static_cast<unsigned>(n_tiles), 32, (E + 1) * sizeof(int64_t), stream>>>(
      ids.data_ptr<int64_t>(), hist.data_ptr<int64_t>(), sorted_slots.data_ptr<int64_t>(),
      positions.data_ptr<int64_t>(), N, E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids, counts, sorted_slots, positions};
}

at::Tensor permute_tokens_cuda(const at::Tensor& x_in, const at::Tensor& sorted_slots, int64_t top_k) {
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t N = sorted_slots.size(0), H = x.size(1);
  at::Tensor out = at::empty({N, H}, x.options());
  if (N == 0 || H == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "permute_tokens_cuda", [&] {
    permute_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for(H), 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), sorted_slots.contiguous().data_ptr<int64_t>(), out.data_ptr<scalar_t>(), x.size(0), H,
        top_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpermute_tokens_cuda(const at::Tensor& y_in, const at::Tensor& slot_positions, const at::Tensor& weights) {
  const c10::cuda::OptionalCUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const int64_t T = slot_positions.size(0), H = y.size(1);
  const int k = static_cast<int>(slot_positions.size(1));
  at::Tensor out = at::empty({T, H}, y.options());
  if (T == 0 || H == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_tokens_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    combine_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), threads_for(H), 0, at::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), slot_positions.contiguous().data_ptr<int64_t>(), w.data_ptr<acc_t>(),
        out.data_ptr<scalar_t>(), y.size(0), H, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y_in,
                                                                  const at::Tensor& slot_positions,
                                                                  const at::Tensor& weights,
                                                                  const at::Tensor& sorted_slots) {
  const c10::cuda::OptionalCUDAGuard guard(y_in.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t T = slot_positions.size(0), k = slot_positions.size(1), N = y.size(0), H = y.size(1);
  at::Tensor gy = at::empty_like(y);
  at::Tensor gw = at::empty({T, k}, weights.options());
  if (N == 0) return {gy, gw};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_tokens_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor gw_acc = at::empty({T, k}, w.options());
    if (H > 0) {
      weighted_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), threads_for(H), 0, stream>>>(
          g.data_ptr<scalar_t>(), sorted_slots.contiguous().data_ptr<int64_t>(), w.data_ptr<acc_t>(),
          gy.data_ptr<scalar_t>(), N, H, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    row_dot_kernel<scalar_t, acc_t><<<static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock),
                                      kWarpsPerBlock * 32, 0, stream>>>(
        g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), slot_positions.contiguous().data_ptr<int64_t>(),
        gw_acc.data_ptr<acc_t>(), N, H, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gw.copy_(gw_acc);
  });
  return {gy, gw};
}

}  // namespace moe
}  // namespace fastnn

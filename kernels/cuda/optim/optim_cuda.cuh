// What the CUDA optimizer step (optim_cuda.cu) and gradient norm (norm_cuda.cu) share: the
// device table that describes the tensors of a launch, and scalar inputs read on the device.
//
// One launch covers every tensor of the call, whatever its dtype: a table on the device holds one
// TensorMeta per tensor (addresses, size, dtype, group) followed by one word per chunk of kChunk
// elements, and one block handles one chunk.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <vector>

#include "optim/optim.h"

namespace fastnn {
namespace optim {
namespace cuda_table {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 32768;  // elements per block

enum DTypeCode : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// One tensor of the call: 8 int64 words in the device table.
struct TensorMeta {
  int64_t param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step;  // addresses (0: absent)
  int64_t numel;
  int32_t dtype;
  int16_t group;
  int16_t flags;  // kFirstStep | kAligned
};
static_assert(sizeof(TensorMeta) == 64, "TensorMeta must be 8 words");
constexpr int16_t kFirstStep = 1;
constexpr int16_t kAligned = 2;  // every address 16-byte aligned: vector loads

// A scalar input that lives on the device (ptr) or was read on the host (value).
struct Scalar {
  const float* ptr;
  float value;
  __device__ __forceinline__ float get() const { return ptr ? *ptr : value; }
};

// The chunk a block handles: its tensor's meta and its element range.
struct ChunkRange {
  TensorMeta meta;
  int64_t begin, end;
};

__device__ __forceinline__ ChunkRange chunk_of(const TensorMeta* metas, const int64_t* chunks) {
  const int64_t packed = chunks[blockIdx.x];
  ChunkRange r{metas[packed >> 32], (packed & 0xffffffffLL) * kChunk, 0};
  r.end = r.begin + kChunk < r.meta.numel ? r.begin + kChunk : r.meta.numel;
  return r;
}

__device__ __forceinline__ double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "fastnn: unsupported dtype ", t);
  }
}

inline int64_t address(const at::Tensor& t) { return t.defined() ? (int64_t)t.data_ptr() : 0; }

// The host table of `slots`: metas (8 words each), then one word per chunk. `group_base` is
// subtracted from each slot's group (a launch carries groups [group_base, group_base + 32)).
inline std::vector<int64_t> host_table(const std::vector<Slot>& slots, int group_base, int64_t* n_chunks) {
  int64_t chunks = 0;
  for (const Slot& s : slots) chunks += (s.param.numel() + kChunk - 1) / kChunk;
  std::vector<int64_t> table(slots.size() * 8 + chunks);
  int64_t* chunk_out = table.data() + slots.size() * 8;
  for (size_t i = 0; i < slots.size(); ++i) {
    const Slot& s = slots[i];
    TensorMeta m{};
    m.param = address(s.param);
    m.grad = address(s.grad);
    m.exp_avg = address(s.exp_avg);
    m.exp_avg_sq = address(s.exp_avg_sq);
    m.max_exp_avg_sq = address(s.max_exp_avg_sq);
    m.step = address(s.step);
    m.numel = s.param.numel();
    m.dtype = dtype_code(s.param.scalar_type());
    m.group = (int16_t)(s.group - group_base);
    const int64_t any = m.param | m.grad | m.exp_avg | m.exp_avg_sq | m.max_exp_avg_sq;
    m.flags = (int16_t)((s.first_step ? kFirstStep : 0) | ((any & 15) == 0 ? kAligned : 0));
    std::memcpy(table.data() + i * 8, &m, sizeof(m));
    const int64_t n = (m.numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < n; ++c) *chunk_out++ = ((int64_t)i << 32) | c;
  }
  *n_chunks = chunks;
  return table;
}

// The device copy of `host`: the cached one when its content is the same, else a new asynchronous
// upload from pinned memory (whose block the caching host allocator keeps until the copy is done).
inline at::Tensor device_table(std::vector<int64_t>&& host, const at::Device& device, CudaTableCache* cache) {
  if (cache && cache->device.defined() && cache->device.device() == device && cache->host == host) {
    return cache->device;
  }
  at::Tensor pinned = at::empty({(int64_t)host.size()}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
  at::Tensor dev = pinned.to(device, /*non_blocking=*/true);
  if (cache) {
    cache->host = std::move(host);
    cache->device = dev;
  }
  return dev;
}

// A scalar input: its device address, or its value read on the host when it lives on the CPU
// (reading a CPU tensor costs no device synchronisation). A device scalar of another dtype is
// converted on the device (kept alive by `keep_alive` until the launch is queued).
inline Scalar scalar_arg(const at::Tensor& t, float otherwise, std::vector<at::Tensor>& keep_alive) {
  if (!t.defined()) return Scalar{nullptr, otherwise};
  if (t.is_cpu()) return Scalar{nullptr, t.item<float>()};
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  keep_alive.push_back(f);
  return Scalar{f.data_ptr<float>(), 0.f};
}

}  // namespace cuda_table
}  // namespace optim
}  // namespace fastnn

// CUDA multi-tensor optimizer steps and gradient norm.
//
// One launch updates every tensor of the call, whatever its dtype (fp32, fp64, bf16, fp16) and
// parameter group: a table on the device describes each tensor (addresses, size, dtype, group),
// and one block updates one chunk of kChunk elements. Group hyperparameters travel as kernel
// arguments. Adam first increments the per-tensor step counters (a tiny launch), so that every
// block of a tensor reads the same step.
//
// The table is rebuilt on the host only when the tensors change; a caller that steps the same
// tensors again (fastnn's optimizers, through StepPlan) passes a cache and the device copy is
// reused, so a step costs two kernel launches and no host-to-device copy. Nothing here reads a
// device value on the host: the step is capturable in a CUDA graph (with a tensor lr for a
// schedule that changes under the graph).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

#include "optim/math.h"
#include "optim/optim.h"

namespace fastnn {
namespace optim {
namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocksPerSM = 3;  // <= 85 registers: no spills, 768 resident threads per SM
constexpr int64_t kChunk = 32768;  // elements per block
constexpr int kMaxGroups = 32;     // groups per launch (more: several launches)

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

constexpr uint32_t kAmsgrad = 1, kMaximize = 2, kDecoupled = 4, kNesterov = 8;

struct GroupArgs {
  const float* lr_ptr;  // device lr (tensor lr), or null: use lr
  float lr, beta1, beta2, eps, weight_decay, momentum, dampening;
  uint32_t flags;
};

// A scalar input that lives on the device (ptr) or was read on the host (value).
struct Scalar {
  const float* ptr;
  float value;
  __device__ __forceinline__ float get() const { return ptr ? *ptr : value; }
};

struct LaunchArgs {
  GroupArgs groups[kMaxGroups];
  const TensorMeta* metas;
  const int64_t* chunks;  // (tensor << 32) | chunk index
  Scalar grad_scale, found_inf, clip_coef;
  bool has_scale, has_found_inf, has_clip;
};

template <typename T>
struct DevOps {
  static __device__ __forceinline__ T sqrt(T x) { return ::sqrt(x); }
  static __device__ __forceinline__ T max(T a, T b) { return (a != a || a > b) ? a : b; }
};

template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[kVec<scalar_t>];
};

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t>*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& x) {
  *reinterpret_cast<Pack<scalar_t>*>(p) = x;
}

struct GradPrep {
  bool unscale;
  float scale;
  float mult;  // clip_coef * (maximize ? -1 : 1)
};

template <typename scalar_t>
__device__ void adam_chunk(const TensorMeta& m, const GroupArgs& g, GradPrep prep, int64_t begin,
                           int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const double step = (double)*reinterpret_cast<const float*>(m.step);
  const double lr = g.lr_ptr ? (double)*g.lr_ptr : (double)g.lr;
  const double bc1 = 1.0 - ::pow((double)g.beta1, step);
  const double bc2 = 1.0 - ::pow((double)g.beta2, step);
  const AdamCoeffs<opmath_t> c{(opmath_t)lr,
                               (opmath_t)g.beta1,
                               (opmath_t)g.beta2,
                               (opmath_t)(1.0 - (double)g.beta1),
                               (opmath_t)(1.0 - (double)g.beta2),
                               (opmath_t)g.eps,
                               (opmath_t)g.weight_decay,
                               (opmath_t)(1.0 - lr * (double)g.weight_decay),
                               (opmath_t)(lr / bc1),
                               (opmath_t)::sqrt(bc2)};
  const AdamFlags f{(g.flags & kAmsgrad) != 0, (g.flags & kDecoupled) != 0, g.weight_decay != 0.f};
  scalar_t* p = reinterpret_cast<scalar_t*>(m.param);
  scalar_t* gr = reinterpret_cast<scalar_t*>(m.grad);
  scalar_t* ea = reinterpret_cast<scalar_t*>(m.exp_avg);
  scalar_t* es = reinterpret_cast<scalar_t*>(m.exp_avg_sq);
  scalar_t* mx = reinterpret_cast<scalar_t*>(m.max_exp_avg_sq);
  const opmath_t scale = prep.scale, mult = prep.mult;

  auto update = [&](scalar_t& pp, scalar_t& gg, scalar_t& mm, scalar_t& vv, scalar_t& xx) {
    opmath_t P = pp, G = gg, M = mm, V = vv, X = f.amsgrad ? (opmath_t)xx : opmath_t(0);
    const opmath_t used = prepare_grad(G, prep.unscale, scale, true, mult);
    if (prep.unscale) gg = (scalar_t)G;
    adam_update<opmath_t, DevOps<opmath_t>>(P, used, M, V, X, c, f);
    pp = (scalar_t)P;
    mm = (scalar_t)M;
    vv = (scalar_t)V;
    if (f.amsgrad) xx = (scalar_t)X;
  };

  constexpr int N = kVec<scalar_t>;
  if (m.flags & kAligned) {
    // begin is a multiple of kChunk, hence of N; only the tensor's last chunk has a ragged end.
    const int64_t vec_end = begin + ((end - begin) / N) * N;
    for (int64_t i = begin + (int64_t)threadIdx.x * N; i < vec_end; i += (int64_t)blockDim.x * N) {
      Pack<scalar_t> P = load_pack(p + i), G = load_pack(gr + i), M = load_pack(ea + i),
                     V = load_pack(es + i), X;
      if (f.amsgrad) X = load_pack(mx + i);
#pragma unroll
      for (int k = 0; k < N; ++k) update(P.v[k], G.v[k], M.v[k], V.v[k], X.v[k]);
      store_pack(p + i, P);
      store_pack(ea + i, M);
      store_pack(es + i, V);
      if (f.amsgrad) store_pack(mx + i, X);
      if (prep.unscale) store_pack(gr + i, G);
    }
    begin = vec_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    scalar_t dummy{};
    update(p[i], gr[i], ea[i], es[i], f.amsgrad ? mx[i] : dummy);
  }
}

template <typename scalar_t>
__device__ void sgd_chunk(const TensorMeta& m, const GroupArgs& g, GradPrep prep, int64_t begin,
                          int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const double lr = g.lr_ptr ? (double)*g.lr_ptr : (double)g.lr;
  const SgdCoeffs<opmath_t> c{(opmath_t)lr, (opmath_t)g.momentum,
                              (opmath_t)(1.0 - (double)g.dampening), (opmath_t)g.weight_decay};
  const SgdFlags f{g.momentum != 0.f, (g.flags & kNesterov) != 0, g.weight_decay != 0.f,
                   (m.flags & kFirstStep) != 0};
  scalar_t* p = reinterpret_cast<scalar_t*>(m.param);
  scalar_t* gr = reinterpret_cast<scalar_t*>(m.grad);
  scalar_t* bu = reinterpret_cast<scalar_t*>(m.exp_avg);
  const opmath_t scale = prep.scale, mult = prep.mult;

  auto update = [&](scalar_t& pp, scalar_t& gg, scalar_t& bb) {
    opmath_t P = pp, G = gg, B = (f.momentum && !f.first_step) ? (opmath_t)bb : opmath_t(0);
    const opmath_t used = prepare_grad(G, prep.unscale, scale, true, mult);
    if (prep.unscale) gg = (scalar_t)G;
    sgd_update<opmath_t>(P, used, B, c, f);
    pp = (scalar_t)P;
    if (f.momentum) bb = (scalar_t)B;
  };

  constexpr int N = kVec<scalar_t>;
  if (m.flags & kAligned) {
    const int64_t vec_end = begin + ((end - begin) / N) * N;
    for (int64_t i = begin + (int64_t)threadIdx.x * N; i < vec_end; i += (int64_t)blockDim.x * N) {
      Pack<scalar_t> P = load_pack(p + i), G = load_pack(gr + i), B;
      if (f.momentum && !f.first_step) B = load_pack(bu + i);
#pragma unroll
      for (int k = 0; k < N; ++k) update(P.v[k], G.v[k], B.v[k]);
      store_pack(p + i, P);
      if (f.momentum) store_pack(bu + i, B);
      if (prep.unscale) store_pack(gr + i, G);
    }
    begin = vec_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    scalar_t dummy{};
    update(p[i], gr[i], f.momentum ? bu[i] : dummy);
  }
}

__global__ void increment_steps(const TensorMeta* metas, int64_t n, Scalar found_inf,
                                bool has_found_inf) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || (has_found_inf && found_inf.get() != 0.f)) return;
  *reinterpret_cast<float*>(metas[i].step) += 1.f;
}

template <Kind K>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) multi_tensor_step(const __grid_constant__ LaunchArgs args) {
  if (args.has_found_inf && args.found_inf.get() != 0.f) return;
  const int64_t packed = args.chunks[blockIdx.x];
  const TensorMeta m = args.metas[packed >> 32];
  const int64_t begin = (packed & 0xffffffffLL) * kChunk;
  const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
  const GroupArgs& g = args.groups[m.group];
  GradPrep prep{args.has_scale, args.has_scale ? args.grad_scale.get() : 1.f,
                (args.has_clip ? args.clip_coef.get() : 1.f) * ((g.flags & kMaximize) ? -1.f : 1.f)};
  if constexpr (K == Kind::Adam) {
    switch (m.dtype) {
      case kF32: adam_chunk<float>(m, g, prep, begin, end); break;
      case kF64: adam_chunk<double>(m, g, prep, begin, end); break;
      case kBF16: adam_chunk<at::BFloat16>(m, g, prep, begin, end); break;
      default: adam_chunk<at::Half>(m, g, prep, begin, end); break;
    }
  } else {
    switch (m.dtype) {
      case kF32: sgd_chunk<float>(m, g, prep, begin, end); break;
      case kF64: sgd_chunk<double>(m, g, prep, begin, end); break;
      case kBF16: sgd_chunk<at::BFloat16>(m, g, prep, begin, end); break;
      default: sgd_chunk<at::Half>(m, g, prep, begin, end); break;
    }
  }
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "fastnn: unsupported dtype ", t);
  }
}

int64_t address(const at::Tensor& t) { return t.defined() ? (int64_t)t.data_ptr() : 0; }

// The host table of `slots`: metas (8 words each), then one word per chunk.
std::vector<int64_t> host_table(const std::vector<Slot>& slots, int64_t* n_chunks) {
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
    m.group = (int16_t)s.group;
    const int64_t any = m.param | m.grad | m.exp_avg | m.exp_avg_sq | m.max_exp_avg_sq;
    m.flags = (int16_t)((s.first_step ? kFirstStep : 0) | ((any & 15) == 0 ? kAligned : 0));
    std::memcpy(table.data() + i * 8, &m, sizeof(m));
    const int64_t n = (m.numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < n; ++c) *chunk_out++ = ((int64_t)i << 32) | c;
  }
  *n_chunks = chunks;
  return table;
}

// The device copy of `host`: the cached one when unchanged, else a new asynchronous upload from
// pinned memory (whose block the caching host allocator keeps until the copy is done).
at::Tensor device_table(std::vector<int64_t>&& host, const at::Device& device,
                        CudaTableCache* cache) {
  if (cache && cache->device.defined() && cache->host == host) return cache->device;
  at::Tensor pinned = at::empty({(int64_t)host.size()},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
  at::Tensor dev = pinned.to(device, /*non_blocking=*/true);
  if (cache) {
    cache->host = std::move(host);
    cache->device = dev;
  }
  return dev;
}

// A scalar input: its device address, or its value read on the host when it lives on the CPU.
Scalar scalar_arg(const at::Tensor& t, float otherwise, std::vector<at::Tensor>& keep_alive) {
  if (!t.defined()) return Scalar{nullptr, otherwise};
  if (t.is_cpu()) return Scalar{nullptr, t.item<float>()};
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  keep_alive.push_back(f);
  return Scalar{f.data_ptr<float>(), 0.f};
}

// Kernel arguments of the groups [group_base, group_base + kMaxGroups) and the scaling inputs.
// Returns false when the step is skipped (found_inf read on the host as nonzero).
bool make_args(LaunchArgs& args, const std::vector<Group>& groups, int group_base,
               const Scaling& scaling, std::vector<at::Tensor>& keep_alive) {
  args = LaunchArgs{};
  const int ngroups = std::min<int>(kMaxGroups, (int)groups.size() - group_base);
  for (int gi = 0; gi < ngroups; ++gi) {
    const Group& g = groups[group_base + gi];
    GroupArgs& a = args.groups[gi];
    const Scalar lr = scalar_arg(g.lr_tensor, (float)g.lr, keep_alive);
    a.lr_ptr = lr.ptr;
    a.lr = lr.value;
    a.beta1 = (float)g.beta1;
    a.beta2 = (float)g.beta2;
    a.eps = (float)g.eps;
    a.weight_decay = (float)g.weight_decay;
    a.momentum = (float)g.momentum;
    a.dampening = (float)g.dampening;
    a.flags = (g.amsgrad ? kAmsgrad : 0) | (g.maximize ? kMaximize : 0) |
              (g.decoupled ? kDecoupled : 0) | (g.nesterov ? kNesterov : 0);
  }
  args.has_scale = scaling.grad_scale.defined();
  args.has_found_inf = scaling.found_inf.defined();
  args.has_clip = scaling.clip_coef.defined();
  args.grad_scale = scalar_arg(scaling.grad_scale, 1.f, keep_alive);
  args.found_inf = scalar_arg(scaling.found_inf, 0.f, keep_alive);
  args.clip_coef = scalar_arg(scaling.clip_coef, 1.f, keep_alive);
  return !(args.has_found_inf && !args.found_inf.ptr && args.found_inf.value != 0.f);
}

// The step's kernels on a device table of n_tensors metas followed by n_chunks chunk words.
void run_kernels(Kind kind, LaunchArgs& args, const at::Tensor& table, int64_t n_tensors,
                 int64_t n_chunks) {
  args.metas = reinterpret_cast<const TensorMeta*>(table.data_ptr<int64_t>());
  args.chunks = table.data_ptr<int64_t>() + n_tensors * 8;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (kind == Kind::Adam && n_tensors > 0) {
    increment_steps<<<(unsigned)((n_tensors + 255) / 256), 256, 0, stream>>>(
        args.metas, n_tensors, args.found_inf, args.has_found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (n_chunks == 0) return;
  TORCH_CHECK(n_chunks < (int64_t)1 << 31, "fastnn: too many chunks in one optimizer step");
  if (kind == Kind::Adam) {
    multi_tensor_step<Kind::Adam><<<(unsigned)n_chunks, kThreads, 0, stream>>>(args);
  } else {
    multi_tensor_step<Kind::Sgd><<<(unsigned)n_chunks, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups, int group_base,
            const Scaling& scaling, CudaTableCache* cache) {
  std::vector<at::Tensor> keep_alive;
  LaunchArgs args;
  if (!make_args(args, groups, group_base, scaling, keep_alive)) return;
  int64_t n_chunks = 0;
  std::vector<int64_t> host = host_table(slots, &n_chunks);
  if (group_base != 0) {
    for (size_t i = 0; i < slots.size(); ++i) {
      reinterpret_cast<TensorMeta*>(host.data() + i * 8)->group -= (int16_t)group_base;
    }
  }
  at::Tensor table = device_table(std::move(host), slots[0].param.device(), cache);
  if (cache) {
    cache->n_tensors = (int64_t)slots.size();
    cache->n_chunks = n_chunks;
    cache->valid = true;
  }
  run_kernels(kind, args, table, (int64_t)slots.size(), n_chunks);
}

void step_contiguous(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
                     const Scaling& scaling, CudaTableCache* cache) {
  if (cache) cache->valid = false;
  if (slots.empty()) return;
  const c10::cuda::CUDAGuard guard(slots[0].param.device());
  if ((int)groups.size() <= kMaxGroups) {
    launch(kind, slots, groups, 0, scaling, cache);
    return;
  }
  // More groups than one launch carries: one launch per kMaxGroups groups (no table cache).
  for (int base = 0; base < (int)groups.size(); base += kMaxGroups) {
    std::vector<Slot> part;
    for (const Slot& s : slots) {
      if (s.group >= base && s.group < base + kMaxGroups) part.push_back(s);
    }
    if (!part.empty()) launch(kind, part, groups, base, scaling, nullptr);
  }
}

// ---- gradient norm -----------------------------------------------------------------------

__device__ __forceinline__ double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

template <typename scalar_t>
__device__ double chunk_norm(const TensorMeta& m, int64_t begin, int64_t end, bool inf_norm) {
  const scalar_t* g = reinterpret_cast<const scalar_t*>(m.grad);
  float acc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float x = (float)g[i];
    acc = inf_norm ? (float)nan_max(acc, fabsf(x)) : fmaf(x, x, acc);
  }
  return (double)acc;
}

__global__ void __launch_bounds__(kThreads) norm_partials(const TensorMeta* metas, const int64_t* chunks,
                                                          double* partial, bool inf_norm) {
  __shared__ double warp_sums[kThreads / 32];
  const int64_t packed = chunks[blockIdx.x];
  const TensorMeta m = metas[packed >> 32];
  const int64_t begin = (packed & 0xffffffffLL) * kChunk;
  const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
  double r;
  switch (m.dtype) {
    case kF32: r = chunk_norm<float>(m, begin, end, inf_norm); break;
    case kF64: r = chunk_norm<double>(m, begin, end, inf_norm); break;
    case kBF16: r = chunk_norm<at::BFloat16>(m, begin, end, inf_norm); break;
    default: r = chunk_norm<at::Half>(m, begin, end, inf_norm); break;
  }
  for (int off = 16; off > 0; off /= 2) {
    const double o = __shfl_down_sync(0xffffffffu, r, off);
    r = inf_norm ? nan_max(r, o) : r + o;
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total = inf_norm ? nan_max(total, warp_sums[w]) : total + warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

// One block combines the partials in a fixed order: the result is deterministic.
__global__ void norm_finish(const double* partial, int64_t n, Scalar grad_scale, bool has_scale,
                            double max_norm, bool inf_norm, float* out_norm, float* out_coef) {
  __shared__ double sums[kThreads];
  double r = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) r = inf_norm ? nan_max(r, partial[i]) : r + partial[i];
  sums[threadIdx.x] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int i = 0; i < (int)blockDim.x; ++i) total = inf_norm ? nan_max(total, sums[i]) : total + sums[i];
    if (!inf_norm) total = ::sqrt(total);
    if (has_scale) total /= (double)grad_scale.get();
    const double coef = max_norm / (total + 1e-6);
    *out_norm = (float)total;
    *out_coef = (float)(coef < 1.0 || coef != coef ? coef : 1.0);
  }
}

}  // namespace

void relaunch_cuda(Kind kind, const CudaTableCache& cache, const std::vector<Group>& groups,
                   const Scaling& scaling, const at::Device& device) {
  TORCH_CHECK(cache.valid && (int)groups.size() <= kMaxGroups, "fastnn: no cached optimizer table");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep_alive;
  LaunchArgs args;
  if (!make_args(args, groups, 0, scaling, keep_alive)) return;
  run_kernels(kind, args, cache.device, cache.n_tensors, cache.n_chunks);
}

void step_cuda(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
               const Scaling& scaling, CudaTableCache* cache) {
  if (cache) cache->valid = false;
  with_contiguous(slots, [&](std::vector<Slot>& dense) {
    // Copies made for non-dense tensors live only for this call: never cache their addresses.
    const bool copied = &dense != &slots;
    step_contiguous(kind, dense, groups, scaling, copied ? nullptr : cache);
  });
}

std::tuple<at::Tensor, at::Tensor> grad_norm_cuda(const std::vector<at::Tensor>& grads,
                                                  double max_norm, double norm_type,
                                                  const at::Tensor& grad_scale,
                                                  CudaTableCache* cache) {
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const bool inf_norm = std::isinf(norm_type);
  std::vector<Slot> slots(grads.size());
  std::vector<at::Tensor> dense(grads.size());
  bool copied = false;
  for (size_t i = 0; i < grads.size(); ++i) {
    dense[i] = grads[i].contiguous();
    copied = copied || !dense[i].is_same(grads[i]);
    slots[i].param = dense[i];
    slots[i].grad = dense[i];
  }
  auto opts = grads[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({2}, opts);
  int64_t n_chunks = 0;
  std::vector<int64_t> host = host_table(slots, &n_chunks);
  at::Tensor table = device_table(std::move(host), device, copied ? nullptr : cache);
  const TensorMeta* metas = reinterpret_cast<const TensorMeta*>(table.data_ptr<int64_t>());
  const int64_t* chunks = table.data_ptr<int64_t>() + slots.size() * 8;
  at::Tensor partial = at::empty({std::max<int64_t>(n_chunks, 1)}, opts.dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (n_chunks > 0) {
    norm_partials<<<(unsigned)n_chunks, kThreads, 0, stream>>>(metas, chunks, partial.data_ptr<double>(),
                                                               inf_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  std::vector<at::Tensor> keep_alive;
  const Scalar scale = scalar_arg(grad_scale, 1.f, keep_alive);
  norm_finish<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), n_chunks, scale,
                                          grad_scale.defined(), max_norm, inf_norm,
                                          out.data_ptr<float>(), out.data_ptr<float>() + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out[0], out[1]};
}

}  // namespace optim
}  // namespace fastnn

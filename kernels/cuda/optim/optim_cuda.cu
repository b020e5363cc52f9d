// CUDA multi-tensor optimizer steps (Adam/AdamW, SGD).
//
// One launch updates every tensor of the call, whatever its dtype (fp32, fp64, bf16, fp16) and
// parameter group: a table on the device describes each tensor (optim_cuda.cuh), and one block
// updates one chunk. Group hyperparameters travel as kernel arguments, up to kMaxGroups groups
// per launch (more groups: one launch per kMaxGroups, each with its own table cache). Adam first
// increments the per-tensor step counters (a tiny launch), so that every block of a tensor reads
// the same step.
//
// The host table is rebuilt each step (a few words per tensor) and compared with the cached one;
// the device copy is reused while it is the same, so a step of an unchanged model costs two kernel
// launches and no host-to-device copy. Nothing here reads a device value on the host: the step is
// capturable in a CUDA graph (with a tensor lr for a schedule that changes under the graph).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "optim/math.h"
#include "optim_cuda.cuh"

namespace fastnn {
namespace optim {
namespace {

using namespace cuda_table;

constexpr int kMinBlocksPerSM = 3;  // <= 85 registers: no spills, 768 resident threads per SM
constexpr int kMaxGroups = 32;      // groups per launch (more: several launches)

constexpr uint32_t kAmsgrad = 1, kMaximize = 2, kDecoupled = 4, kNesterov = 8;

struct GroupArgs {
  const float* lr_ptr;  // device lr (tensor lr), or null: use lr
  // The betas in double: 1 - beta and the bias corrections are computed from them in double, as
  // torch.optim does (from a float beta2 = 0.999999, 1 - beta2 would be 1% off).
  double beta1, beta2;
  float lr, eps, weight_decay, momentum, dampening;
  uint32_t flags;
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

// Runs vec(i) for each Pack of elements i..i+kVec-1 of [begin, end) when the tensor is aligned, then
// one(i) for each element left; the block's threads share the work.
template <typename scalar_t, typename VecFn, typename OneFn>
__device__ __forceinline__ void for_packs(const TensorMeta& m, int64_t begin, int64_t end, const VecFn& vec,
                                          const OneFn& one) {
  constexpr int N = kVec<scalar_t>;
  if (m.flags & kAligned) {
    // begin is a multiple of kChunk, hence of N; only the tensor's last chunk has a ragged end.
    const int64_t vec_end = begin + ((end - begin) / N) * N;
    for (int64_t i = begin + (int64_t)threadIdx.x * N; i < vec_end; i += (int64_t)blockDim.x * N) vec(i);
    begin = vec_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) one(i);
}

template <typename scalar_t>
__device__ void adam_chunk(const TensorMeta& m, const GroupArgs& g, GradPrep prep, int64_t begin,
                           int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const double step = (double)*reinterpret_cast<const float*>(m.step);
  const double lr = g.lr_ptr ? (double)*g.lr_ptr : (double)g.lr;
  const double bc1 = 1.0 - ::pow(g.beta1, step);
  const double bc2 = 1.0 - ::pow(g.beta2, step);
  const AdamCoeffs<opmath_t> c{(opmath_t)lr,
                               (opmath_t)g.beta1,
                               (opmath_t)g.beta2,
                               (opmath_t)(1.0 - g.beta1),
                               (opmath_t)(1.0 - g.beta2),
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

  for_packs<scalar_t>(m, begin, end, [&](int64_t i) {
    Pack<scalar_t> P = load_pack(p + i), G = load_pack(gr + i), M = load_pack(ea + i), V = load_pack(es + i), X;
    if (f.amsgrad) X = load_pack(mx + i);
#pragma unroll
    for (int k = 0; k < kVec<scalar_t>; ++k) update(P.v[k], G.v[k], M.v[k], V.v[k], X.v[k]);
    store_pack(p + i, P);
    store_pack(ea + i, M);
    store_pack(es + i, V);
    if (f.amsgrad) store_pack(mx + i, X);
    if (prep.unscale) store_pack(gr + i, G);
  }, [&](int64_t i) {
    scalar_t dummy{};
    update(p[i], gr[i], ea[i], es[i], f.amsgrad ? mx[i] : dummy);
  });
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

  for_packs<scalar_t>(m, begin, end, [&](int64_t i) {
    Pack<scalar_t> P = load_pack(p + i), G = load_pack(gr + i), B;
    if (f.momentum && !f.first_step) B = load_pack(bu + i);
#pragma unroll
    for (int k = 0; k < kVec<scalar_t>; ++k) update(P.v[k], G.v[k], B.v[k]);
    store_pack(p + i, P);
    if (f.momentum) store_pack(bu + i, B);
    if (prep.unscale) store_pack(gr + i, G);
  }, [&](int64_t i) {
    scalar_t dummy{};
    update(p[i], gr[i], f.momentum ? bu[i] : dummy);
  });
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
  const ChunkRange c = chunk_of(args.metas, args.chunks);
  const TensorMeta& m = c.meta;
  const int64_t begin = c.begin, end = c.end;
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
    a.beta1 = g.beta1;
    a.beta2 = g.beta2;
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
  std::vector<int64_t> host = host_table(slots, group_base, &n_chunks);
  at::Tensor table = device_table(std::move(host), slots[0].param.device(), cache);
  run_kernels(kind, args, table, (int64_t)slots.size(), n_chunks);
}

void step_contiguous(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
                     const Scaling& scaling, std::vector<CudaTableCache>* caches) {
  if (slots.empty()) return;
  const c10::cuda::OptionalCUDAGuard guard(slots[0].param.device());
  const int n_launches = std::max<int>(1, ((int)groups.size() + kMaxGroups - 1) / kMaxGroups);
  if (caches && (int)caches->size() != n_launches) caches->assign(n_launches, CudaTableCache{});
  if (n_launches == 1) {
    launch(kind, slots, groups, 0, scaling, caches ? &(*caches)[0] : nullptr);
    return;
  }
  for (int l = 0; l < n_launches; ++l) {
    const int base = l * kMaxGroups;
    std::vector<Slot> part;
    for (const Slot& s : slots) {
      if (s.group >= base && s.group < base + kMaxGroups) part.push_back(s);
    }
    if (!part.empty()) launch(kind, part, groups, base, scaling, caches ? &(*caches)[l] : nullptr);
  }
}

}  // namespace

void step_cuda(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
               const Scaling& scaling, std::vector<CudaTableCache>* caches) {
  if (slots.empty()) return;
  // The dense copies and their copy back run on the parameters' device too.
  const c10::cuda::OptionalCUDAGuard guard(slots[0].param.device());
  with_contiguous(slots, scaling.grad_scale.defined(), [&](std::vector<Slot>& dense) {
    step_contiguous(kind, dense, groups, scaling, caches);
  });
}

}  // namespace optim
}  // namespace fastnn

// CUDA global gradient norm and clip_grad_norm_'s clipping factor, over every gradient of the
// call in one launch (the device table of optim_cuda.cuh), then one block that combines the
// per-chunk partial results in a fixed order: the result is deterministic. Nothing is read on
// the host.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <type_traits>

#include "optim_cuda.cuh"

namespace fastnn {
namespace optim {
namespace {

using namespace cuda_table;

// Squares are summed in float for 16- and 32-bit gradients and in double for float64 ones, as
// torch's norm accumulates each dtype; each chunk's sum is then carried in double.
template <typename scalar_t>
__device__ double chunk_norm(const TensorMeta& m, int64_t begin, int64_t end, bool inf_norm) {
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const scalar_t* g = reinterpret_cast<const scalar_t*>(m.grad);
  acc_t acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const acc_t x = (acc_t)g[i];
    acc = inf_norm ? (acc_t)nan_max(acc, ::fabs(x)) : ::fma(x, x, acc);
  }
  return (double)acc;
}

__global__ void __launch_bounds__(kThreads) norm_partials(const TensorMeta* metas, const int64_t* chunks,
                                                          double* partial, bool inf_norm) {
  __shared__ double warp_sums[kThreads / 32];
  const ChunkRange c = chunk_of(metas, chunks);
  double r;
  switch (c.meta.dtype) {
    case kF32: r = chunk_norm<float>(c.meta, c.begin, c.end, inf_norm); break;
    case kF64: r = chunk_norm<double>(c.meta, c.begin, c.end, inf_norm); break;
    case kBF16: r = chunk_norm<at::BFloat16>(c.meta, c.begin, c.end, inf_norm); break;
    default: r = chunk_norm<at::Half>(c.meta, c.begin, c.end, inf_norm); break;
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
    *out_coef = (float)(coef < 1.0 || coef != coef ? coef : 1.0);  // NaN stays NaN, as torch.clamp
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grad_norm_cuda(const std::vector<at::Tensor>& grads,
                                                  double max_norm, double norm_type,
                                                  const at::Tensor& grad_scale,
                                                  CudaTableCache* cache) {
  const at::Device device = grads[0].device();
  const c10::cuda::OptionalCUDAGuard guard(device);
  const bool inf_norm = std::isinf(norm_type);
  std::vector<Slot> slots(grads.size());
  std::vector<at::Tensor> dense(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    dense[i] = grads[i].contiguous();
    slots[i].param = dense[i];
    slots[i].grad = dense[i];
  }
  auto opts = grads[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({2}, opts);
  int64_t n_chunks = 0;
  std::vector<int64_t> host = host_table(slots, 0, &n_chunks);
  at::Tensor table = device_table(std::move(host), device, cache);
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

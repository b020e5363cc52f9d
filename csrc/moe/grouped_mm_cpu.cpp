// Grouped GEMM on the CPU: rows [start_e, end_e) of ``a`` times expert e's matrix, one BLAS call
// per non-empty group writing straight into its slice of the output (no gather, no copies). The
// BLAS library threads each call; groups are few and large on the CPU, so that is the right level.
#include "common.h"
#include "moe/moe.h"

namespace fastnn {
namespace moe {

namespace {

// Group bounds from the cumulative ends, checked (on the CPU reading them costs nothing).
std::vector<int64_t> group_ends(const at::Tensor& offsets, int64_t M) {
  const at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<int64_t> ends(p, p + o.numel());
  int64_t prev = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    FASTNN_CHECK_ARG(ends[e] >= prev && ends[e] <= M, "offsets",
                     "non-decreasing cumulative row ends within [0, " + std::to_string(M) + "]",
                     std::to_string(ends[e]) + " at expert " + std::to_string(e) + " (previous end " +
                         std::to_string(prev) + ")");
    prev = ends[e];
  }
  return ends;
}

at::Tensor expert_matrix(const at::Tensor& b, int64_t e, bool trans_b) {
  return trans_b ? b.select(0, e).t() : b.select(0, e);  // [K, N] view
}

}  // namespace

at::Tensor grouped_mm_cpu(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets, bool trans_b) {
  const at::Tensor a = a_in.contiguous();
  const int64_t M = a.size(0), N = trans_b ? b.size(1) : b.size(2);
  const auto ends = group_ends(offsets, M);
  at::Tensor out = at::empty({M, N}, a.options());
  int64_t start = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    const int64_t n = ends[e] - start;
    if (n > 0) {
      at::Tensor dst = out.narrow(0, start, n);
      at::mm_out(dst, a.narrow(0, start, n), expert_matrix(b, e, trans_b));
    }
    start = ends[e];
  }
  if (start < M) out.narrow(0, start, M - start).zero_();  // rows past the last group (dropped slots)
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                           const at::Tensor& b, const at::Tensor& offsets,
                                                           bool trans_b, bool need_a, bool need_b) {
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor a = a_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1);
  const auto ends = group_ends(offsets, M);
  at::Tensor ga = need_a ? at::empty({M, K}, a.options()) : at::empty({0}, a.options());
  at::Tensor gb = need_b ? at::zeros(b.sizes(), b.options()) : at::empty({0}, b.options());
  int64_t start = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    const int64_t n = ends[e] - start;
    if (n > 0) {
      const at::Tensor g = grad.narrow(0, start, n);
      const at::Tensor x = a.narrow(0, start, n);
      if (need_a) {  // dA = dY @ B_e^T
        at::Tensor dst = ga.narrow(0, start, n);
        at::mm_out(dst, g, expert_matrix(b, e, trans_b).t());
      }
      if (need_b) {  // dB_e = A_e^T dY_e ([K, N]), stored transposed for the [E, N, K] layout
        at::Tensor dst = gb.select(0, e);
        if (trans_b) {
          at::mm_out(dst, g.t(), x);
        } else {
          at::mm_out(dst, x.t(), g);
        }
      }
    }
    start = ends[e];
  }
  if (need_a && start < M) ga.narrow(0, start, M - start).zero_();
  return {ga, gb};
}

}  // namespace moe
}  // namespace fastnn

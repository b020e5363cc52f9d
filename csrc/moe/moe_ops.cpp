// The MoE ops: schemas, argument checks and the CPU (and CUDA) registrations.
//
//   fastnn::topk_gating                 routing: weights, expert ids, counts, permutation + inverse
//   fastnn::topk_gating_backward        d logits from d weights (the routing fixed)
//   fastnn::permute_tokens              token rows in expert order
//   fastnn::unpermute_tokens            weighted combine back to token order
//   fastnn::unpermute_tokens_backward   (d y, d weights)
//   fastnn::grouped_mm                  per-expert GEMM over contiguous row groups (CPU here; on
//   fastnn::grouped_mm_backward         CUDA the Triton ops are the fast path)
//   fastnn::moe_mlp                     the experts' whole inference forward (CPU: moe_mlp_cpu.cpp)
//
// Every op is callable directly as torch.ops.fastnn.*, so each checks here what its kernels' memory
// safety depends on: shapes, dtypes and devices always; on CPU tensors also the index values
// (reading them costs nothing there). CUDA kernels guard every index they read instead, because
// reading device data on the host would synchronise.
//
// Fake kernels, autograd and the Python API live in fastnn/ops/moe.py; the reference
// implementations with the same signatures in fastnn/reference/moe.py.
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "moe/moe.h"

namespace fastnn {
namespace moe {

namespace {

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  FASTNN_CHECK_ARG(t.dim() == dim && float_dtype(t.scalar_type()), name,
                   "a " + std::to_string(dim) + "-d float32, float64, bfloat16 or float16 tensor", describe(t));
}

void check_index(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  FASTNN_CHECK_ARG(t.dim() == dim && t.scalar_type() == at::kLong && t.device() == device, name,
                   "a " + std::to_string(dim) + "-d int64 tensor on " + device.str(), describe(t));
}

}  // namespace

ScoreFunc parse_score_func(const std::string& s) {
  if (s == "softmax") return ScoreFunc::Softmax;
  if (s == "topk_softmax") return ScoreFunc::TopkSoftmax;
  FASTNN_CHECK_ARG(s == "sigmoid", "score_func", "one of softmax, topk_softmax, sigmoid", s);
  return ScoreFunc::Sigmoid;
}

Routing make_routing(const at::Tensor& logits, int64_t top_k, const std::string& score_func, bool renormalize,
                     const c10::optional<at::Tensor>& selection_bias, int64_t num_groups, int64_t topk_groups,
                     const std::string& group_score, double routed_scaling_factor, double capacity_factor,
                     const std::string& drop_policy) {
  check_float(logits, "logits", 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  FASTNN_CHECK_ARG(E >= 1, "logits", "at least one expert", describe(logits));
  Routing r;
  r.score = parse_score_func(score_func);
  r.renormalize = renormalize;
  FASTNN_CHECK_ARG(num_groups >= 1 && E % num_groups == 0, "num_groups",
                   "a divisor of the number of experts (" + std::to_string(E) + ")", std::to_string(num_groups));
  FASTNN_CHECK_ARG(topk_groups >= 1 && topk_groups <= num_groups, "topk_groups",
                   "an integer in [1, num_groups=" + std::to_string(num_groups) + "]", std::to_string(topk_groups));
  const int64_t eligible = topk_groups * (E / num_groups);
  FASTNN_CHECK_ARG(top_k >= 1 && top_k <= eligible, "top_k",
                   "an integer in [1, " + std::to_string(eligible) + "] (experts that can be chosen)",
                   std::to_string(top_k));
  FASTNN_CHECK_ARG(group_score == "max" || group_score == "top2_sum", "group_score", "max or top2_sum",
                   group_score);
  FASTNN_CHECK_ARG(drop_policy == "drop" || drop_policy == "next_choice", "drop_policy", "drop or next_choice",
                   drop_policy);
  FASTNN_CHECK_ARG(capacity_factor >= 0, "capacity_factor", "a value >= 0", std::to_string(capacity_factor));
  if (selection_bias.has_value() && selection_bias->defined()) {
    const at::Tensor& b = *selection_bias;
    FASTNN_CHECK_ARG(b.dim() == 1 && b.size(0) == E && float_dtype(b.scalar_type()) &&
                         b.device() == logits.device(),
                     "selection_bias", "a float tensor of shape [" + std::to_string(E) + "] on " +
                                           logits.device().str(),
                     describe(b));
    r.selection_bias = b;
  }
  r.top_k = top_k;
  r.num_groups = num_groups;
  r.topk_groups = topk_groups;
  r.group_top2_sum = group_score == "top2_sum";
  r.scale = routed_scaling_factor;
  // ceil(capacity_factor * T * k / E), at least 1 (fastnn/reference/moe.py::expert_capacity). A
  // capacity of T * k slots or more can never drop one, so it means "no limit" (0); computing in
  // double first makes an infinite or huge factor saturate there instead of overflowing the cast.
  const double capacity = std::ceil(capacity_factor * static_cast<double>(T) * static_cast<double>(top_k) / E);
  r.capacity = capacity_factor > 0 && capacity < static_cast<double>(T * top_k)
                   ? std::max<int64_t>(1, static_cast<int64_t>(capacity))
                   : 0;
  r.next_choice = drop_policy == "next_choice";
  return r;
}

namespace {

void check_gating_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& ids) {
  check_float(logits, "logits", 2);
  check_index(ids, "expert_ids", 2, logits.device());
  FASTNN_CHECK_ARG(ids.size(0) == logits.size(0), "expert_ids", "one row per token of logits", describe(ids));
  check_float(grad_weights, "grad_weights", 2);
  FASTNN_CHECK_ARG(grad_weights.sizes() == ids.sizes() && grad_weights.device() == logits.device(),
                   "grad_weights", "the shape of expert_ids on " + logits.device().str(), describe(grad_weights));
  if (ids.device().is_cpu()) {
    const at::Tensor c = ids.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    const int64_t E = logits.size(1);
    for (int64_t i = 0; i < c.numel(); ++i)
      FASTNN_CHECK_ARG(p[i] >= -1 && p[i] < E, "expert_ids",
                       "expert indices in [0, " + std::to_string(E) + ") or -1 (dropped)",
                       std::to_string(p[i]) + " at slot " + std::to_string(i));
  }
}

// On CPU tensors: sorted_slots and slot_positions are inverse permutations of [0, N). (Checking
// that every position is in range and maps back to its slot proves both.)
void check_inverse_permutations(const at::Tensor& sorted_slots, const at::Tensor& pos) {
  if (!pos.device().is_cpu()) return;
  const at::Tensor sc = sorted_slots.contiguous(), pc = pos.contiguous();
  const int64_t* s = sc.data_ptr<int64_t>();
  const int64_t* p = pc.data_ptr<int64_t>();
  const int64_t N = sc.numel();
  for (int64_t i = 0; i < N; ++i) {
    FASTNN_CHECK_ARG(p[i] >= 0 && p[i] < N, "slot_positions", "rows in [0, " + std::to_string(N) + ")",
                     std::to_string(p[i]) + " at slot " + std::to_string(i));
    FASTNN_CHECK_ARG(s[p[i]] == i, "sorted_slots",
                     "the inverse permutation of slot_positions (each slot exactly once)",
                     std::to_string(s[p[i]]) + " at row " + std::to_string(p[i]) + " where slot_positions sends slot " +
                         std::to_string(i));
  }
}

void check_permute(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k) {
  check_float(x, "x", 2);
  FASTNN_CHECK_ARG(top_k >= 1, "top_k", "an integer >= 1", std::to_string(top_k));
  check_index(sorted_slots, "sorted_slots", 1, x.device());
  FASTNN_CHECK_ARG(sorted_slots.size(0) == x.size(0) * top_k, "sorted_slots",
                   "shape [" + std::to_string(x.size(0) * top_k) + "] (tokens x top_k)", describe(sorted_slots));
}

void check_unpermute(const at::Tensor& y, const at::Tensor& pos, const at::Tensor& weights) {
  check_float(y, "y", 2);
  check_index(pos, "slot_positions", 2, y.device());
  check_float(weights, "weights", 2);
  FASTNN_CHECK_ARG(weights.sizes() == pos.sizes() && weights.device() == y.device(), "weights",
                   "the shape of slot_positions on " + y.device().str(), describe(weights));
  FASTNN_CHECK_ARG(y.size(0) == pos.size(0) * pos.size(1), "y",
                   std::to_string(pos.size(0) * pos.size(1)) + " rows (one per slot)", describe(y));
}

void check_grouped(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, bool trans_b) {
  check_float(a, "a", 2);
  check_float(b, "b", 3);
  FASTNN_CHECK_ARG(b.scalar_type() == a.scalar_type() && b.device() == a.device(), "b",
                   "the dtype and device of a (" + describe(a) + ")", describe(b));
  const int64_t K = trans_b ? b.size(2) : b.size(1);
  FASTNN_CHECK_ARG(K == a.size(1), "b", std::string(trans_b ? "[E, N, K]" : "[E, K, N]") + " with K = " +
                                            std::to_string(a.size(1)), describe(b));
  FASTNN_CHECK_ARG(offsets.dim() == 1 && offsets.size(0) == b.size(0) &&
                       (offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt) &&
                       offsets.device() == a.device(),
                   "offsets", "an int64 or int32 tensor of shape [" + std::to_string(b.size(0)) + "] on " +
                                  a.device().str(),
                   describe(offsets));
}

// One wrapper per op, templated on the device kernel, serves both dispatch keys.
using GatingKernel = GatingResult (*)(const at::Tensor&, const Routing&);
using PermuteKernel = at::Tensor (*)(const at::Tensor&, const at::Tensor&, int64_t);
using UnpermuteKernel = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using UnpermuteBackwardKernel = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&);

template <GatingKernel kernel>
GatingResult topk_gating_op(const at::Tensor& logits, int64_t top_k, c10::string_view score_func, bool renormalize,
                            const c10::optional<at::Tensor>& selection_bias, int64_t num_groups,
                            int64_t topk_groups, c10::string_view group_score, double routed_scaling_factor,
                            double capacity_factor, c10::string_view drop_policy) {
  Routing r = make_routing(logits, top_k, std::string(score_func), renormalize, selection_bias, num_groups,
                           topk_groups, std::string(group_score), routed_scaling_factor, capacity_factor,
                           std::string(drop_policy));
  return kernel(logits, r);
}

template <PermuteKernel kernel>
at::Tensor permute_op(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k) {
  check_permute(x, sorted_slots, top_k);
  return kernel(x, sorted_slots, top_k);
}

template <UnpermuteKernel kernel>
at::Tensor unpermute_op(const at::Tensor& y, const at::Tensor& pos, const at::Tensor& weights) {
  check_unpermute(y, pos, weights);
  return kernel(y, pos, weights);
}

template <UnpermuteBackwardKernel kernel>
std::tuple<at::Tensor, at::Tensor> unpermute_backward_op(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& pos, const at::Tensor& weights,
                                                         const at::Tensor& sorted_slots) {
  check_unpermute(y, pos, weights);
  FASTNN_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({pos.size(0), y.size(1)}) &&
                       grad_out.scalar_type() == y.scalar_type() && grad_out.device() == y.device(),
                   "grad_out", "one row per token of slot_positions, of y's dtype and device", describe(grad_out));
  check_index(sorted_slots, "sorted_slots", 1, y.device());
  FASTNN_CHECK_ARG(sorted_slots.size(0) == y.size(0), "sorted_slots",
                   "one entry per row of y (" + std::to_string(y.size(0)) + ")", describe(sorted_slots));
  check_inverse_permutations(sorted_slots, pos);
  return kernel(grad_out, y, pos, weights, sorted_slots);
}

at::Tensor topk_gating_backward_op_cpu(const at::Tensor& grad_weights, const at::Tensor& logits,
                                       const at::Tensor& expert_ids, c10::string_view score_func,
                                       bool renormalize, double routed_scaling_factor) {
  check_gating_backward(grad_weights, logits, expert_ids);
  return topk_gating_backward_cpu(grad_weights, logits, expert_ids, parse_score_func(std::string(score_func)),
                                  renormalize, routed_scaling_factor);
}

at::Tensor grouped_mm_op_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, bool trans_b) {
  check_grouped(a, b, offsets, trans_b);
  return grouped_mm_cpu(a, b, offsets, trans_b);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_op_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                              const at::Tensor& b, const at::Tensor& offsets,
                                                              bool trans_b, bool need_a, bool need_b) {
  check_grouped(a, b, offsets, trans_b);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  FASTNN_CHECK_ARG(grad.sizes() == at::IntArrayRef({a.size(0), N}) && grad.scalar_type() == a.scalar_type() &&
                       grad.device() == a.device(),
                   "grad", "a tensor of shape [" + std::to_string(a.size(0)) + ", " + std::to_string(N) +
                               "] of a's dtype and device",
                   describe(grad));
  return grouped_mm_backward_cpu(grad, a, b, offsets, trans_b, need_a, need_b);
}

}  // namespace

}  // namespace moe
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def(
      "topk_gating(Tensor logits, int top_k, str score_func=\"softmax\", bool renormalize=True, "
      "Tensor? selection_bias=None, int num_groups=1, int topk_groups=1, str group_score=\"max\", "
      "float routed_scaling_factor=1.0, float capacity_factor=0.0, str drop_policy=\"drop\") -> "
      "(Tensor weights, Tensor expert_ids, Tensor tokens_per_expert, Tensor sorted_slots, Tensor slot_positions)");
  m.def(
      "topk_gating_backward(Tensor grad_weights, Tensor logits, Tensor expert_ids, str score_func, "
      "bool renormalize, float routed_scaling_factor) -> Tensor");
  m.def("permute_tokens(Tensor x, Tensor sorted_slots, int top_k) -> Tensor");
  m.def("unpermute_tokens(Tensor y, Tensor slot_positions, Tensor weights) -> Tensor");
  m.def(
      "unpermute_tokens_backward(Tensor grad_out, Tensor y, Tensor slot_positions, Tensor weights, "
      "Tensor sorted_slots) -> (Tensor, Tensor)");
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets, bool trans_b=False) -> Tensor");
  m.def(
      "grouped_mm_backward(Tensor grad, Tensor a, Tensor b, Tensor offsets, bool trans_b, bool need_a, "
      "bool need_b) -> (Tensor, Tensor)");
  m.def(
      "moe_mlp(Tensor x, Tensor sorted_slots, Tensor tokens_per_expert, Tensor slot_positions, Tensor weights, "
      "Tensor gate_up_proj, Tensor down_proj, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  using namespace fastnn::moe;
  m.impl("topk_gating", &topk_gating_op<topk_gating_cpu>);
  m.impl("topk_gating_backward", &topk_gating_backward_op_cpu);
  m.impl("permute_tokens", &permute_op<permute_tokens_cpu>);
  m.impl("unpermute_tokens", &unpermute_op<unpermute_tokens_cpu>);
  m.impl("unpermute_tokens_backward", &unpermute_backward_op<unpermute_tokens_backward_cpu>);
  m.impl("grouped_mm", &grouped_mm_op_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_op_cpu);
  m.impl("moe_mlp", &moe_mlp_cpu);
}

#ifdef FASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  using namespace fastnn::moe;
  m.impl("topk_gating", &topk_gating_op<topk_gating_cuda>);
  m.impl("permute_tokens", &permute_op<permute_tokens_cuda>);
  m.impl("unpermute_tokens", &unpermute_op<unpermute_tokens_cuda>);
  m.impl("unpermute_tokens_backward", &unpermute_backward_op<unpermute_tokens_backward_cuda>);
}
#endif

// The Mixture-of-Experts ops' host interface: routing options, argument checks and the kernels'
// entry points per device. Conventions (slots, layouts, dropped slots) are those of
// fastnn/reference/moe.py, which is the oracle every kernel is tested against.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace fastnn {
namespace moe {

enum class ScoreFunc { Softmax, TopkSoftmax, Sigmoid };

struct Routing {
  int64_t top_k = 1;
  ScoreFunc score = ScoreFunc::Softmax;
  bool renormalize = true;
  at::Tensor selection_bias;  // [E] or undefined
  int64_t num_groups = 1;
  int64_t topk_groups = 1;
  bool group_top2_sum = false;  // group score: sum of the two best (DeepSeek-V3) or the best
  double scale = 1.0;           // routed_scaling_factor
  int64_t capacity = 0;         // slots per expert; 0 = unlimited
  bool next_choice = false;     // over-capacity slots go to the next preferred expert
};

ScoreFunc parse_score_func(const std::string& s);
Routing make_routing(const at::Tensor& logits, int64_t top_k, const std::string& score_func,
                     bool renormalize, const c10::optional<at::Tensor>& selection_bias,
                     int64_t num_groups, int64_t topk_groups, const std::string& group_score,
                     double routed_scaling_factor, double capacity_factor,
                     const std::string& drop_policy);

using GatingResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// CPU kernels (moe_cpu.cpp).
GatingResult topk_gating_cpu(const at::Tensor& logits, const Routing& r);
at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits,
                                    const at::Tensor& expert_ids, ScoreFunc score, bool renormalize,
                                    double scale);
at::Tensor permute_tokens_cpu(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k);
at::Tensor unpermute_tokens_cpu(const at::Tensor& y, const at::Tensor& slot_positions,
                                const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor> unpermute_tokens_backward_cpu(const at::Tensor& grad_out,
                                                                 const at::Tensor& y,
                                                                 const at::Tensor& slot_positions,
                                                                 const at::Tensor& weights,
                                                                 const at::Tensor& sorted_slots);

// Grouped GEMM on the CPU (grouped_mm_cpu.cpp): one at::mm per non-empty group.
at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, bool trans_b);
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                           const at::Tensor& b, const at::Tensor& offsets,
                                                           bool trans_b, bool need_a, bool need_b);

// The experts' inference forward on the CPU (moe_mlp_cpu.cpp): checks its own arguments.
at::Tensor moe_mlp_cpu(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& tokens_per_expert,
                       const at::Tensor& slot_positions, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj, c10::string_view activation);

#ifdef FASTNN_WITH_CUDA
// CUDA kernels (kernels/cuda/moe/moe_cuda.cu).
GatingResult topk_gating_cuda(const at::Tensor& logits, const Routing& r);
at::Tensor permute_tokens_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k);
at::Tensor unpermute_tokens_cuda(const at::Tensor& y, const at::Tensor& slot_positions,
                                 const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor> unpermute_tokens_backward_cuda(const at::Tensor& grad_out,
                                                                  const at::Tensor& y,
                                                                  const at::Tensor& slot_positions,
                                                                  const at::Tensor& weights,
                                                                  const at::Tensor& sorted_slots);
#endif

}  // namespace moe
}  // namespace fastnn

// fastnn::moe_mlp on the CPU: the routed experts' whole forward pass (gather, gate/up GEMM, gated
// activation, down GEMM, weighted combine) for inference, in two parallel regions instead of the
// ~10 ops per expert of the composed path. Work items are (expert, tile of BLOCK rows); each runs
// single-threaded BLAS inside at::parallel_for (nested parallelism is off), so the two cores never
// meet at a barrier between small ops, and a tile's intermediates stay in cache.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include "common.h"
#include "moe/moe.h"

namespace fastnn {
namespace moe {

namespace {

// Rows per work item: large enough that BLAS's packing of the expert's weight is amortised (64-row
// tiles measured ~8% slower on the 2-core dev machine), small enough to split a busy expert.
constexpr int64_t kRowsPerTile = 256;

at::Tensor gated(const at::Tensor& h, int64_t inter, const std::string& act) {
  const at::Tensor gate = h.narrow(1, 0, inter);
  const at::Tensor up = h.narrow(1, inter, inter);
  at::Tensor a;
  if (act == "silu") {
    a = at::silu(gate);
  } else if (act == "gelu") {
    a = at::gelu(gate);
  } else if (act == "gelu_tanh") {
    a = at::gelu(gate, "tanh");
  } else {
    a = at::relu(gate);
  }
  return a.mul_(up);
}

}  // namespace

at::Tensor moe_mlp_cpu(const at::Tensor& x_in, const at::Tensor& sorted_slots, const at::Tensor& tokens_per_expert,
                       const at::Tensor& slot_positions, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj, c10::string_view activation_sv) {
  const std::string act(activation_sv);
  FASTNN_CHECK_ARG(act == "silu" || act == "gelu" || act == "gelu_tanh" || act == "relu", "activation",
                   "silu, gelu, gelu_tanh or relu", act);
  const at::Tensor x = x_in.contiguous();
  FASTNN_CHECK_ARG(x.dim() == 2 && at::isFloatingType(x.scalar_type()), "x", "a 2-d float tensor [T, H]",
                   describe(x));
  FASTNN_CHECK_ARG(slot_positions.dim() == 2 && slot_positions.size(0) == x.size(0) &&
                       slot_positions.scalar_type() == at::kLong,
                   "slot_positions", "an int64 tensor of shape [" + std::to_string(x.size(0)) + ", top_k]",
                   describe(slot_positions));
  FASTNN_CHECK_ARG(weights.sizes() == slot_positions.sizes() && at::isFloatingType(weights.scalar_type()), "weights",
                   "a float tensor of the shape of slot_positions", describe(weights));
  FASTNN_CHECK_ARG(gate_up_proj.dim() == 3, "gate_up_proj", "a 3-d tensor [E, 2I, H]", describe(gate_up_proj));
  const int64_t T = x.size(0), H = x.size(1), E = gate_up_proj.size(0), k = slot_positions.size(1);
  FASTNN_CHECK_ARG(gate_up_proj.dim() == 3 && gate_up_proj.size(2) == H && gate_up_proj.size(1) % 2 == 0 &&
                       gate_up_proj.scalar_type() == x.scalar_type(),
                   "gate_up_proj", "[E, 2I, " + std::to_string(H) + "] of dtype " +
                                       std::string(c10::toString(x.scalar_type())),
                   describe(gate_up_proj));
  const int64_t inter = gate_up_proj.size(1) / 2;
  FASTNN_CHECK_ARG(down_proj.dim() == 3 && down_proj.size(0) == E && down_proj.size(1) == H &&
                       down_proj.size(2) == inter && down_proj.scalar_type() == x.scalar_type(),
                   "down_proj", "[" + std::to_string(E) + ", " + std::to_string(H) + ", " + std::to_string(inter) +
                                    "]",
                   describe(down_proj));
  FASTNN_CHECK_ARG(tokens_per_expert.dim() == 1 && tokens_per_expert.size(0) == E &&
                       tokens_per_expert.scalar_type() == at::kLong,
                   "tokens_per_expert", "an int64 tensor of shape [" + std::to_string(E) + "]",
                   describe(tokens_per_expert));
  FASTNN_CHECK_ARG(sorted_slots.dim() == 1 && sorted_slots.size(0) == T * k && sorted_slots.scalar_type() == at::kLong,
                   "sorted_slots", "an int64 tensor of shape [" + std::to_string(T * k) + "]", describe(sorted_slots));
  const at::Tensor slots = sorted_slots.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t p = 0; p < T * k; ++p)
    FASTNN_CHECK_ARG(sp[p] >= 0 && sp[p] < T * k, "sorted_slots", "slot indices in [0, " + std::to_string(T * k) + ")",
                     std::to_string(sp[p]) + " at position " + std::to_string(p));
  const at::Tensor counts = tokens_per_expert.contiguous();
  const int64_t* cnt = counts.data_ptr<int64_t>();
  // Work items: (expert, first row, rows).
  std::vector<std::array<int64_t, 3>> items;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    FASTNN_CHECK_ARG(cnt[e] >= 0 && start + cnt[e] <= T * k, "tokens_per_expert",
                     "counts summing to at most tokens x top_k (" + std::to_string(T * k) + ")",
                     std::to_string(cnt[e]) + " at expert " + std::to_string(e));
    for (int64_t r = 0; r < cnt[e]; r += kRowsPerTile) items.push_back({e, start + r, std::min(kRowsPerTile, cnt[e] - r)});
    start += cnt[e];
  }
  const at::Tensor tok = at::div(slots, k, "floor");
  // Expert outputs in the permuted order; rows of dropped slots (past the last expert) are zero.
  at::Tensor y = at::empty({T * k, H}, x.options());
  if (start < T * k) y.narrow(0, start, T * k - start).zero_();
  // Worker threads do not inherit the caller's thread-local dispatch state: skip autograd there
  // explicitly (this op has no backward; the tensors may still require grad).
  const at::Tensor w1 = gate_up_proj.detach(), w2 = down_proj.detach(), xd = x.detach();
  // Largest items first, handed out dynamically: experts get unequal token counts, and a static
  // split of a handful of items over the threads leaves one of them idle at the end.
  std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a[2] > b[2]; });
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t i = next++; i < n_items; i = next++) {
      const auto [e, r0, n] = items[i];
      const at::Tensor rows = at::index_select(xd, 0, tok.narrow(0, r0, n));
      const at::Tensor h = at::mm(rows, w1.select(0, e).t());
      at::Tensor dst = y.narrow(0, r0, n);
      at::mm_out(dst, gated(h, inter, act), w2.select(0, e).t());
    }
  });
  return unpermute_tokens_cpu(y, slot_positions, weights);
}

}  // namespace moe
}  // namespace fastnn

// fastnn::int8_moe_mlp on the CPU: the routed experts of an MoE layer (gate/up GEMM, gated
// activation, down GEMM, weighted combine) with int8 expert weights, for inference.
//
// The numbers are those of fastnn/reference/quantized.py: expert weights int8 with one fp32 scale
// per output channel per expert; in dynamic mode every token row, and every row of the
// intermediate activation, is quantized per row (symmetric, round to nearest even) and multiplied
// in exact int32 by the s8s8 kernel that qgemm.h picks at run time; in weight-only mode the rows
// stay fp32 and the f32s8 kernel dequantizes the weights as it reads them. All the rest is fp32.
//
// Work is done in the permuted order of the gating op (rows of expert 0, then expert 1, ...; the
// rows past tokens_per_expert.sum() are dropped slots), in four parallel passes:
//   1. quantize (or copy) each kept slot's token row into its permuted row;
//   2. items (expert, block of intermediate columns, tile of rows): the gate and up products of the
//      tile against the block's gate rows and up rows, then act(gate) * up into h [P, I];
//   3. quantize the rows of h (dynamic mode);
//   4. items (expert, block of output columns, tile of rows): the down product into y [T*k, H];
// and the weighted combine of fastnn's MoE family (unpermute_tokens_cpu). A column block holds
// ~16 KB of int8 weights, so it stays in L1 while the kernel walks the tile's rows; items are
// handed out dynamically (experts get unequal numbers of rows), and small batches still spread
// over the threads through their column blocks. The vector code (activations, row quantization)
// is isa/qmoe_vec.cpp's, one copy per instruction-set variant (cpu_isa.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "moe/moe.h"
#include "quantized/qgemm.h"
#include "quantized/qmoe_vec.h"
#include "quantized/quantized.h"

namespace fastnn {
namespace quantized {
namespace {

constexpr int64_t kRowsPerTile = 64;
constexpr int64_t kBlockBytes = 16384;  // int8 weight bytes of one column block

Act parse_act(const std::string& a) {
  FASTNN_CHECK_ARG(a == "silu" || a == "gelu" || a == "gelu_tanh" || a == "relu", "activation",
                   "one of silu, gelu, gelu_tanh, relu", "'" + a + "'");
  return a == "silu" ? Act::SiLU : a == "gelu" ? Act::GeLU : a == "gelu_tanh" ? Act::GeLUTanh : Act::ReLU;
}

// Columns per block: ~kBlockBytes of an expert's [N, K] int8 weight, a multiple of 4 (the kernels'
// column step), at least 4.
int64_t block_cols(int64_t K) {
  const int64_t c = kBlockBytes / std::max<int64_t>(K, 1);
  return std::max<int64_t>(4, std::min<int64_t>(256, c - c % 4));
}

struct Item {
  int64_t e, r0, rows, c0, c1;
};

// Items (expert, column block of [0, N), row tile): consecutive items share a weight block.
std::vector<Item> make_items(const int64_t* counts, int64_t E, int64_t N, int64_t K) {
  std::vector<Item> items;
  const int64_t bc = block_cols(K);
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c0 = 0; c0 < N && counts[e] > 0; c0 += bc)
      for (int64_t r = 0; r < counts[e]; r += kRowsPerTile)
        items.push_back({e, start + r, std::min(kRowsPerTile, counts[e] - r), c0, std::min(N, c0 + bc)});
    start += counts[e];
  }
  return items;
}

// Runs f(item, scratch) over the items, handed out one at a time to the threads.
template <typename F>
void for_items(const std::vector<Item>& items, const F& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<char> scratch;
    for (int64_t i = next++; i < n; i = next++) f(items[i], scratch);
  });
}

template <typename In, typename Acc>
using Kernel = void (*)(const In*, int64_t, const int8_t*, int64_t, Acc*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);

// The left operand of a product: permuted rows a [P, K] (int8 with per-row scales, or fp32 with
// row_scale null) and the kernel that multiplies them by int8 weight rows.
template <typename In, typename Acc>
struct Rows {
  Kernel<In, Acc> kernel;
  const In* a;
  const float* row_scale;
  int64_t K;
};

// out[m * ldo + j] = (acc * row_scale[r0 + m]) * w_scale[c0 + j] for the rows [r0, r0 + rows) of
// `rows` against weight rows [c0, c1) of one expert's w [N, K]; acc has room for rows * (c1 - c0).
template <typename In, typename Acc>
void product(const Rows<In, Acc>& x, const int8_t* w, const float* w_scale, const Item& it, int64_t c_off, Acc* acc,
             float* out, int64_t ldo) {
  const int64_t n = it.c1 - it.c0;
  x.kernel(x.a + it.r0 * x.K, x.K, w + (c_off + it.c0) * x.K, x.K, acc, n, it.rows, 0, n, x.K);
  const float* ws = w_scale + c_off + it.c0;
  for (int64_t m = 0; m < it.rows; ++m) {
    const float rs = x.row_scale ? x.row_scale[it.r0 + m] : 1.f;  // x * 1 is exact: one formula
    const Acc* am = acc + m * n;
    float* om = out + m * ldo;
    for (int64_t j = 0; j < n; ++j) om[j] = static_cast<float>(am[j]) * rs * ws[j];
  }
}

template <typename T>
T* scratch_of(std::vector<char>& s, int64_t count, int64_t part, int64_t parts) {
  if (static_cast<int64_t>(s.size()) < count * parts * static_cast<int64_t>(sizeof(float)))
    s.resize(count * parts * sizeof(float));
  return reinterpret_cast<T*>(s.data() + part * count * sizeof(float));
}

struct Args {
  at::Tensor x, slots, counts, pos, weights, w1, s1, w2, s2;
  int64_t T, H, E, I, k, P;
  Act act;
  const MoeVecKernels* vec;  // the active instruction-set variant's
};

// Passes 2-4 on the permuted rows x1 [P, H]; returns y [T*k, H] (zero rows for dropped slots).
template <typename In, typename Acc>
at::Tensor experts(const Args& a, const Rows<In, Acc>& x1) {
  constexpr bool requantize = std::is_same<In, int8_t>::value;
  const int64_t P = a.P, H = a.H, I = a.I;
  const int64_t* counts = a.counts.data_ptr<int64_t>();
  const int8_t* w1 = a.w1.data_ptr<int8_t>();
  const int8_t* w2 = a.w2.data_ptr<int8_t>();
  const float* s1 = a.s1.data_ptr<float>();
  const float* s2 = a.s2.data_ptr<float>();
  at::Tensor h_t = at::empty({P, I}, a.x.options());
  float* h = h_t.data_ptr<float>();
  for_items(make_items(counts, a.E, I, H), [&](const Item& it, std::vector<char>& s) {
    const int64_t n = it.c1 - it.c0, cells = it.rows * n;
    Acc* acc = scratch_of<Acc>(s, cells, 0, 3);
    float* g = scratch_of<float>(s, cells, 1, 3);
    float* u = scratch_of<float>(s, cells, 2, 3);
    product(x1, w1 + it.e * 2 * I * H, s1 + it.e * 2 * I, it, 0, acc, g, n);
    product(x1, w1 + it.e * 2 * I * H, s1 + it.e * 2 * I, it, I, acc, u, n);
    for (int64_t m = 0; m < it.rows; ++m) a.vec->gated(a.act, g + m * n, u + m * n, h + (it.r0 + m) * I + it.c0, n);
  });
  // The down product's rows: h itself (weight-only) or h quantized per row.
  Rows<In, Acc> x2{x1.kernel, reinterpret_cast<const In*>(h), nullptr, I};
  at::Tensor hq = at::empty({requantize ? P : 0, I}, a.x.options().dtype(at::kChar));
  at::Tensor hs = at::empty({requantize ? P : 0}, a.x.options());
  if (requantize) {
    int8_t* q = hq.data_ptr<int8_t>();
    float* qs = hs.data_ptr<float>();
    at::parallel_for(0, P, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) a.vec->quantize_row(h + p * I, I, q + p * I, qs + p);
    });
    x2.a = reinterpret_cast<const In*>(q);
    x2.row_scale = qs;
  }
  at::Tensor y = at::empty({a.T * a.k, H}, a.x.options());
  float* yp = y.data_ptr<float>();
  std::fill(yp + P * H, yp + a.T * a.k * H, 0.f);
  for_items(make_items(counts, a.E, H, I), [&](const Item& it, std::vector<char>& s) {
    Acc* acc = scratch_of<Acc>(s, it.rows * (it.c1 - it.c0), 0, 1);
    product(x2, w2 + it.e * H * I, s2 + it.e * H, it, 0, acc, yp + it.r0 * H + it.c0, H);
  });
  return y;
}

void check(const Args& a) {
  FASTNN_CHECK_ARG(a.slots.scalar_type() == at::kLong && a.slots.dim() == 1 && a.slots.size(0) == a.T * a.k,
                   "sorted_slots", "an int64 tensor of shape [" + std::to_string(a.T * a.k) + "]", describe(a.slots));
  FASTNN_CHECK_ARG(a.weights.scalar_type() == at::kFloat && a.weights.sizes() == a.pos.sizes(), "weights",
                   "a float32 tensor of the shape of slot_positions", describe(a.weights));
  FASTNN_CHECK_ARG(a.s1.scalar_type() == at::kFloat && a.s1.sizes() == at::IntArrayRef({a.E, 2 * a.I}),
                   "gate_up_scale", "a float32 tensor of shape [" + std::to_string(a.E) + ", " +
                                        std::to_string(2 * a.I) + "]", describe(a.s1));
  FASTNN_CHECK_ARG(a.w2.scalar_type() == at::kChar && a.w2.sizes() == at::IntArrayRef({a.E, a.H, a.I}), "down_q",
                   "an int8 tensor of shape [" + std::to_string(a.E) + ", " + std::to_string(a.H) + ", " +
                       std::to_string(a.I) + "]", describe(a.w2));
  FASTNN_CHECK_ARG(a.s2.scalar_type() == at::kFloat && a.s2.sizes() == at::IntArrayRef({a.E, a.H}), "down_scale",
                   "a float32 tensor of shape [" + std::to_string(a.E) + ", " + std::to_string(a.H) + "]",
                   describe(a.s2));
  FASTNN_CHECK_ARG(a.counts.scalar_type() == at::kLong && a.counts.dim() == 1 && a.counts.size(0) == a.E,
                   "tokens_per_expert", "an int64 tensor of shape [" + std::to_string(a.E) + "]", describe(a.counts));
  const int64_t* sp = a.slots.data_ptr<int64_t>();
  for (int64_t p = 0; p < a.T * a.k; ++p)
    FASTNN_CHECK_ARG(sp[p] >= 0 && sp[p] < a.T * a.k, "sorted_slots",
                     "slot indices in [0, " + std::to_string(a.T * a.k) + ")",
                     std::to_string(sp[p]) + " at position " + std::to_string(p));
  const int64_t* cnt = a.counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < a.E; ++e) {
    FASTNN_CHECK_ARG(cnt[e] >= 0 && total + cnt[e] <= a.T * a.k, "tokens_per_expert",
                     "non-negative counts summing to at most tokens x top_k (" + std::to_string(a.T * a.k) + ")",
                     std::to_string(cnt[e]) + " at expert " + std::to_string(e));
    total += cnt[e];
  }
}

}  // namespace

at::Tensor int8_moe_mlp(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& tokens_per_expert,
                        const at::Tensor& slot_positions, const at::Tensor& weights, const at::Tensor& gate_up_q,
                        const at::Tensor& gate_up_scale, const at::Tensor& down_q, const at::Tensor& down_scale,
                        c10::string_view activation, bool weight_only) {
  check_cpu({{"x", &x}, {"sorted_slots", &sorted_slots}, {"tokens_per_expert", &tokens_per_expert},
             {"slot_positions", &slot_positions}, {"weights", &weights}, {"gate_up_q", &gate_up_q},
             {"gate_up_scale", &gate_up_scale}, {"down_q", &down_q}, {"down_scale", &down_scale}});
  FASTNN_CHECK_ARG(x.scalar_type() == at::kFloat && x.dim() == 2, "x", "a float32 tensor [T, H]", describe(x));
  FASTNN_CHECK_ARG(slot_positions.scalar_type() == at::kLong && slot_positions.dim() == 2 &&
                       slot_positions.size(0) == x.size(0) && slot_positions.size(1) >= 1,
                   "slot_positions", "an int64 tensor of shape [" + std::to_string(x.size(0)) + ", top_k]",
                   describe(slot_positions));
  FASTNN_CHECK_ARG(gate_up_q.scalar_type() == at::kChar && gate_up_q.dim() == 3 && gate_up_q.size(2) == x.size(1) &&
                       gate_up_q.size(1) % 2 == 0,
                   "gate_up_q", "an int8 tensor [E, 2I, " + std::to_string(x.size(1)) + "]", describe(gate_up_q));
  Args a{x.contiguous(), sorted_slots.contiguous(), tokens_per_expert.contiguous(), slot_positions.contiguous(),
         weights.contiguous(), gate_up_q.contiguous(), gate_up_scale.contiguous(), down_q.contiguous(),
         down_scale.contiguous(), x.size(0), x.size(1), gate_up_q.size(0), gate_up_q.size(1) / 2,
         slot_positions.size(1), 0, parse_act(std::string(activation)), &FASTNN_ISA_SELECT(moe_vec_kernels)};
  check(a);
  const int64_t* cnt = a.counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < a.E; ++e) a.P += cnt[e];
  const int64_t* sp = a.slots.data_ptr<int64_t>();
  const float* xp = a.x.data_ptr<float>();
  const Kernels& kern = active_kernels();
  const int64_t H = a.H, P = a.P, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::Tensor y;
  if (weight_only) {
    at::Tensor xf = at::empty({P, H}, a.x.options());
    float* f = xf.data_ptr<float>();
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) std::copy_n(xp + (sp[p] / a.k) * H, H, f + p * H);
    });
    y = experts<float, float>(a, {kern.f32s8, f, nullptr, H});
  } else {
    at::Tensor xq = at::empty({P, H}, a.x.options().dtype(at::kChar));
    at::Tensor xs = at::empty({P}, a.x.options());
    int8_t* q = xq.data_ptr<int8_t>();
    float* qs = xs.data_ptr<float>();
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) a.vec->quantize_row(xp + (sp[p] / a.k) * H, H, q + p * H, qs + p);
    });
    y = experts<int8_t, int32_t>(a, {kern.s8s8, q, qs, H});
  }
  return moe::unpermute_tokens_cpu(y, a.pos, a.weights);
}

}  // namespace quantized
}  // namespace fastnn

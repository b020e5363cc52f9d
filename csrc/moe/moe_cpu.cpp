// CPU kernels of the MoE ops. Gating runs one token per iteration of at::parallel_for (scores,
// selection and weights of a token touch only its own row); the capacity rounds and the counting
// sort that builds the permutation are O(T*k) serial passes, which is cheap next to the experts.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <numeric>
#include <vector>

#include "common.h"
#include "moe/moe.h"

namespace fastnn {
namespace moe {

namespace {

template <typename acc_t>
void token_scores(const acc_t* x, int64_t E, ScoreFunc f, acc_t* out) {
  if (f == ScoreFunc::Sigmoid) {
    for (int64_t e = 0; e < E; ++e) out[e] = acc_t(1) / (acc_t(1) + std::exp(-x[e]));
    return;
  }
  if (f == ScoreFunc::TopkSoftmax) {  // ranks the logits themselves
    std::copy(x, x + E, out);
    return;
  }
  bool nan = false;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    nan = nan || std::isnan(x[e]);
    m = std::max(m, x[e]);
  }
  if (nan) {  // as torch.softmax: a NaN anywhere in the row makes the whole row NaN
    std::fill(out, out + E, std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  acc_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    out[e] = std::exp(x[e] - m);
    sum += out[e];
  }
  for (int64_t e = 0; e < E; ++e) out[e] /= sum;
}

// Experts of one token in preference order (eligible ones first); returns how many are eligible.
// Ties go to the lower expert index; NaN scores rank as -inf.
template <typename acc_t>
int64_t token_ranking(const acc_t* scores, const acc_t* bias, int64_t E, const Routing& r,
                      bool full, acc_t* sel, int64_t* order) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    acc_t v = scores[e] + (bias ? bias[e] : acc_t(0));
    sel[e] = std::isnan(v) ? ninf : v;
  }
  std::iota(order, order + E, int64_t(0));
  int64_t eligible = E;
  std::vector<int64_t> groups;
  std::vector<char> keep;
  if (r.num_groups > 1) {
    const int64_t G = r.num_groups, gsz = E / G;
    std::vector<acc_t> gs(G);
    for (int64_t g = 0; g < G; ++g) {
      acc_t best = ninf, second = ninf;
      for (int64_t i = 0; i < gsz; ++i) {
        acc_t v = sel[g * gsz + i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      acc_t s = r.group_top2_sum ? (gsz > 1 ? best + second : best) : best;
      gs[g] = std::isnan(s) ? ninf : s;
    }
    groups.resize(G);
    std::iota(groups.begin(), groups.end(), int64_t(0));
    std::stable_sort(groups.begin(), groups.end(),
                     [&](int64_t a, int64_t b) { return gs[a] > gs[b]; });
    keep.assign(E, 0);
    for (int64_t i = 0; i < r.topk_groups; ++i)
      for (int64_t j = 0; j < gsz; ++j) keep[groups[i] * gsz + j] = 1;
    // Eligible experts first (stable: ineligible ones stay in index order after them).
    std::stable_partition(order, order + E, [&](int64_t e) { return keep[e] != 0; });
    eligible = r.topk_groups * gsz;
  }
  auto before = [&](int64_t a, int64_t b) { return sel[a] > sel[b] || (sel[a] == sel[b] && a < b); };
  if (full) {
    std::sort(order, order + eligible, before);
  } else {
    std::partial_sort(order, order + r.top_k, order + eligible, before);
  }
  return eligible;
}

// Weights of one token's kept slots (ids < 0: dropped, weight 0). A NaN anywhere in the token's
// logits makes its kept topk_softmax weights NaN, as softmax's do (fastnn/reference/moe.py), even
// though the NaN expert itself ranks last and is not chosen.
template <typename acc_t>
void token_weights(const acc_t* x, int64_t E, const acc_t* scores, const int64_t* ids, int64_t k, const Routing& r,
                   acc_t* w) {
  if (r.score == ScoreFunc::TopkSoftmax) {
    bool nan = false;
    for (int64_t e = 0; e < E; ++e) nan = nan || std::isnan(x[e]);
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] < 0) continue;
      m = std::max(m, x[ids[j]]);
    }
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      w[j] = ids[j] < 0 ? acc_t(0) : std::exp(x[ids[j]] - m);
      sum += w[j];
    }
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] < 0) {
        w[j] = 0;
      } else {
        w[j] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : w[j] / sum;
      }
    }
  } else {
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      w[j] = ids[j] < 0 ? acc_t(0) : scores[ids[j]];
      sum += w[j];
    }
    if (r.renormalize) {
      acc_t denom = sum + (r.score == ScoreFunc::Sigmoid ? acc_t(1e-20) : acc_t(0));
      if (denom == 0) denom = 1;
      for (int64_t j = 0; j < k; ++j) w[j] = ids[j] < 0 ? acc_t(0) : w[j] / denom;
    }
  }
  if (r.scale != 1.0)
    for (int64_t j = 0; j < k; ++j) w[j] *= static_cast<acc_t>(r.scale);
}

// Capacity: the rounds of fastnn/reference/moe.py::_apply_capacity, serially. ``ranking`` holds
// each token's full preference order, ``eligible`` how many of them it may use.
void apply_capacity(const int64_t* ranking, const int64_t* eligible, int64_t T, int64_t E,
                    const Routing& r, int64_t* ids) {
  const int64_t k = r.top_k;
  std::vector<int64_t> fill(E, 0), used(T, k);
  std::vector<char> pending(T * k, 1), accepted(T * k, 0);
  const int64_t rounds = r.next_choice ? E - k + 1 : 1;
  for (int64_t round = 0; round < rounds; ++round) {
    bool any = false;
    if (round > 0) {
      for (int64_t t = 0; t < T; ++t) {
        int64_t i = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = t * k + j;
          if (!pending[s]) continue;
          const int64_t cand = used[t] + i++;
          if (cand < eligible[t]) {
            ids[s] = ranking[t * E + cand];
          } else {
            pending[s] = 0;
          }
        }
        used[t] += i;
      }
    }
    // Priority: choice rank first, then token order.
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = t * k + j;
        if (!pending[s]) continue;
        if (fill[ids[s]] < r.capacity) {
          ++fill[ids[s]];
          accepted[s] = 1;
          pending[s] = 0;
        } else {
          any = true;
        }
      }
    }
    if (!any) break;  // nothing left to place: later rounds would change nothing
  }
  for (int64_t s = 0; s < T * k; ++s)
    if (!accepted[s]) ids[s] = -1;
}

template <typename scalar_t, typename acc_t>
void gating_kernel(const at::Tensor& logits, const Routing& r, at::Tensor& weights, at::Tensor& ids) {
  const int64_t T = logits.size(0), E = logits.size(1), k = r.top_k;
  const scalar_t* lg = logits.data_ptr<scalar_t>();
  acc_t* w = weights.data_ptr<acc_t>();
  int64_t* id = ids.data_ptr<int64_t>();
  at::Tensor bias_t;
  if (r.selection_bias.defined())
    bias_t = r.selection_bias.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* bias = bias_t.defined() ? bias_t.data_ptr<acc_t>() : nullptr;
  const bool capacity = r.capacity > 0;
  // With capacity the rankings outlive the parallel loop (next-choice needs all of them).
  std::vector<int64_t> rankings(capacity ? T * E : 0), eligible(capacity ? T : 0);
  auto weights_of = [&](int64_t t, const acc_t* x, const acc_t* scores) {
    token_weights<acc_t>(x, E, scores, id + t * k, k, r, w + t * k);
  };
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(E), scores(E), sel(E);
    std::vector<int64_t> order(E);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < E; ++e) x[e] = static_cast<acc_t>(lg[t * E + e]);
      token_scores<acc_t>(x.data(), E, r.score, scores.data());
      int64_t* ord = capacity ? rankings.data() + t * E : order.data();
      int64_t n = token_ranking<acc_t>(scores.data(), bias, E, r, capacity && r.next_choice, sel.data(), ord);
      if (capacity) eligible[t] = n;
      std::copy(ord, ord + k, id + t * k);
      if (!capacity) weights_of(t, x.data(), scores.data());
    }
  });
  if (!capacity) return;
  apply_capacity(rankings.data(), eligible.data(), T, E, r, id);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(E), scores(E);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < E; ++e) x[e] = static_cast<acc_t>(lg[t * E + e]);
      token_scores<acc_t>(x.data(), E, r.score, scores.data());
      weights_of(t, x.data(), scores.data());
    }
  });
}

// tokens_per_expert, sorted_slots, slot_positions from the final expert ids (a counting sort:
// kept slots by expert in slot order, then dropped slots in slot order).
void build_layout(const int64_t* ids, int64_t T, int64_t k, int64_t E, int64_t* counts,
                  int64_t* sorted_slots, int64_t* positions) {
  std::fill(counts, counts + E, int64_t(0));
  int64_t kept = 0;
  for (int64_t s = 0; s < T * k; ++s) {
    if (ids[s] >= 0) {
      ++counts[ids[s]];
      ++kept;
    }
  }
  std::vector<int64_t> next(E + 1);
  int64_t acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = acc;
    acc += counts[e];
  }
  next[E] = kept;
  for (int64_t s = 0; s < T * k; ++s) {
    const int64_t p = next[ids[s] >= 0 ? ids[s] : E]++;
    sorted_slots[p] = s;
    positions[s] = p;
  }
}

}  // namespace

GatingResult topk_gating_cpu(const at::Tensor& logits_in, const Routing& r) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = r.top_k;
  const auto wdtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(wdtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  at::Tensor counts = at::empty({E}, ids.options());
  at::Tensor sorted_slots = at::empty({T * k}, ids.options());
  at::Tensor positions = at::empty({T, k}, ids.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gating_kernel<scalar_t, acc_t>(logits, r, weights, ids);
  });
  build_layout(ids.data_ptr<int64_t>(), T, k, E, counts.data_ptr<int64_t>(), sorted_slots.data_ptr<int64_t>(),
               positions.data_ptr<int64_t>());
  return {weights, ids, counts, sorted_slots, positions};
}

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits_in,
                                    const at::Tensor& expert_ids, ScoreFunc score, bool renormalize,
                                    double scale) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(1);
  const auto wdtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = at::zeros({T, E}, logits.options().dtype(wdtype));
  const at::Tensor g_in = grad_weights.to(wdtype).contiguous();
  const at::Tensor ids_c = expert_ids.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    const acc_t* gw = g_in.data_ptr<acc_t>();
    const int64_t* ids = ids_c.data_ptr<int64_t>();
    acc_t* out = grad.data_ptr<acc_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(E), a(E), ga(E), gsel(k), asel(k);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t* id = ids + t * k;
        for (int64_t e = 0; e < E; ++e) x[e] = static_cast<acc_t>(lg[t * E + e]);
        acc_t* o = out + t * E;
        std::vector<acc_t> g(k);
        for (int64_t j = 0; j < k; ++j) g[j] = id[j] < 0 ? acc_t(0) : gw[t * k + j] * static_cast<acc_t>(scale);
        if (score == ScoreFunc::TopkSoftmax) {  // softmax over the kept logits
          acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0, gq = 0;
          for (int64_t j = 0; j < k; ++j)
            if (id[j] >= 0) m = std::max(m, x[id[j]]);
          for (int64_t j = 0; j < k; ++j) {
            asel[j] = id[j] < 0 ? acc_t(0) : std::exp(x[id[j]] - m);
            sum += asel[j];
          }
          for (int64_t j = 0; j < k; ++j) {
            asel[j] = id[j] < 0 ? acc_t(0) : asel[j] / sum;
            gq += g[j] * asel[j];
          }
          for (int64_t j = 0; j < k; ++j)
            if (id[j] >= 0) o[id[j]] += asel[j] * (g[j] - gq);
          continue;
        }
        token_scores<acc_t>(x.data(), E, score, a.data());
        acc_t denom = 0, ga_dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          asel[j] = id[j] < 0 ? acc_t(0) : a[id[j]];
          denom += asel[j];
        }
        if (renormalize) {
          denom += score == ScoreFunc::Sigmoid ? acc_t(1e-20) : acc_t(0);
          if (denom == 0) denom = 1;
          for (int64_t j = 0; j < k; ++j) ga_dot += g[j] * asel[j];
          for (int64_t j = 0; j < k; ++j) gsel[j] = g[j] / denom - ga_dot / (denom * denom);
        } else {
          for (int64_t j = 0; j < k; ++j) gsel[j] = g[j];
        }
        std::fill(ga.begin(), ga.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j)
          if (id[j] >= 0) ga[id[j]] += gsel[j];
        if (score == ScoreFunc::Softmax) {
          acc_t dot = 0;
          for (int64_t e = 0; e < E; ++e) dot += ga[e] * a[e];
          for (int64_t e = 0; e < E; ++e) o[e] = a[e] * (ga[e] - dot);
        } else {
          for (int64_t e = 0; e < E; ++e) o[e] = ga[e] * a[e] * (1 - a[e]);
        }
      }
    });
  });
  return grad;
}

at::Tensor permute_tokens_cpu(const at::Tensor& x_in, const at::Tensor& sorted_slots, int64_t top_k) {
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(1), N = sorted_slots.size(0), T = x.size(0);
  at::Tensor out = at::empty({N, H}, x.options());
  const at::Tensor slots = sorted_slots.contiguous();
  const int64_t* s = slots.data_ptr<int64_t>();
  const size_t row = H * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t p = 0; p < N; ++p) {
    FASTNN_CHECK_ARG(s[p] >= 0 && s[p] / top_k < T, "sorted_slots",
                     "slot indices in [0, " + std::to_string(T * top_k) + ")",
                     std::to_string(s[p]) + " at position " + std::to_string(p));
  }
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) std::memcpy(dst + p * row, src + (s[p] / top_k) * row, row);
  });
  return out;
}

at::Tensor unpermute_tokens_cpu(const at::Tensor& y_in, const at::Tensor& slot_positions,
                                const at::Tensor& weights) {
  const at::Tensor y = y_in.contiguous();
  const at::Tensor pos_t = slot_positions.contiguous();
  const int64_t T = pos_t.size(0), k = pos_t.size(1), H = y.size(1), N = y.size(0);
  at::Tensor out = at::empty({T, H}, y.options());
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) {
    FASTNN_CHECK_ARG(pos[i] >= 0 && pos[i] < N, "slot_positions", "rows in [0, " + std::to_string(N) + ")",
                     std::to_string(pos[i]) + " at slot " + std::to_string(i));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_tokens_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_t = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* w = w_t.data_ptr<acc_t>();
    const scalar_t* src = y.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const acc_t wj = w[t * k + j];
          const scalar_t* row = src + pos[t * k + j] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) dst[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_tokens_backward_cpu(const at::Tensor& grad_out_in,
                                                                 const at::Tensor& y_in,
                                                                 const at::Tensor& slot_positions,
                                                                 const at::Tensor& weights,
                                                                 const at::Tensor& sorted_slots) {
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor pos_t = slot_positions.contiguous();
  const at::Tensor slots_t = sorted_slots.contiguous();
  const int64_t T = pos_t.size(0), k = pos_t.size(1), H = y.size(1), N = y.size(0);
  at::Tensor gy = at::empty_like(y);
  at::Tensor gw = at::empty({T, k}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_tokens_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_t = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor gw_acc = at::empty({T, k}, w_t.options());
    const acc_t* w = w_t.data_ptr<acc_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    const int64_t* slots = slots_t.data_ptr<int64_t>();
    scalar_t* gyp = gy.data_ptr<scalar_t>();
    acc_t* gwp = gw_acc.data_ptr<acc_t>();
    // d y[p] = w[slot] * d out[token of slot]
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t s = slots[p];
        const acc_t ws = w[s];
        const scalar_t* grow = gp + (s / k) * H;
        for (int64_t h = 0; h < H; ++h) gyp[p * H + h] = static_cast<scalar_t>(ws * static_cast<acc_t>(grow[h]));
      }
    });
    // d w[t, j] = <d out[t], y[pos[t, j]]>
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* yr = yp + pos[t * k + j] * H;
          acc_t dot = 0;
          for (int64_t h = 0; h < H; ++h) dot += static_cast<acc_t>(gp[t * H + h]) * static_cast<acc_t>(yr[h]);
          gwp[t * k + j] = dot;
        }
      }
    });
    gw.copy_(gw_acc);
  });
  return {gy, gw};
}

}  // namespace moe
}  // namespace fastnn

// CPU kernels of the optimizer steps: every parameter of the call is cut into chunks, and one
// at::parallel_for runs over all chunks of all tensors (not one parallel region per tensor),
// each chunk vectorised with at::vec and computed in opmath (float for bf16/fp16/fp32).
// Compiled once per instruction-set variant, in its namespace (cpu_isa.h); cpu_dispatch.cpp calls
// the active one through this file's table (optim.h, CpuKernels).
//
// Vector width: Lanes<T>::kWidth is one Vectorized<T> of elements (for bf16/fp16 one reduced vector,
// which converts to two float vectors: convert_to_float's halves), so 8 or 16 floats, 16 or 32
// bf16 in the default/avx2 and avx512 variants; the loops run whole vectors, then a scalar tail,
// and grad_norm's lane sums read V::size() lanes. No width is written down.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <tuple>

#include "cpu_isa.h"
#include "optim/math.h"
#include "optim/optim.h"

namespace fastnn {
namespace optim {
FASTNN_ISA_BEGIN
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;      // elements per work item
constexpr int64_t kGrainChunks = 4;    // at least 64K elements per thread

template <typename V>
struct VecOps {
  static V sqrt(V x) { return x.sqrt(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }  // propagates NaN, as torch.maximum
};

template <typename T>
struct ScalarOps {
  static T sqrt(T x) { return std::sqrt(x); }
  static T max(T a, T b) { return (a != a || a > b) ? a : b; }
};

// Loads and stores of one vector's worth of scalar_t as opmath vectors.
template <typename scalar_t>
struct Lanes {  // float and double: one vector of the same type
  using Vec = Vectorized<scalar_t>;
  static constexpr int kParts = 1;
  static constexpr int64_t kWidth = Vec::size();
  static void load(const scalar_t* p, Vec* v) { v[0] = Vec::loadu(p); }
  static void store(scalar_t* p, const Vec* v) { v[0].store(p); }
};

template <typename reduced_t>
struct ReducedLanes {  // bf16 and fp16: one vector of them is two float vectors
  using Vec = Vectorized<float>;
  static constexpr int kParts = 2;
  static constexpr int64_t kWidth = Vectorized<reduced_t>::size();
  static void load(const reduced_t* p, Vec* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<reduced_t>(Vectorized<reduced_t>::loadu(p));
  }
  static void store(reduced_t* p, const Vec* v) {
    at::vec::convert_from_float<reduced_t>(v[0], v[1]).store(p);
  }
};
template <>
struct Lanes<at::BFloat16> : ReducedLanes<at::BFloat16> {};
template <>
struct Lanes<at::Half> : ReducedLanes<at::Half> {};

struct Chunk {
  int32_t slot;
  int64_t begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<Slot>& slots) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t n = slots[i].param.numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({(int32_t)i, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// What every chunk of one slot needs besides its pointers.
struct GradPrep {
  bool unscale;       // divide by grad_scale and write the result back
  double grad_scale;
  double mult;        // clip_coef * (maximize ? -1 : 1), applied after unscaling
};

template <typename scalar_t>
struct Ptrs {
  scalar_t *p, *g, *m, *v, *x;
  explicit Ptrs(const Slot& s)
      : p(s.param.data_ptr<scalar_t>()),
        g(s.grad.data_ptr<scalar_t>()),
        m(s.exp_avg.defined() ? s.exp_avg.data_ptr<scalar_t>() : nullptr),
        v(s.exp_avg_sq.defined() ? s.exp_avg_sq.data_ptr<scalar_t>() : nullptr),
        x(s.max_exp_avg_sq.defined() ? s.max_exp_avg_sq.data_ptr<scalar_t>() : nullptr) {}
};

// prepare_grad (math.h) with the factors of one call in the math type T of a range.
template <typename T>
struct GradPrepIn {
  bool unscale, do_mult;
  T scale, mult;
  explicit GradPrepIn(const GradPrep& p)
      : unscale(p.unscale), do_mult(p.mult != 1.0), scale((T)p.grad_scale), mult((T)p.mult) {}
  template <typename G>
  G operator()(G& g) const { return prepare_grad(g, unscale, scale, do_mult, mult); }
};

// Runs vec(i) for each full vector of Lanes<scalar_t> in [begin, end), then one(i) for each
// element of the rest.
template <typename scalar_t, typename VecFn, typename OneFn>
void for_lanes(int64_t begin, int64_t end, const VecFn& vec, const OneFn& one) {
  constexpr int64_t width = Lanes<scalar_t>::kWidth;
  int64_t i = begin;
  for (; i + width <= end; i += width) vec(i);
  for (; i < end; ++i) one(i);
}

// The update of elements [begin, end) of one tensor (callers name scalar_t only; L and opmath_t
// are its vector lanes and math type).
template <typename scalar_t, typename L = Lanes<scalar_t>, typename opmath_t = at::opmath_type<scalar_t>>
void adam_range(const Slot& s, const AdamCoeffs<double>& cd, AdamFlags f, GradPrep prep,
                int64_t begin, int64_t end) {
  using V = typename L::Vec;
  const AdamCoeffs<opmath_t> c{(opmath_t)cd.lr,           (opmath_t)cd.beta1,
                               (opmath_t)cd.beta2,        (opmath_t)cd.one_minus_beta1,
                               (opmath_t)cd.one_minus_beta2, (opmath_t)cd.eps,
                               (opmath_t)cd.weight_decay, (opmath_t)cd.decay_factor,
                               (opmath_t)cd.step_size,    (opmath_t)cd.bias_correction2_sqrt};
  const GradPrepIn<opmath_t> grad_of(prep);
  Ptrs<scalar_t> ptr(s);
  for_lanes<scalar_t>(begin, end, [&](int64_t i) {
    V p[L::kParts], g[L::kParts], m[L::kParts], v[L::kParts], x[L::kParts];
    L::load(ptr.p + i, p);
    L::load(ptr.g + i, g);
    L::load(ptr.m + i, m);
    L::load(ptr.v + i, v);
    if (f.amsgrad) L::load(ptr.x + i, x);
    for (int k = 0; k < L::kParts; ++k) {
      const V gk = grad_of(g[k]);
      adam_update<V, VecOps<V>>(p[k], gk, m[k], v[k], x[k], c, f);
    }
    L::store(ptr.p + i, p);
    L::store(ptr.m + i, m);
    L::store(ptr.v + i, v);
    if (f.amsgrad) L::store(ptr.x + i, x);
    if (prep.unscale) L::store(ptr.g + i, g);
  }, [&](int64_t i) {
    opmath_t p = ptr.p[i], g = ptr.g[i], m = ptr.m[i], v = ptr.v[i];
    opmath_t x = f.amsgrad ? (opmath_t)ptr.x[i] : opmath_t(0);
    const opmath_t gk = grad_of(g);
    if (prep.unscale) ptr.g[i] = (scalar_t)g;
    adam_update<opmath_t, ScalarOps<opmath_t>>(p, gk, m, v, x, c, f);
    ptr.p[i] = (scalar_t)p;
    ptr.m[i] = (scalar_t)m;
    ptr.v[i] = (scalar_t)v;
    if (f.amsgrad) ptr.x[i] = (scalar_t)x;
  });
}

template <typename scalar_t, typename L = Lanes<scalar_t>, typename opmath_t = at::opmath_type<scalar_t>>
void sgd_range(const Slot& s, const SgdCoeffs<double>& cd, SgdFlags f, GradPrep prep,
               int64_t begin, int64_t end) {
  using V = typename L::Vec;
  const SgdCoeffs<opmath_t> c{(opmath_t)cd.lr, (opmath_t)cd.momentum,
                              (opmath_t)cd.one_minus_dampening, (opmath_t)cd.weight_decay};
  const GradPrepIn<opmath_t> grad_of(prep);
  Ptrs<scalar_t> ptr(s);
  for_lanes<scalar_t>(begin, end, [&](int64_t i) {
    V p[L::kParts], g[L::kParts], b[L::kParts];
    L::load(ptr.p + i, p);
    L::load(ptr.g + i, g);
    if (f.momentum && !f.first_step) L::load(ptr.m + i, b);
    for (int k = 0; k < L::kParts; ++k) {
      const V gk = grad_of(g[k]);
      sgd_update<V>(p[k], gk, b[k], c, f);
    }
    L::store(ptr.p + i, p);
    if (f.momentum) L::store(ptr.m + i, b);
    if (prep.unscale) L::store(ptr.g + i, g);
  }, [&](int64_t i) {
    opmath_t p = ptr.p[i], g = ptr.g[i];
    opmath_t b = (f.momentum && !f.first_step) ? (opmath_t)ptr.m[i] : opmath_t(0);
    const opmath_t gk = grad_of(g);
    if (prep.unscale) ptr.g[i] = (scalar_t)g;
    sgd_update<opmath_t>(p, gk, b, c, f);
    ptr.p[i] = (scalar_t)p;
    if (f.momentum) ptr.m[i] = (scalar_t)b;
  });
}

// max that propagates NaN, as torch's inf-norm does.
double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

double scalar_value(const at::Tensor& t, double otherwise) {
  return t.defined() ? t.item<double>() : otherwise;
}

template <typename F>
void for_each_chunk(const std::vector<Slot>& slots, const F& fn) {
  const std::vector<Chunk> chunks = make_chunks(slots);
  at::parallel_for(0, (int64_t)chunks.size(), kGrainChunks, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) fn(chunks[c]);
  });
}

void step_contiguous(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
                     const Scaling& scaling) {
  if (slots.empty() || scalar_value(scaling.found_inf, 0.0) != 0.0) return;
  const bool unscale = scaling.grad_scale.defined();
  const double grad_scale = scalar_value(scaling.grad_scale, 1.0);
  const double clip = scalar_value(scaling.clip_coef, 1.0);

  std::vector<double> lrs(groups.size());
  for (size_t gi = 0; gi < groups.size(); ++gi) lrs[gi] = scalar_value(groups[gi].lr_tensor, groups[gi].lr);

  if (kind == Kind::Adam) {
    std::vector<AdamCoeffs<double>> coeffs(slots.size());
    for (size_t i = 0; i < slots.size(); ++i) {
      const Group& g = groups[slots[i].group];
      float* step = slots[i].step.data_ptr<float>();
      *step += 1.0f;
      const double lr = lrs[slots[i].group];
      const double bc1 = 1.0 - std::pow(g.beta1, (double)*step);
      const double bc2 = 1.0 - std::pow(g.beta2, (double)*step);
      coeffs[i] = AdamCoeffs<double>{lr, g.beta1, g.beta2, 1.0 - g.beta1, 1.0 - g.beta2, g.eps,
                                     g.weight_decay, 1.0 - lr * g.weight_decay, lr / bc1,
                                     std::sqrt(bc2)};
    }
    for_each_chunk(slots, [&](const Chunk& ch) {
      const Slot& s = slots[ch.slot];
      const Group& g = groups[s.group];
      const AdamFlags f{g.amsgrad, g.decoupled, g.weight_decay != 0.0};
      const GradPrep prep{unscale, grad_scale, clip * (g.maximize ? -1.0 : 1.0)};
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.param.scalar_type(), "adam_cpu", [&] {
        adam_range<scalar_t>(s, coeffs[ch.slot], f, prep, ch.begin, ch.end);
      });
    });
  } else {
    for_each_chunk(slots, [&](const Chunk& ch) {
      const Slot& s = slots[ch.slot];
      const Group& g = groups[s.group];
      const SgdCoeffs<double> c{lrs[s.group], g.momentum, 1.0 - g.dampening, g.weight_decay};
      const SgdFlags f{g.momentum != 0.0, g.nesterov, g.weight_decay != 0.0, s.first_step};
      const GradPrep prep{unscale, grad_scale, clip * (g.maximize ? -1.0 : 1.0)};
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.param.scalar_type(), "sgd_cpu", [&] {
        sgd_range<scalar_t>(s, c, f, prep, ch.begin, ch.end);
      });
    });
  }
}

void step(Kind kind, std::vector<Slot>& slots, const std::vector<Group>& groups,
              const Scaling& scaling) {
  with_contiguous(slots, scaling.grad_scale.defined(),
                  [&](std::vector<Slot>& dense) { step_contiguous(kind, dense, groups, scaling); });
}

std::tuple<at::Tensor, at::Tensor> grad_norm(const std::vector<at::Tensor>& grads, double max_norm,
                                             double norm_type, const at::Tensor& grad_scale) {
  const bool inf_norm = std::isinf(norm_type);
  std::vector<Slot> slots(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) slots[i].param = grads[i].contiguous();
  const std::vector<Chunk> chunks = make_chunks(slots);
  // One partial result per chunk, combined in chunk order: the result does not depend on the
  // number of threads.
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, (int64_t)chunks.size(), kGrainChunks, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& g = slots[ch.slot].param;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "grad_norm_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        using L = Lanes<scalar_t>;
        using V = typename L::Vec;
        const scalar_t* ptr = g.data_ptr<scalar_t>();
        V acc[L::kParts];
        for (int k = 0; k < L::kParts; ++k) acc[k] = V(opmath_t(0));
        int64_t i = ch.begin;
        for (; i + L::kWidth <= ch.end; i += L::kWidth) {
          V x[L::kParts];
          L::load(ptr + i, x);
          for (int k = 0; k < L::kParts; ++k)
            acc[k] = inf_norm ? at::vec::maximum(acc[k], x[k].abs()) : at::vec::fmadd(x[k], x[k], acc[k]);
        }
        double r = 0.0;
        for (int k = 0; k < L::kParts; ++k) {
          opmath_t lanes[V::size()];
          acc[k].store(lanes);
          for (int j = 0; j < V::size(); ++j) r = inf_norm ? nan_max(r, (double)lanes[j]) : r + lanes[j];
        }
        for (; i < ch.end; ++i) {
          const double x = (double)(opmath_t)ptr[i];
          r = inf_norm ? nan_max(r, std::abs(x)) : r + x * x;
        }
        partial[c] = r;
      });
    }
  });
  double total = 0.0;
  for (double r : partial) total = inf_norm ? nan_max(total, r) : total + r;
  if (!inf_norm) total = std::sqrt(total);
  if (grad_scale.defined()) total /= grad_scale.item<double>();
  // NaN stays NaN, as torch.clamp(max_norm / (norm + 1e-6), max=1) in clip_grad_norm_: a NaN
  // gradient makes every clipped gradient NaN (std::min(1.0, NaN) would be 1).
  const double ratio = max_norm / (total + 1e-6);
  const double coef = std::isnan(ratio) ? ratio : std::min(1.0, ratio);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  return {at::scalar_tensor(total, opts), at::scalar_tensor(coef, opts)};
}

const CpuKernels kKernels{step, grad_norm};

}  // namespace

const CpuKernels& cpu_kernels() { return kKernels; }

FASTNN_ISA_END
}  // namespace optim
}  // namespace fastnn

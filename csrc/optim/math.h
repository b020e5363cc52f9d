// The element-wise math of fastnn's optimizer steps, written once for the CPU (at::vec vectors)
// and CUDA (scalars). `T` is the math type (float, double, or a Vectorized of them); `Ops`
// supplies sqrt and max for it. Mirrors torch.optim's single-tensor Adam/AdamW/SGD step order.
#pragma once

#include <c10/macros/Macros.h>

namespace fastnn {
namespace optim {

// The gradient as an update uses it: unscaled by grad_scale (that value is what the caller writes
// back into the gradient), then multiplied by clip_coef * (maximize ? -1 : 1) when that is not 1.
template <typename T, typename S>
C10_HOST_DEVICE inline T prepare_grad(T& g, bool unscale, S scale, bool do_mult, S mult) {
  if (unscale) g = g / T(scale);
  return do_mult ? g * T(mult) : g;
}

// Per-tensor coefficients, computed once per tensor (CPU) or per block (CUDA).
template <typename S>
struct AdamCoeffs {
  S lr;
  S beta1, beta2;
  S one_minus_beta1, one_minus_beta2;
  S eps;
  S weight_decay;
  S decay_factor;          // 1 - lr * weight_decay (decoupled)
  S step_size;             // lr / (1 - beta1^step)
  S bias_correction2_sqrt; // sqrt(1 - beta2^step)
};

struct AdamFlags {
  bool amsgrad;
  bool decoupled;
  bool weight_decay;
};

// g: the gradient as the update uses it, already unscaled, clipped and negated for maximize (the
// caller does that, since it also decides what is written back). Updates p, m, v (and vmax when
// amsgrad) in place, in torch's order of operations:
//   denom = sqrt(v) / sqrt(bias_correction2) + eps;  p += -step_size * (m / denom)
template <typename T, typename Ops, typename S>
C10_HOST_DEVICE inline void adam_update(T& p, T g, T& m, T& v, T& vmax, const AdamCoeffs<S>& c,
                                        AdamFlags f) {
  if (f.weight_decay) {
    if (f.decoupled) {
      p = p * T(c.decay_factor);
    } else {
      g = g + T(c.weight_decay) * p;
    }
  }
  // torch: exp_avg.lerp_(grad, w = 1 - beta1), in lerp's own two forms (they differ in rounding,
  // and for an infinite gradient: inf - (inf - m) * 0 is NaN where m + 1 * (inf - m) is inf).
  const S w = c.one_minus_beta1;
  m = w < S(0.5) ? m + T(w) * (g - m) : g - (g - m) * T(S(1) - w);
  v = v * T(c.beta2) + T(c.one_minus_beta2) * g * g;
  T denom;
  if (f.amsgrad) {
    vmax = Ops::max(vmax, v);
    denom = Ops::sqrt(vmax) / T(c.bias_correction2_sqrt) + T(c.eps);
  } else {
    denom = Ops::sqrt(v) / T(c.bias_correction2_sqrt) + T(c.eps);
  }
  p = p - T(c.step_size) * (m / denom);
}

template <typename S>
struct SgdCoeffs {
  S lr;
  S momentum;
  S one_minus_dampening;
  S weight_decay;
};

struct SgdFlags {
  bool momentum;
  bool nesterov;
  bool weight_decay;
  bool first_step;  // the momentum buffer is set to the gradient
};

template <typename T, typename S>
C10_HOST_DEVICE inline void sgd_update(T& p, T g, T& buf, const SgdCoeffs<S>& c, SgdFlags f) {
  if (f.weight_decay) g = g + T(c.weight_decay) * p;
  if (f.momentum) {
    buf = f.first_step ? g : buf * T(c.momentum) + T(c.one_minus_dampening) * g;
    g = f.nesterov ? g + T(c.momentum) * buf : buf;
  }
  p = p - T(c.lr) * g;
}

}  // namespace optim
}  // namespace fastnn

// The sequence driver of the recurrent ops, the same on every device: the GEMMs (ATen:
// MKL/OpenBLAS on the CPU, cuBLAS on the GPU), the choice of a forward strategy, and the time loop
// that calls the device's fused step kernel. See rnn.h for the algorithm and the buffer layout,
// rnn_checks.cpp for the argument checks.
#include "rnn/rnn.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "common.h"

#ifdef FASTNN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastnn {
namespace rnn {

const char* cell_name(Cell c) {
  switch (c) {
    case Cell::LSTM: return "LSTM";
    case Cell::GRU: return "GRU";
    case Cell::RNN_TANH: return "RNN (tanh)";
    default: return "RNN (relu)";
  }
}

namespace {

at::ScalarType math_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_math(const at::Tensor& t) {
  if (!t.defined()) return t;
  return t.to(math_type(t.scalar_type())).contiguous();
}

// The bias added to the input projection: b_ih + b_hh, except GRU's b_hn, which sits inside
// r * (W_hn h + b_hn) and is applied by the step kernel.
at::Tensor folded_bias(const SeqInputs& in, const at::Tensor& b_ih, const at::Tensor& b_hh, int64_t H) {
  if (!b_ih.defined() && !b_hh.defined()) return at::Tensor();
  at::Tensor b = b_ih.defined() ? b_ih.clone() : at::zeros_like(b_hh);
  if (b_hh.defined()) {
    if (in.cell == Cell::GRU) {
      b.narrow(0, 0, 2 * H).add_(b_hh.narrow(0, 0, 2 * H));
    } else {
      b.add_(b_hh);
    }
  }
  return b;
}

// Rows still inside their sequence at step t, as a [B, 1] bool mask (undefined: all rows).
at::Tensor active_rows(const at::Tensor& lengths, int64_t t) {
  if (!lengths.defined()) return at::Tensor();
  return lengths.gt(t).unsqueeze(1);
}

template <typename T>
void run_step_forward(const FwdStep<T>& s, bool cuda) {
#ifdef FASTNN_WITH_CUDA
  if (cuda) return step_forward_cuda<T>(s);
#endif
  TORCH_INTERNAL_ASSERT(!cuda, "fastnn: built without CUDA kernels");
  step_forward_cpu<T>(s);
}

template <typename T>
void run_step_backward(const BwdStep<T>& s, bool cuda) {
#ifdef FASTNN_WITH_CUDA
  if (cuda) return step_backward_cuda<T>(s);
#endif
  TORCH_INTERNAL_ASSERT(!cuda, "fastnn: built without CUDA kernels");
  step_backward_cpu<T>(s);
}

struct Dims {
  int64_t T, B, I, H, P, G, WS;
};

Dims dims_of(const SeqInputs& in) {
  Dims d;
  d.T = in.input.size(0);
  d.B = in.input.size(1);
  d.I = in.input.size(2);
  const int64_t gates = num_gates(in.cell);
  d.G = in.w_hh.size(0);
  d.H = d.G / gates;
  d.P = in.w_hr.defined() ? in.w_hr.size(0) : d.H;
  d.WS = ws_width(in.cell, d.H);
  return d;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What every forward strategy works on: the inputs in the math dtype (contiguous), and the buffers
// it fills. h and c are fresh copies of the initial states, updated in place, so that no output
// aliases an input.
struct Forward {
  const SeqInputs& in;
  Dims d;
  bool cuda, proj;
  at::Tensor x, w_ih, w_hh, b_ih, b_hh, w_hr, mask, lengths;
  at::Tensor h, c, out, ws;
  at::Tensor gi;    // [T*B, G] the input projection of every step
  at::Tensor b_hn;  // GRU: the part of b_hh inside r * (W_hn h + b_hn), or undefined

  explicit Forward(const SeqInputs& s) : in(s), d(dims_of(s)), cuda(s.input.is_cuda()), proj(s.w_hr.defined()) {
    x = to_math(s.input);
    w_ih = to_math(s.w_ih);
    w_hh = to_math(s.w_hh);
    b_ih = to_math(s.b_ih);
    b_hh = to_math(s.b_hh);
    w_hr = to_math(s.w_hr);
    mask = to_math(s.h_mask);
    lengths = s.lengths.defined() ? s.lengths.contiguous() : at::Tensor();
    const auto opts = x.options();
    h = s.h0.to(opts.dtype(), /*non_blocking=*/false, /*copy=*/true).contiguous();
    c = s.cell == Cell::LSTM ? s.c0.to(opts.dtype(), false, true).contiguous() : at::Tensor();
    out = at::empty({d.T, d.B, d.P}, opts);
    ws = at::empty({d.T, d.B, d.WS}, opts);
    if (s.cell == Cell::GRU && b_hh.defined()) b_hn = b_hh.narrow(0, 2 * d.H, d.H).contiguous();
  }

  // The one epilogue: the buffers (or their casts) in the input's dtype; the workspace stays in
  // the math dtype.
  Outputs finish() const {
    const auto dtype = in.input.scalar_type();
    return {out.to(dtype), h.to(dtype), c.defined() ? c.to(dtype) : at::Tensor(), ws};
  }
};

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Strategy 1 (CPU, float32, no projection): the packed recurrence (packed_cpu.cpp). It adds the
// biases in its pointwise step, so the projection is a plain GEMM; one or two input rows (a
// streaming step) take matrix-vector products instead. At batch 1 it repacks nothing, so it serves
// any length; above batch 1 it repacks W_hh on every call, worth it over a few steps, not for one.
bool packed_fits(const Forward& f) {
  return !f.cuda && !f.proj && f.x.scalar_type() == at::kFloat && (f.d.T >= 4 || f.d.B == 1);
}

Outputs forward_packed_cpu(Forward& f, const at::Tensor& bias) {
  const Dims& d = f.d;
  const at::Tensor x2 = f.x.view({d.T * d.B, d.I});
  if (d.T * d.B <= 2) {
    f.gi = at::empty({d.T * d.B, d.G}, f.x.options());
    for (int64_t r = 0; r < d.T * d.B; ++r) {  // x and w_ih are contiguous (to_math)
      matvec_cpu(ptr<float>(f.w_ih), d.G, d.I, ptr<float>(x2) + r * d.I, ptr<float>(f.gi) + r * d.G);
    }
  } else {
    f.gi = at::mm(x2, f.w_ih.t());
  }
  const at::Tensor gi_bias = bias.defined() ? bias.contiguous() : at::Tensor();
  PackedForward p{f.in.cell,        d.T,           d.B,           d.H,           f.in.reverse,
                  ptr<float>(f.gi), ptr<float>(gi_bias),          ptr<float>(f.w_hh), ptr<float>(f.b_hn),
                  ptr<float>(f.mask), ptr<int64_t>(f.lengths),   ptr<float>(f.h), ptr<float>(f.c),
                  ptr<float>(f.out), ptr<float>(f.ws)};
  packed_forward_cpu(p);
  return f.finish();
}

// Strategy 2 (CUDA, float32, no projection, no mask), opt-in: the persistent kernel, the whole
// sequence in one cooperative launch. It has not been measured faster than strategy 3 on a GPU, so
// it runs only when FASTNN_RNN_PERSISTENT=1 (the GPU benchmarks time it beside the default).
// Returns false when it does not apply or the sequence does not fit (then strategy 3 runs).
bool persistent_requested() {
  const char* v = std::getenv("FASTNN_RNN_PERSISTENT");
  return v != nullptr && std::string(v) == "1";
}

bool forward_persistent_cuda(Forward& f) {
#ifdef FASTNN_WITH_CUDA
  const Dims& d = f.d;
  if (!f.cuda || f.proj || f.mask.defined() || f.x.scalar_type() != at::kFloat || !persistent_requested()) {
    return false;
  }
  // hbuf [2, B, H]: h0 then the double buffer; the final state is in half T % 2
  at::Tensor hbuf = at::empty({2, d.B, d.H}, f.x.options());
  hbuf.select(0, 0).copy_(f.h);
  at::Tensor barrier = at::zeros({2}, f.x.options().dtype(at::kInt));
  FwdStep<float> s{f.in.cell, d.B, d.H, d.P, ptr<float>(f.gi), nullptr, ptr<float>(f.b_hn), nullptr, nullptr,
                   ptr<float>(f.c), ptr<float>(f.out), ptr<float>(f.ws), nullptr, ptr<int64_t>(f.lengths), 0};
  if (!persistent_forward_cuda(s, ptr<float>(f.w_hh), ptr<float>(hbuf), d.T, f.in.reverse,
                               (unsigned*)barrier.data_ptr<int>())) {
    return false;
  }
  f.h.copy_(hbuf.select(0, d.T % 2));
  return true;
#else
  (void)f;
  return false;
#endif
}

// Strategy 3 (any device and dtype): per step the recurrent GEMM (ATen), then the device's fused
// pointwise step kernel; with a projection, its GEMM and the state update after it.
template <typename T>
Outputs forward_steps(Forward& f) {
  const Dims& d = f.d;
  const auto opts = f.x.options();
  const at::Tensor w_hh_t = f.w_hh.t();
  at::Tensor gh = at::empty({d.B, d.G}, opts);
  at::Tensor hm = f.mask.defined() ? at::empty_like(f.h) : at::Tensor();
  at::Tensor hpre = f.proj ? at::zeros({d.B, d.H}, opts) : at::Tensor();
  at::Tensor hp = f.proj ? at::empty({d.B, d.P}, opts) : at::Tensor();
  FwdStep<T> s{f.in.cell, d.B, d.H, d.P, nullptr, ptr<T>(gh), ptr<T>(f.b_hn), ptr<T>(f.h), nullptr, ptr<T>(f.c),
               nullptr, nullptr, ptr<T>(hpre), ptr<int64_t>(f.lengths), 0};
  for (int64_t step = 0; step < d.T; ++step) {
    const int64_t t = f.in.reverse ? d.T - 1 - step : step;
    if (f.mask.defined()) {
      at::mul_out(hm, f.h, f.mask);
      at::mm_out(gh, hm, w_hh_t);
    } else {
      at::mm_out(gh, f.h, w_hh_t);
    }
    s.gi = ptr<T>(f.gi) + t * d.B * d.G;
    s.out = ptr<T>(f.out) + t * d.B * d.P;
    s.ws = ptr<T>(f.ws) + t * d.B * d.WS;
    s.t = t;
    run_step_forward<T>(s, f.cuda);
    if (f.proj) {
      at::mm_out(hp, hpre, f.w_hr.t());
      at::Tensor out_t = f.out.select(0, t);
      const at::Tensor active = active_rows(f.lengths, t);
      if (active.defined()) {
        f.h.copy_(at::where(active, hp, f.h));
        out_t.copy_(at::where(active, hp, at::zeros_like(hp)));
      } else {
        f.h.copy_(hp);
        out_t.copy_(hp);
      }
    }
  }
  return f.finish();
}

template <typename T>
Outputs forward_impl(const SeqInputs& in) {
  Forward f(in);
  const Dims& d = f.d;
  if (d.T == 0 || d.B == 0) {
    f.ws.zero_();
    return f.finish();
  }
  const at::Tensor bias = folded_bias(in, f.b_ih, f.b_hh, d.H);
  if constexpr (std::is_same<T, float>::value) {
    if (packed_fits(f)) return forward_packed_cpu(f, bias);
  }
  // The input projection of every step in one GEMM, the biases folded in.
  const at::Tensor x2 = f.x.view({d.T * d.B, d.I});
  f.gi = bias.defined() ? at::addmm(bias, x2, f.w_ih.t()) : at::mm(x2, f.w_ih.t());
  if constexpr (std::is_same<T, float>::value) {
    if (forward_persistent_cuda(f)) return f.finish();
  }
  return forward_steps<T>(f);
}

// The state before each step (unmasked), [T, B, W], from the outputs/workspace and the initial
// state: the previous step's value where that step belonged to the sequence, else the initial
// state (only the reverse direction can start mid-buffer, at step lengths[b]-1).
at::Tensor previous_states(const at::Tensor& per_step, const at::Tensor& init, const at::Tensor& lengths,
                           bool reverse) {
  const int64_t T = per_step.size(0);
  at::Tensor first = init.unsqueeze(0);
  if (!reverse) return at::cat({first, per_step.narrow(0, 0, T - 1)}, 0);
  at::Tensor prev = at::cat({per_step.narrow(0, 1, T - 1), first}, 0);
  if (lengths.defined()) {
    // step t's predecessor is t+1, inside the sequence iff t+1 < lengths[b]
    at::Tensor steps = at::arange(1, T + 1, lengths.options()).unsqueeze(1);  // [T, 1]
    at::Tensor inside = steps.lt(lengths.unsqueeze(0)).unsqueeze(2);         // [T, B, 1]
    prev = at::where(inside, prev, first.expand_as(prev));
  }
  return prev;
}

template <typename T>
std::array<at::Tensor, 8> backward_impl(const SeqInputs& in, const at::Tensor& grad_output,
                                        const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                        const at::Tensor& output, const at::Tensor& workspace,
                                        const std::array<bool, 8>& need) {
  const Dims d = dims_of(in);
  const bool cuda = in.input.is_cuda();
  const bool lstm = in.cell == Cell::LSTM, gru = in.cell == Cell::GRU;
  const bool proj = in.w_hr.defined();
  const at::Tensor w_ih = to_math(in.w_ih), w_hh = to_math(in.w_hh), w_hr = to_math(in.w_hr);
  const at::Tensor mask = to_math(in.h_mask);
  const at::Tensor lengths = in.lengths.defined() ? in.lengths.contiguous() : at::Tensor();
  const at::Tensor ws = workspace.contiguous();
  const auto opts = ws.options();

  at::Tensor dh = grad_h_n.defined() ? grad_h_n.to(opts.dtype(), false, true).contiguous()
                                     : at::zeros({d.B, d.P}, opts);
  at::Tensor dc;
  if (lstm) {
    dc = grad_c_n.defined() ? grad_c_n.to(opts.dtype(), false, true).contiguous()
                            : at::zeros({d.B, d.H}, opts);
  }
  // every row of every step is written by the step kernel (zeros for padding)
  at::Tensor dgi = at::empty({d.T, d.B, d.G}, opts);
  at::Tensor dgh = gru ? at::empty({d.T, d.B, d.G}, opts) : dgi;

  at::Tensor h_prev, c_prev, dhp_all, out_m;
  if (d.T > 0 && d.B > 0) {
    out_m = to_math(output);
    const at::Tensor gout = grad_output.defined() ? to_math(grad_output) : at::Tensor();
    h_prev = previous_states(out_m, to_math(in.h0), lengths, in.reverse).contiguous();
    if (lstm) {
      c_prev = previous_states(ws.narrow(2, 4 * d.H, d.H), to_math(in.c0), lengths, in.reverse)
                   .contiguous();
    }
    at::Tensor dhpre = proj ? at::empty({d.B, d.H}, opts) : at::Tensor();
    if (proj) dhp_all = at::zeros({d.T, d.B, d.P}, opts);
    at::Tensor tmp = mask.defined() ? at::empty({d.B, d.P}, opts) : at::Tensor();

    BwdStep<T> s{in.cell, d.B, d.H, d.P, nullptr, nullptr, nullptr, nullptr, nullptr,
                 proj ? dhpre.data_ptr<T>() : dh.data_ptr<T>(), proj,
                 lstm ? dc.data_ptr<T>() : nullptr, nullptr, nullptr,
                 lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, 0};
    for (int64_t step = d.T - 1; step >= 0; --step) {
      const int64_t t = in.reverse ? d.T - 1 - step : step;
      const at::Tensor active = active_rows(lengths, t);
      if (proj) {
        // h = W_hr (o*tanh c): the gradient of h (from later steps and the output) goes through
        // the projection first; padding rows take none and keep theirs.
        at::Tensor dhp = gout.defined() ? dh + gout.select(0, t) : dh.clone();
        if (active.defined()) dhp = at::where(active, dhp, at::zeros_like(dhp));
        dhp_all.select(0, t).copy_(dhp);
        at::mm_out(dhpre, dhp, w_hr);
      }
      s.ws = ws.data_ptr<T>() + t * d.B * d.WS;
      s.c_prev = lstm ? c_prev.data_ptr<T>() + t * d.B * d.H : nullptr;
      s.h_prev = h_prev.data_ptr<T>() + t * d.B * d.P;
      s.out = out_m.data_ptr<T>() + t * d.B * d.P;
      s.grad_out = (!proj && gout.defined()) ? gout.data_ptr<T>() + t * d.B * d.P : nullptr;
      s.dgi = dgi.data_ptr<T>() + t * d.B * d.G;
      s.dgh = dgh.data_ptr<T>() + t * d.B * d.G;
      s.t = t;
      run_step_backward<T>(s, cuda);
      if (proj) {
        // active rows: h's gradient has been consumed; padding rows keep theirs
        if (active.defined()) {
          dh.copy_(at::where(active, at::zeros_like(dh), dh));
        } else {
          dh.zero_();
        }
      }
      // the part of the previous h's gradient that goes through W_hh (zero for padding rows,
      // whose gate gradients are zero)
      const at::Tensor dgh_t = dgh.select(0, t);
      if (mask.defined()) {
        at::mm_out(tmp, dgh_t, w_hh);
        dh.addcmul_(tmp, mask);
      } else {
        dh.addmm_(dgh_t, w_hh);
      }
    }
  }

  const auto dtype = in.input.scalar_type();
  auto empty = [&]() { return at::empty({0}, in.input.options()); };
  std::array<at::Tensor, 8> g;
  const at::Tensor dgi2 = dgi.view({d.T * d.B, d.G});
  const at::Tensor dgh2 = dgh.view({d.T * d.B, d.G});
  g[0] = need[0] ? at::mm(dgi2, w_ih).view({d.T, d.B, d.I}).to(dtype) : empty();
  g[1] = need[1] ? dh.to(dtype) : empty();
  g[2] = (need[2] && lstm) ? dc.to(dtype) : empty();
  if (need[3]) {
    g[3] = at::mm(dgi2.t(), to_math(in.input).view({d.T * d.B, d.I})).to(dtype);
  } else {
    g[3] = empty();
  }
  if (need[4]) {
    if (d.T > 0 && d.B > 0) {
      at::Tensor hin = mask.defined() ? h_prev * mask.unsqueeze(0) : h_prev;
      g[4] = at::mm(dgh2.t(), hin.view({d.T * d.B, d.P})).to(dtype);
    } else {
      g[4] = at::zeros(in.w_hh.sizes(), in.w_hh.options());
    }
  } else {
    g[4] = empty();
  }
  g[5] = (need[5] && in.b_ih.defined()) ? dgi2.sum(0).to(dtype) : empty();
  if (need[6] && in.b_hh.defined()) {
    // LSTM and plain RNN: both biases have the same gradient (dgh is dgi); sum it once
    g[6] = (dgh.is_same(dgi) && g[5].defined() && g[5].numel() > 0) ? g[5].clone() : dgh2.sum(0).to(dtype);
  } else {
    g[6] = empty();
  }
  if (need[7] && proj) {
    if (d.T > 0 && d.B > 0) {
      // o * tanh(c) of every step, from the workspace (zero on padding rows)
      at::Tensor hpre = ws.narrow(2, 3 * d.H, d.H) * ws.narrow(2, 4 * d.H, d.H).tanh();
      g[7] = at::mm(dhp_all.view({d.T * d.B, d.P}).t(), hpre.reshape({d.T * d.B, d.H})).to(dtype);
    } else {
      g[7] = at::zeros(in.w_hr.sizes(), in.w_hr.options());
    }
  } else {
    g[7] = empty();
  }
  return g;
}

}  // namespace

// Custom-op kernels get no device guard of their own: without one, a CUDA input on another device
// than the current one would have its kernels (and the persistent kernel's occupancy query) run
// on the current device and stream.
#ifdef FASTNN_WITH_CUDA
#define FASTNN_RNN_DEVICE_GUARD(input) \
  const c10::cuda::OptionalCUDAGuard device_guard_( \
      (input).is_cuda() ? c10::optional<c10::Device>((input).device()) : c10::nullopt)
#else
#define FASTNN_RNN_DEVICE_GUARD(input) (void)0
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seq_forward(const SeqInputs& in) {
  validate(in);
  FASTNN_RNN_DEVICE_GUARD(in.input);
  // The kernel computes what autograd would: it must not record the GEMMs it runs (autograd for
  // the op is registered in Python, around the whole kernel).
  at::NoGradGuard no_grad;
  // Nor may autocast recast them: the op (called under torch.autocast) does its math in its own
  // math dtype, and an autocast GEMM into a float32 buffer fails.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (in.input.scalar_type() == at::kDouble) return forward_impl<double>(in);
  return forward_impl<float>(in);
}

std::array<at::Tensor, 8> seq_backward(const SeqInputs& in, const at::Tensor& grad_output,
                                       const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                       const at::Tensor& output, const at::Tensor& workspace,
                                       const std::array<bool, 8>& need) {
  validate(in);
  FASTNN_RNN_DEVICE_GUARD(in.input);
  at::NoGradGuard no_grad;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  validate_backward(in, grad_output, grad_h_n, grad_c_n, output, workspace);
  const auto dt = in.input.scalar_type();
  if (dt == at::kDouble) return backward_impl<double>(in, grad_output, grad_h_n, grad_c_n, output, workspace, need);
  return backward_impl<float>(in, grad_output, grad_h_n, grad_c_n, output, workspace, need);
}

}  // namespace rnn
}  // namespace fastnn

// The sequence driver of the recurrent ops, the same on every device: argument checks, the GEMMs
// (ATen: MKL/OpenBLAS on the CPU, cuBLAS on the GPU) and the time loop that calls the device's
// fused step kernel. See rnn.h for the algorithm and the buffer layout.
#include "rnn/rnn.h"

#include <ATen/core/grad_mode.h>

#include <type_traits>

#include "common.h"

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

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

std::string shape_str(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    s += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return s + "]";
}

void check_tensor(const SeqInputs& in, const at::Tensor& t, const char* name,
                  std::initializer_list<int64_t> shape) {
  const std::string arg = in.op + ": " + name;
  FASTNN_CHECK_ARG(t.sizes().equals(shape), arg, "a tensor of shape " + shape_str(shape),
                   describe(t));
  FASTNN_CHECK_ARG(t.scalar_type() == in.input.scalar_type() && t.device() == in.input.device(), arg,
                   std::string("the dtype and device of 'input' (") +
                       c10::toString(in.input.scalar_type()) + ", " + in.input.device().str() + ")",
                   describe(t));
}

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

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const SeqInputs& in) {
  const Dims d = dims_of(in);
  const bool cuda = in.input.is_cuda();
  const bool proj = in.w_hr.defined();
  const at::Tensor x = to_math(in.input), w_ih = to_math(in.w_ih), w_hh = to_math(in.w_hh);
  const at::Tensor b_ih = to_math(in.b_ih), b_hh = to_math(in.b_hh), w_hr = to_math(in.w_hr);
  const at::Tensor mask = to_math(in.h_mask);
  const at::Tensor lengths = in.lengths.defined() ? in.lengths.contiguous() : at::Tensor();
  const auto opts = x.options();

  // Buffers we update in place; fresh tensors, so that no output aliases an input.
  at::Tensor h = in.h0.to(opts.dtype(), /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor c = in.cell == Cell::LSTM
                     ? in.c0.to(opts.dtype(), false, true).contiguous()
                     : at::Tensor();
  at::Tensor out = at::empty({d.T, d.B, d.P}, opts);
  at::Tensor ws = at::empty({d.T, d.B, d.WS}, opts);

  if (d.T > 0 && d.B > 0) {
    // 1. The input projection of every step in one GEMM.
    const at::Tensor bias = folded_bias(in, b_ih, b_hh, d.H);
    const at::Tensor x2 = x.view({d.T * d.B, d.I});
    // The packed path (see below) adds the biases in its pointwise step instead of in the GEMM.
    // At batch 1 it repacks nothing, so it serves any length.
    const bool packed = !cuda && !proj && std::is_same<T, float>::value && (d.T >= 4 || d.B == 1);
    at::Tensor gi;
    if (packed && d.T * d.B <= 2) {
      // one or two input rows (a streaming step): matrix-vector products, not a GEMM
      gi = at::empty({d.T * d.B, d.G}, opts);
      for (int64_t r = 0; r < d.T * d.B; ++r) {  // x and w_ih are contiguous (to_math)
        matvec_cpu((const float*)w_ih.data_ptr<T>(), d.G, d.I, (const float*)x2.data_ptr<T>() + r * d.I,
                   (float*)gi.data_ptr<T>() + r * d.G);
      }
    } else {
      gi = (bias.defined() && !packed) ? at::addmm(bias, x2, w_ih.t()) : at::mm(x2, w_ih.t());
    }
    const at::Tensor b_hn =
        (in.cell == Cell::GRU && b_hh.defined()) ? b_hh.narrow(0, 2 * d.H, d.H).contiguous()
                                                 : at::Tensor();
    const at::Tensor w_hh_t = w_hh.t();
    at::Tensor gh = at::empty({d.B, d.G}, opts);
    at::Tensor hm = mask.defined() ? at::empty_like(h) : at::Tensor();
    at::Tensor hpre = proj ? at::zeros({d.B, d.H}, opts) : at::Tensor();
    at::Tensor hp = proj ? at::empty({d.B, d.P}, opts) : at::Tensor();

    // The packed path repacks W_hh on every call above batch 1: worth it over a few steps, not for
    // one (such a call runs the GEMM + step kernel below).
    if (packed) {
      const at::Tensor gi_bias = bias.defined() ? bias.contiguous() : at::Tensor();
      PackedForward f{in.cell, d.T, d.B, d.H, in.reverse, (const float*)gi.data_ptr<T>(),
                      gi_bias.defined() ? (const float*)gi_bias.data_ptr<T>() : nullptr,
                      (const float*)w_hh.data_ptr<T>(),
                      b_hn.defined() ? (const float*)b_hn.data_ptr<T>() : nullptr,
                      mask.defined() ? (const float*)mask.data_ptr<T>() : nullptr,
                      lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, (float*)h.data_ptr<T>(),
                      c.defined() ? (float*)c.data_ptr<T>() : nullptr, (float*)out.data_ptr<T>(),
                      (float*)ws.data_ptr<T>()};
      packed_forward_cpu(f);
      const auto dtype = in.input.scalar_type();
      return {out.to(dtype), h.to(dtype), c.defined() ? c.to(dtype) : at::Tensor(), ws};
    }
#ifdef FASTNN_WITH_CUDA
    if (cuda && !proj && !mask.defined() && std::is_same<T, float>::value) {
      // hbuf [2, B, H]: h0 then the double buffer; the final state is in half T % 2
      at::Tensor hbuf = at::empty({2, d.B, d.H}, opts);
      hbuf.select(0, 0).copy_(h);
      at::Tensor barrier = at::zeros({2}, opts.dtype(at::kInt));
      FwdStep<float> s{in.cell, d.B, d.H, d.P, (const float*)gi.data_ptr<T>(), nullptr,
                       b_hn.defined() ? (const float*)b_hn.data_ptr<T>() : nullptr, nullptr, nullptr,
                       c.defined() ? (float*)c.data_ptr<T>() : nullptr, (float*)out.data_ptr<T>(),
                       (float*)ws.data_ptr<T>(), nullptr,
                       lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, 0};
      if (persistent_forward_cuda(s, (const float*)w_hh.data_ptr<T>(), (float*)hbuf.data_ptr<T>(), d.T,
                                  in.reverse, (unsigned*)barrier.data_ptr<int>())) {
        h.copy_(hbuf.select(0, d.T % 2));
        const auto dtype = in.input.scalar_type();
        return {out.to(dtype), h.to(dtype), c.defined() ? c.to(dtype) : at::Tensor(), ws};
      }
    }
#endif
    FwdStep<T> s{in.cell, d.B, d.H, d.P, nullptr, gh.data_ptr<T>(),
                 b_hn.defined() ? b_hn.data_ptr<T>() : nullptr, h.data_ptr<T>(), nullptr,
                 c.defined() ? c.data_ptr<T>() : nullptr, nullptr, nullptr,
                 proj ? hpre.data_ptr<T>() : nullptr,
                 lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr, 0};
    for (int64_t step = 0; step < d.T; ++step) {
      const int64_t t = in.reverse ? d.T - 1 - step : step;
      // 2. The recurrent product, then the fused pointwise step.
      if (mask.defined()) {
        at::mul_out(hm, h, mask);
        at::mm_out(gh, hm, w_hh_t);
      } else {
        at::mm_out(gh, h, w_hh_t);
      }
      s.gi = gi.data_ptr<T>() + t * d.B * d.G;
      s.out = out.data_ptr<T>() + t * d.B * d.P;
      s.ws = ws.data_ptr<T>() + t * d.B * d.WS;
      s.t = t;
      run_step_forward<T>(s, cuda);
      if (proj) {
        at::mm_out(hp, hpre, w_hr.t());
        at::Tensor out_t = out.select(0, t);
        const at::Tensor active = active_rows(lengths, t);
        if (active.defined()) {
          h.copy_(at::where(active, hp, h));
          out_t.copy_(at::where(active, hp, at::zeros_like(hp)));
        } else {
          h.copy_(hp);
          out_t.copy_(hp);
        }
      }
    }
  } else {
    ws.zero_();
  }
  const auto dtype = in.input.scalar_type();
  // h and c are this call's own buffers, so returning them (or their casts) aliases no input
  at::Tensor c_n = c.defined() ? c.to(dtype) : at::Tensor();
  return {out.to(dtype), h.to(dtype), c_n, ws};
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

void validate(const SeqInputs& in) {
  const at::Tensor& x = in.input;
  FASTNN_CHECK_ARG(x.dim() == 3, in.op + ": input", "a 3-D tensor [T, B, input_size]", describe(x));
  FASTNN_CHECK_ARG(float_dtype(x.scalar_type()), in.op + ": input",
                   "a float32, float64, bfloat16 or float16 tensor", describe(x));
  const int64_t gates = num_gates(in.cell);
  FASTNN_CHECK_ARG(in.w_hh.dim() == 2 && in.w_hh.size(0) % gates == 0 && in.w_hh.size(0) > 0,
                   in.op + ": w_hh", "a 2-D tensor [" + std::to_string(gates) + "*hidden_size, P]",
                   describe(in.w_hh));
  const int64_t G = in.w_hh.size(0), H = G / gates, B = x.size(1), I = x.size(2);
  if (in.w_hr.defined()) {
    FASTNN_CHECK_ARG(in.cell == Cell::LSTM, in.op + ": w_hr", "None (projections are LSTM-only)",
                     describe(in.w_hr));
    FASTNN_CHECK_ARG(in.w_hr.dim() == 2 && in.w_hr.size(1) == H && in.w_hr.size(0) > 0 &&
                         in.w_hr.size(0) < H,
                     in.op + ": w_hr", "a tensor [proj_size, " + std::to_string(H) + "] with 0 < proj_size < hidden_size",
                     describe(in.w_hr));
  }
  const int64_t P = in.w_hr.defined() ? in.w_hr.size(0) : H;
  check_tensor(in, in.w_ih, "w_ih", {G, I});
  check_tensor(in, in.w_hh, "w_hh", {G, P});
  if (in.b_ih.defined()) check_tensor(in, in.b_ih, "b_ih", {G});
  if (in.b_hh.defined()) check_tensor(in, in.b_hh, "b_hh", {G});
  if (in.w_hr.defined()) check_tensor(in, in.w_hr, "w_hr", {P, H});
  check_tensor(in, in.h0, in.cell == Cell::LSTM ? "h0" : "h0", {B, P});
  if (in.cell == Cell::LSTM) check_tensor(in, in.c0, "c0", {B, H});
  if (in.h_mask.defined()) check_tensor(in, in.h_mask, "h_mask", {B, P});
  if (in.lengths.defined()) {
    FASTNN_CHECK_ARG(in.lengths.dim() == 1 && in.lengths.size(0) == B &&
                         in.lengths.scalar_type() == at::kLong && in.lengths.device() == x.device(),
                     in.op + ": lengths",
                     "an int64 tensor of shape [" + std::to_string(B) + "] on " + x.device().str(),
                     describe(in.lengths));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seq_forward(const SeqInputs& in) {
  validate(in);
  // The kernel computes what autograd would: it must not record the GEMMs it runs (autograd for
  // the op is registered in Python, around the whole kernel).
  at::NoGradGuard no_grad;
  if (in.input.scalar_type() == at::kDouble) return forward_impl<double>(in);
  return forward_impl<float>(in);
}

std::array<at::Tensor, 8> seq_backward(const SeqInputs& in, const at::Tensor& grad_output,
                                       const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                       const at::Tensor& output, const at::Tensor& workspace,
                                       const std::array<bool, 8>& need) {
  validate(in);
  at::NoGradGuard no_grad;
  const Dims d = dims_of(in);
  auto check = [&](const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                   at::ScalarType dtype) {
    if (!t.defined()) return;
    const std::string arg = in.op + "_backward: " + name;
    FASTNN_CHECK_ARG(t.sizes().equals(shape) && t.scalar_type() == dtype &&
                         t.device() == in.input.device(),
                     arg, "a " + std::string(c10::toString(dtype)) + " tensor of shape " +
                              shape_str(shape) + " on " + in.input.device().str(),
                     describe(t));
  };
  const auto dt = in.input.scalar_type();
  check(grad_output, "grad_output", {d.T, d.B, d.P}, dt);
  check(grad_h_n, "grad_h_n", {d.B, d.P}, dt);
  if (in.cell == Cell::LSTM) check(grad_c_n, "grad_c_n", {d.B, d.H}, dt);
  check(output, "output", {d.T, d.B, d.P}, dt);
  check(workspace, "workspace", {d.T, d.B, d.WS}, math_type(dt));
  if (dt == at::kDouble) return backward_impl<double>(in, grad_output, grad_h_n, grad_c_n, output, workspace, need);
  return backward_impl<float>(in, grad_output, grad_h_n, grad_c_n, output, workspace, need);
}

}  // namespace rnn
}  // namespace fastnn

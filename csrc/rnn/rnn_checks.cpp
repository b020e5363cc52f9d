// The compiled recurrent ops' own argument checks (see rnn.h, validate): shapes, dtypes and devices
// of every tensor a kernel indexes, in the error form of fastnn/_checks.py.
#include <string>

#include "common.h"
#include "rnn/rnn.h"

namespace fastnn {
namespace rnn {
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

int64_t hidden_of(const SeqInputs& in) { return in.w_hh.size(0) / num_gates(in.cell); }

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
  check_tensor(in, in.h0, "h0", {B, P});
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

void validate_backward(const SeqInputs& in, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                       const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& workspace) {
  const int64_t T = in.input.size(0), B = in.input.size(1), H = hidden_of(in);
  const int64_t P = in.w_hr.defined() ? in.w_hr.size(0) : H, WS = ws_width(in.cell, H);
  const auto dt = in.input.scalar_type();
  const auto math = dt == at::kDouble ? at::kDouble : at::kFloat;
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
  check(grad_output, "grad_output", {T, B, P}, dt);
  check(grad_h_n, "grad_h_n", {B, P}, dt);
  if (in.cell == Cell::LSTM) check(grad_c_n, "grad_c_n", {B, H}, dt);
  check(output, "output", {T, B, P}, dt);
  check(workspace, "workspace", {T, B, WS}, math);
}

}  // namespace rnn
}  // namespace fastnn

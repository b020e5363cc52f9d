// The recurrent ops: schemas and the CPU/CUDA registrations (one kernel function serves both
// dispatch keys; rnn_engine.cpp picks the step kernels by the tensors' device).
//
//   fastnn::lstm_seq / gru_seq / rnn_seq             one layer and direction over a sequence
//   fastnn::lstm_seq_backward / ...                  their gradients
//   fastnn::lstm_cell / gru_cell (+ _backward)       one step (the sequence kernels with T = 1)
//
// Fake kernels, autograd and the Python API live in fastnn/ops/rnn.py; the references with the
// same signatures in fastnn/reference/rnn.py.
#include <torch/library.h>

#include "common.h"
#include "rnn/rnn.h"

namespace fastnn {
namespace rnn {
namespace {

using Opt = c10::optional<at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using G8 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                      at::Tensor, at::Tensor>;
using G7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                      at::Tensor>;
using G6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor val(const Opt& t) { return t.has_value() ? *t : at::Tensor(); }

SeqInputs make(Cell cell, const char* op, const at::Tensor& input, const at::Tensor& h0,
               const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih,
               const Opt& b_hh, const Opt& w_hr, const Opt& lengths, const Opt& h_mask, bool reverse) {
  SeqInputs in;
  in.cell = cell;
  in.op = op;
  in.input = input;
  in.h0 = h0;
  in.c0 = c0;
  in.w_ih = w_ih;
  in.w_hh = w_hh;
  in.b_ih = val(b_ih);
  in.b_hh = val(b_hh);
  in.w_hr = val(w_hr);
  in.lengths = val(lengths);
  in.h_mask = val(h_mask);
  in.reverse = reverse;
  return in;
}

Cell rnn_cell_kind(c10::string_view nonlinearity) {
  const std::string s(nonlinearity.data(), nonlinearity.size());
  FASTNN_CHECK_ARG(s == "tanh" || s == "relu", "nonlinearity", "'tanh' or 'relu'", "'" + s + "'");
  return s == "tanh" ? Cell::RNN_TANH : Cell::RNN_RELU;
}

template <size_t N>
std::array<bool, 8> widen(const std::array<bool, N>& m, std::initializer_list<int> slots) {
  std::array<bool, 8> need{};
  size_t k = 0;
  for (int s : slots) need[s] = m[k++];
  return need;
}

// ---- sequences

T4 lstm_seq(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
            const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr, const Opt& lengths,
            const Opt& h_mask, bool reverse) {
  return seq_forward(make(Cell::LSTM, "lstm_seq", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                          h_mask, reverse));
}

G8 lstm_seq_backward(const Opt& grad_output, const Opt& grad_h_n, const Opt& grad_c_n, const at::Tensor& input,
                     const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const Opt& b_ih, const Opt& b_hh, const Opt& w_hr, const Opt& lengths, const Opt& h_mask,
                     bool reverse, const at::Tensor& output, const at::Tensor& workspace,
                     std::array<bool, 8> output_mask) {
  auto g = seq_backward(make(Cell::LSTM, "lstm_seq", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                             h_mask, reverse),
                        val(grad_output), val(grad_h_n), val(grad_c_n), output, workspace, output_mask);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

T3 gru_or_rnn_seq(Cell cell, const char* op, const at::Tensor& input, const at::Tensor& h0,
                  const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh,
                  const Opt& lengths, const Opt& h_mask, bool reverse) {
  auto r = seq_forward(make(cell, op, input, h0, at::Tensor(), w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths,
                            h_mask, reverse));
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

G6 gru_or_rnn_seq_backward(Cell cell, const char* op, const Opt& grad_output, const Opt& grad_h_n,
                           const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
                           const Opt& h_mask, bool reverse, const at::Tensor& output,
                           const at::Tensor& workspace, std::array<bool, 6> output_mask) {
  auto g = seq_backward(make(cell, op, input, h0, at::Tensor(), w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths,
                             h_mask, reverse),
                        val(grad_output), val(grad_h_n), at::Tensor(), output, workspace,
                        widen(output_mask, {0, 1, 3, 4, 5, 6}));
  return {g[0], g[1], g[3], g[4], g[5], g[6]};
}

T3 gru_seq(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
           const Opt& b_ih, const Opt& b_hh, const Opt& lengths, const Opt& h_mask, bool reverse) {
  return gru_or_rnn_seq(Cell::GRU, "gru_seq", input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse);
}

G6 gru_seq_backward(const Opt& grad_output, const Opt& grad_h_n, const at::Tensor& input, const at::Tensor& h0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh,
                    const Opt& lengths, const Opt& h_mask, bool reverse, const at::Tensor& output,
                    const at::Tensor& workspace, std::array<bool, 6> output_mask) {
  return gru_or_rnn_seq_backward(Cell::GRU, "gru_seq", grad_output, grad_h_n, input, h0, w_ih, w_hh, b_ih, b_hh,
                                 lengths, h_mask, reverse, output, workspace, output_mask);
}

T3 rnn_seq(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
           const Opt& b_ih, const Opt& b_hh, const Opt& lengths, const Opt& h_mask, bool reverse,
           c10::string_view nonlinearity) {
  return gru_or_rnn_seq(rnn_cell_kind(nonlinearity), "rnn_seq", input, h0, w_ih, w_hh, b_ih, b_hh, lengths,
                        h_mask, reverse);
}

G6 rnn_seq_backward(const Opt& grad_output, const Opt& grad_h_n, const at::Tensor& input, const at::Tensor& h0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh,
                    const Opt& lengths, const Opt& h_mask, bool reverse, c10::string_view nonlinearity,
                    const at::Tensor& output, const at::Tensor& workspace, std::array<bool, 6> output_mask) {
  return gru_or_rnn_seq_backward(rnn_cell_kind(nonlinearity), "rnn_seq", grad_output, grad_h_n, input, h0, w_ih,
                                 w_hh, b_ih, b_hh, lengths, h_mask, reverse, output, workspace, output_mask);
}

// ---- cells: one step of the sequence kernels

void check_cell_input(const char* op, const at::Tensor& input) {
  FASTNN_CHECK_ARG(input.dim() == 2, std::string(op) + ": input", "a 2-D tensor [B, input_size]",
                   describe(input));
}

at::Tensor squeeze_step(const at::Tensor& g) { return g.numel() == 0 && g.dim() == 1 ? g : g.squeeze(0); }

T3 lstm_cell(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
             const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh) {
  check_cell_input("lstm_cell", input);
  auto r = seq_forward(make(Cell::LSTM, "lstm_cell", input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh,
                            c10::nullopt, c10::nullopt, c10::nullopt, false));
  return {std::get<1>(r), std::get<2>(r), std::get<3>(r).squeeze(0)};
}

G7 lstm_cell_backward(const Opt& grad_hy, const Opt& grad_cy, const at::Tensor& input, const at::Tensor& hx,
                      const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih,
                      const Opt& b_hh, const at::Tensor& hy, const at::Tensor& workspace,
                      std::array<bool, 7> output_mask) {
  check_cell_input("lstm_cell", input);
  auto g = seq_backward(make(Cell::LSTM, "lstm_cell", input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh,
                             c10::nullopt, c10::nullopt, c10::nullopt, false),
                        at::Tensor(), val(grad_hy), val(grad_cy), hy.unsqueeze(0), workspace.unsqueeze(0),
                        widen(output_mask, {0, 1, 2, 3, 4, 5, 6}));
  return {squeeze_step(g[0]), g[1], g[2], g[3], g[4], g[5], g[6]};
}

T2 gru_cell(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
            const Opt& b_ih, const Opt& b_hh) {
  check_cell_input("gru_cell", input);
  auto r = gru_or_rnn_seq(Cell::GRU, "gru_cell", input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, c10::nullopt,
                          c10::nullopt, false);
  return {std::get<1>(r), std::get<2>(r).squeeze(0)};
}

G6 gru_cell_backward(const Opt& grad_hy, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const at::Tensor& hy,
                     const at::Tensor& workspace, std::array<bool, 6> output_mask) {
  check_cell_input("gru_cell", input);
  auto g = gru_or_rnn_seq_backward(Cell::GRU, "gru_cell", c10::nullopt, grad_hy, input.unsqueeze(0), hx, w_ih,
                                   w_hh, b_ih, b_hh, c10::nullopt, c10::nullopt, false, hy.unsqueeze(0),
                                   workspace.unsqueeze(0), output_mask);
  return {squeeze_step(std::get<0>(g)), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g),
          std::get<5>(g)};
}

}  // namespace
}  // namespace rnn
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def(
      "lstm_seq(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? lengths, Tensor? h_mask, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_seq_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, "
      "Tensor? h_mask, bool reverse, Tensor output, Tensor workspace, bool[8] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_seq(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, Tensor? h_mask, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_seq_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, Tensor? h_mask, bool reverse, "
      "Tensor output, Tensor workspace, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_seq(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, Tensor? h_mask, bool reverse, str nonlinearity) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rnn_seq_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, Tensor? h_mask, bool reverse, "
      "str nonlinearity, Tensor output, Tensor workspace, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "lstm_cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hy, Tensor workspace, bool[7] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> (Tensor, Tensor)");
  m.def(
      "gru_cell_backward(Tensor? grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor hy, Tensor workspace, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define FASTNN_RNN_IMPLS(m)                                \
  m.impl("lstm_seq", &fastnn::rnn::lstm_seq);              \
  m.impl("lstm_seq_backward", &fastnn::rnn::lstm_seq_backward); \
  m.impl("gru_seq", &fastnn::rnn::gru_seq);                \
  m.impl("gru_seq_backward", &fastnn::rnn::gru_seq_backward);   \
  m.impl("rnn_seq", &fastnn::rnn::rnn_seq);                \
  m.impl("rnn_seq_backward", &fastnn::rnn::rnn_seq_backward);   \
  m.impl("lstm_cell", &fastnn::rnn::lstm_cell);            \
  m.impl("lstm_cell_backward", &fastnn::rnn::lstm_cell_backward); \
  m.impl("gru_cell", &fastnn::rnn::gru_cell);              \
  m.impl("gru_cell_backward", &fastnn::rnn::gru_cell_backward)

TORCH_LIBRARY_IMPL(fastnn, CPU, m) { FASTNN_RNN_IMPLS(m); }

#ifdef FASTNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnn, CUDA, m) { FASTNN_RNN_IMPLS(m); }
#endif

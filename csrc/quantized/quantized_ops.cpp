// The quantized ops: schemas and CPU registrations.
//
//   fastnn::int8_linear      y = x W^T + b with int8 per-channel weights (dynamic or weight-only)
//   fastnn::int8_lstm_seq    one int8 LSTM layer and direction over a sequence
//   fastnn::int8_gru_seq     one int8 GRU layer and direction over a sequence
//   fastnn::int8_rnn_seq     one int8 Elman RNN layer and direction (tanh or relu)
//   fastnn::int8_moe_mlp     the routed experts of an MoE layer with int8 expert weights
//   fastnn::quantized_isa              the int8 kernel variant in use
//   fastnn::quantized_isas / quantized_set_isa   the CPU instruction-set levels (cpu_isa.h), which
//                                      switch the int8 and the fp32 kernels together
//
// Inference only: no backward ops. Fake kernels and the Python API live in fastnn/ops/quantized.py;
// the references with the same signatures in fastnn/reference/quantized.py.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu_isa.h"
#include "quantized/qgemm.h"
#include "quantized/quantized.h"

namespace fastnn {
namespace quantized {
namespace {

std::string isa() { return active_kernels().name; }

// The levels and their change are the CPU instruction-set ladder's (cpu_isa.h: the int8 and the
// fp32 kernels switch together); set_isa returns the level that was in use, so that a caller can
// restore it exactly (the int8 variant's name alone would not say which fp32 copy ran).
std::vector<std::string> isas() {
  const cpu_isa::Level* all[cpu_isa::kMaxLevels];
  const int n = cpu_isa::available_levels(all);
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) names.emplace_back(all[i]->name);
  return names;
}

std::string set_isa(c10::string_view name) {
  return cpu_isa::exchange_level(std::string(name.data(), name.size()).c_str());
}

}  // namespace
}  // namespace quantized
}  // namespace fastnn

TORCH_LIBRARY_FRAGMENT(fastnn, m) {
  m.def("int8_linear(Tensor input, Tensor w_q, Tensor w_scale, Tensor? bias, bool weight_only) -> Tensor");
  m.def(
      "int8_lstm_seq(Tensor input, Tensor h0, Tensor c0, Tensor w_ih_q, Tensor w_ih_scale, Tensor w_hh_q, "
      "Tensor w_hh_scale, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, bool reverse, bool weight_only, "
      "Tensor? w_hr_q=None, Tensor? w_hr_scale=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "int8_gru_seq(Tensor input, Tensor h0, Tensor w_ih_q, Tensor w_ih_scale, Tensor w_hh_q, "
      "Tensor w_hh_scale, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, bool reverse, bool weight_only) "
      "-> (Tensor, Tensor)");
  m.def(
      "int8_rnn_seq(Tensor input, Tensor h0, Tensor w_ih_q, Tensor w_ih_scale, Tensor w_hh_q, "
      "Tensor w_hh_scale, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, bool reverse, bool weight_only, "
      "str nonlinearity) -> (Tensor, Tensor)");
  m.def(
      "int8_moe_mlp(Tensor x, Tensor sorted_slots, Tensor tokens_per_expert, Tensor slot_positions, "
      "Tensor weights, Tensor gate_up_q, Tensor gate_up_scale, Tensor down_q, Tensor down_scale, "
      "str activation, bool weight_only) -> Tensor");
  m.def("quantized_isa() -> str", &fastnn::quantized::isa);
  m.def("quantized_isas() -> str[]", &fastnn::quantized::isas);
  m.def("quantized_set_isa(str name) -> str", &fastnn::quantized::set_isa);
}

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("int8_linear", &fastnn::quantized::int8_linear);
  m.impl("int8_lstm_seq", &fastnn::quantized::int8_lstm_seq);
  m.impl("int8_gru_seq", &fastnn::quantized::int8_gru_seq);
  m.impl("int8_rnn_seq", &fastnn::quantized::int8_rnn_seq);
  m.impl("int8_moe_mlp", &fastnn::quantized::int8_moe_mlp);
}

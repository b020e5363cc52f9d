// Host entry points of the quantized family (CPU). Schemas and registrations: quantized_ops.cpp;
// references with the same signatures: fastnn/reference/quantized.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastnn {
namespace quantized {

using Opt = c10::optional<at::Tensor>;

at::Tensor int8_linear(const at::Tensor& input, const at::Tensor& w_q, const at::Tensor& w_scale,
                       const Opt& bias, bool weight_only);

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_lstm_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih_q,
    const at::Tensor& w_ih_scale, const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih,
    const Opt& b_hh, const Opt& lengths, bool reverse, bool weight_only, const Opt& w_hr_q, const Opt& w_hr_scale);

std::tuple<at::Tensor, at::Tensor> int8_gru_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih_q, const at::Tensor& w_ih_scale,
    const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih, const Opt& b_hh,
    const Opt& lengths, bool reverse, bool weight_only);

std::tuple<at::Tensor, at::Tensor> int8_rnn_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih_q, const at::Tensor& w_ih_scale,
    const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih, const Opt& b_hh,
    const Opt& lengths, bool reverse, bool weight_only, c10::string_view nonlinearity);

// The routed experts of an MoE layer with int8 expert weights (qmoe_cpu.cpp): gate_up_q [E, 2I, H]
// and down_q [E, H, I] int8 with per-output-channel scales [E, 2I] and [E, H]; routing tensors as
// fastnn::moe_mlp's.
at::Tensor int8_moe_mlp(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& tokens_per_expert,
                        const at::Tensor& slot_positions, const at::Tensor& weights, const at::Tensor& gate_up_q,
                        const at::Tensor& gate_up_scale, const at::Tensor& down_q, const at::Tensor& down_scale,
                        c10::string_view activation, bool weight_only);

}  // namespace quantized
}  // namespace fastnn

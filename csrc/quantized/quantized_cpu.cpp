// The CPU int8 ops (quantized.h): argument checks, contiguous inputs and the output tensors; the
// arithmetic is csrc/quantized/isa/int8_cpu.cpp's (its header comment describes the scheme), in the
// copy that the CPU instruction-set level in use selects.
#include "quantized/quantized.h"

#include <string>

#include "common.h"
#include "quantized/int8_cpu.h"

namespace fastnn {
namespace quantized {
namespace {

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_f32(const at::Tensor& t, const char* arg, std::initializer_list<int64_t> shape) {
  FASTNN_CHECK_ARG(t.scalar_type() == at::kFloat && t.sizes().equals(shape), arg,
                   "a float32 tensor of shape " + c10::str(at::IntArrayRef(shape)), describe(t));
}

void check_weight(const at::Tensor& w, const at::Tensor& scale, const char* arg, const char* scale_arg, int64_t N,
                  int64_t K) {
  FASTNN_CHECK_ARG(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(0) == N && w.size(1) == K, arg,
                   "an int8 tensor of shape [" + std::to_string(N) + ", " + std::to_string(K) + "]", describe(w));
  check_f32(scale, scale_arg, {N});
}

at::Tensor opt_f32(const Opt& t, const char* arg, int64_t N) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_f32(*t, arg, {N});
  return t->contiguous();
}

// The recurrence shared by LSTM (gates i, f, g, o), GRU (r, z, n) and the Elman RNN (one gate).
struct Seq {
  Kind kind;
  bool lstm;
  at::Tensor input, h0, c0, w_ih, s_ih, w_hh, s_hh, b_ih, b_hh, lengths;
  bool reverse, weight_only;
  at::Tensor w_hr, s_hr;  // an LSTM's projection, or undefined
  int64_t H, P;           // cell size; size of h (P == H without a projection)
};

Seq check_seq(Kind kind, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
              const at::Tensor& s_ih, const at::Tensor& w_hh, const at::Tensor& s_hh, const Opt& b_ih,
              const Opt& b_hh, const Opt& lengths, bool reverse, bool weight_only, const Opt& w_hr = {},
              const Opt& s_hr = {}) {
  const at::Tensor none;
  check_cpu({{"input", &input}, {"h0", &h0}, {"c0", &c0}, {"w_ih_q", &w_ih}, {"w_ih_scale", &s_ih}, {"w_hh_q", &w_hh},
             {"w_hh_scale", &s_hh}, {"b_ih", b_ih.has_value() ? &*b_ih : &none},
             {"b_hh", b_hh.has_value() ? &*b_hh : &none}, {"w_hr_q", w_hr.has_value() ? &*w_hr : &none},
             {"w_hr_scale", s_hr.has_value() ? &*s_hr : &none}});
  FASTNN_CHECK_ARG(input.scalar_type() == at::kFloat && input.dim() == 3, "input",
                   "a float32 tensor [T, B, input_size]", describe(input));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const bool lstm = kind == Kind::LSTM;
  const int64_t gates = lstm ? 4 : kind == Kind::GRU ? 3 : 1;
  const bool proj = w_hr.has_value() && w_hr->defined();
  FASTNN_CHECK_ARG(proj == (s_hr.has_value() && s_hr->defined()), proj ? "w_hr_scale" : "w_hr_q",
                   "w_hr_q and w_hr_scale both given or both None", "only one of them");
  // h has P units: the hidden size, or the projection's size (w_hr_q [P, H]).
  const int64_t P = w_hh.dim() == 2 ? w_hh.size(1) : 0;
  FASTNN_CHECK_ARG(w_hh.dim() == 2 && P > 0 && w_hh.size(0) > 0 && w_hh.size(0) % gates == 0 && (proj || w_hh.size(0) == gates * P),
                   "w_hh_q",
                   proj ? "an int8 tensor [4*hidden_size, proj_size]"
                        : "an int8 tensor [" + std::to_string(gates) + "*hidden_size, hidden_size]",
                   describe(w_hh));
  const int64_t H = w_hh.size(0) / gates, G = gates * H;
  if (proj) {
    FASTNN_CHECK_ARG(lstm, "w_hr_q", "None (only an LSTM has a projection)", describe(*w_hr));
    FASTNN_CHECK_ARG(w_hr->dim() == 2 && w_hr->size(0) == P && w_hr->size(1) == H, "w_hr_q",
                     "an int8 tensor [proj_size, hidden_size] = [" + std::to_string(P) + ", " + std::to_string(H) +
                         "] (proj_size = w_hh_q.size(1), hidden_size = w_hh_q.size(0) / 4)",
                     describe(*w_hr));
    check_weight(*w_hr, *s_hr, "w_hr_q", "w_hr_scale", P, H);
  }
  check_weight(w_ih, s_ih, "w_ih_q", "w_ih_scale", G, I);
  check_weight(w_hh, s_hh, "w_hh_q", "w_hh_scale", G, P);
  check_f32(h0, "h0", {B, P});
  if (lstm) check_f32(c0, "c0", {B, H});
  Seq s{kind, lstm, input.contiguous(), h0.contiguous(), lstm ? c0.contiguous() : at::Tensor(), w_ih.contiguous(),
        s_ih.contiguous(), w_hh.contiguous(), s_hh.contiguous(), opt_f32(b_ih, "b_ih", G), opt_f32(b_hh, "b_hh", G),
        at::Tensor(), reverse, weight_only, proj ? w_hr->contiguous() : at::Tensor(),
        proj ? s_hr->contiguous() : at::Tensor(), H, P};
  if (lengths.has_value() && lengths->defined()) {
    FASTNN_CHECK_ARG(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == B &&
                         lengths->device().is_cpu(),
                     "lengths", "an int64 CPU tensor of shape [" + std::to_string(B) + "]", describe(*lengths));
    s.lengths = lengths->contiguous();
    const int64_t* len = s.lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      FASTNN_CHECK_ARG(len[b] >= 0 && len[b] <= T, "lengths", "values in [0, " + std::to_string(T) + "]",
                       "lengths[" + std::to_string(b) + "] = " + std::to_string(len[b]));
  }
  return s;
}

const Int8CpuKernels& kernels() { return FASTNN_ISA_SELECT(int8_cpu_kernels); }

// Runs the recurrence; returns output [T, B, P] and fills h (and c) with the final state.
at::Tensor run(const Seq& s, at::Tensor& h, at::Tensor& c) {
  const int64_t T = s.input.size(0), B = s.input.size(1), I = s.input.size(2);
  at::Tensor out = at::zeros({T, B, s.P}, s.input.options());
  h = s.h0.clone();
  if (s.lstm) c = s.c0.clone();
  const bool proj = s.w_hr.defined();
  kernels().recurrence({s.kind, T, B, I, s.H, s.P, s.input.data_ptr<float>(), s.w_ih.data_ptr<int8_t>(),
                        s.s_ih.data_ptr<float>(), s.w_hh.data_ptr<int8_t>(), s.s_hh.data_ptr<float>(),
                        ptr_or_null(s.b_ih), ptr_or_null(s.b_hh),
                        s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr, s.reverse, s.weight_only,
                        out.data_ptr<float>(), h.data_ptr<float>(), s.lstm ? c.data_ptr<float>() : nullptr,
                        proj ? s.w_hr.data_ptr<int8_t>() : nullptr, proj ? s.s_hr.data_ptr<float>() : nullptr});
  return out;
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& input, const at::Tensor& w_q, const at::Tensor& w_scale, const Opt& bias,
                       bool weight_only) {
  const at::Tensor none;
  check_cpu({{"input", &input}, {"w_q", &w_q}, {"w_scale", &w_scale}, {"bias", bias.has_value() ? &*bias : &none}});
  FASTNN_CHECK_ARG(input.scalar_type() == at::kFloat && input.dim() >= 1, "input",
                   "a float32 tensor [..., in_features]", describe(input));
  FASTNN_CHECK_ARG(w_q.dim() == 2, "w_q", "an int8 tensor [out_features, in_features]", describe(w_q));
  const int64_t N = w_q.size(0), K = input.size(-1);
  check_weight(w_q, w_scale, "w_q", "w_scale", N, K);
  at::Tensor b = opt_f32(bias, "bias", N);
  int64_t M = 1;  // not reshape(-1, K): with K = 0 the -1 would be ambiguous
  for (int64_t d = 0; d + 1 < input.dim(); ++d) M *= input.size(d);
  at::Tensor x = input.reshape({M, K}).contiguous();
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({M, N}, input.options());
  at::Tensor w = w_q.contiguous(), sw = w_scale.contiguous();
  kernels().linear({x.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), sw.data_ptr<float>(), ptr_or_null(b), N,
                    weight_only, y.data_ptr<float>()});
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_lstm_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih_q,
    const at::Tensor& w_ih_scale, const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih,
    const Opt& b_hh, const Opt& lengths, bool reverse, bool weight_only, const Opt& w_hr_q, const Opt& w_hr_scale) {
  Seq s = check_seq(Kind::LSTM, input, h0, c0, w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse,
                    weight_only, w_hr_q, w_hr_scale);
  at::Tensor h, c;
  at::Tensor out = run(s, h, c);
  return {out, h, c};
}

std::tuple<at::Tensor, at::Tensor> int8_gru_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih_q, const at::Tensor& w_ih_scale,
    const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
    bool reverse, bool weight_only) {
  Seq s = check_seq(Kind::GRU, input, h0, at::Tensor(), w_ih_q, w_ih_scale, w_hh_q, w_hh_scale, b_ih, b_hh, lengths,
                    reverse, weight_only);
  at::Tensor h, c;
  at::Tensor out = run(s, h, c);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> int8_rnn_seq(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih_q, const at::Tensor& w_ih_scale,
    const at::Tensor& w_hh_q, const at::Tensor& w_hh_scale, const Opt& b_ih, const Opt& b_hh, const Opt& lengths,
    bool reverse, bool weight_only, c10::string_view nonlinearity) {
  const std::string nl(nonlinearity.data(), nonlinearity.size());
  FASTNN_CHECK_ARG(nl == "tanh" || nl == "relu", "nonlinearity", "'tanh' or 'relu'", "'" + nl + "'");
  Seq s = check_seq(nl == "tanh" ? Kind::RNN_TANH : Kind::RNN_RELU, input, h0, at::Tensor(), w_ih_q, w_ih_scale,
                    w_hh_q, w_hh_scale, b_ih, b_hh, lengths, reverse, weight_only);
  at::Tensor h, c;
  at::Tensor out = run(s, h, c);
  return {out, h};
}

}  // namespace quantized
}  // namespace fastnn

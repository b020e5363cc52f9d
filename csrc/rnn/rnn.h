// Host-side interface of fastnn's recurrent kernels, shared by
//   rnn_ops.cpp        the op schemas and their CPU/CUDA registrations,
//   rnn_checks.cpp     the compiled ops' argument checks,
//   rnn_engine.cpp     the device-independent sequence driver: the GEMMs and the choice among the
//                      forward strategies below,
//   isa/step_cpu.cpp   CPU strategy "steps": one step's fused pointwise kernel (isa/cpu_step.h)
//                      after each recurrent GEMM (also the whole backward),
//   isa/packed_cpu.cpp CPU strategy "packed": the whole float32 recurrence in one parallel region,
//                      its own recurrent products, tasks meeting at a barrier (isa/step_barrier.h),
//   cpu_dispatch.cpp   the CPU entry points below: each calls the isa/ copy (default, avx2, avx512)
//                      of the CPU instruction-set level in use (cpu_isa.h),
//   kernels/cuda/rnn/rnn_cuda.cu   the CUDA step kernels and the opt-in persistent kernel.
//
// One layer and one direction of LSTM/GRU/RNN over a time-major sequence [T, B, I]:
//   1. the input projection of every step as one GEMM (biases folded in),
//   2. per step: the recurrent GEMM, then one fused pointwise kernel (gates, state update,
//      output and the workspace the backward reads),
// and the backward mirrors it: one fused pointwise kernel and one GEMM per step, then the weight
// and input gradients as single GEMMs over all steps. Gate math lives in cell_math.h.
//
// The GEMMs are ATen calls on math-dtype tensors (float32, or float64 for float64 inputs), so a
// quantised path can replace them and keep the step kernels as they are.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_isa.h"

namespace fastnn {
namespace rnn {

enum class Cell : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

C10_HOST_DEVICE inline int64_t num_gates(Cell c) { return c == Cell::LSTM ? 4 : (c == Cell::GRU ? 3 : 1); }
// Columns of the workspace per batch row: LSTM i,f,g,o,c; GRU r,z,n,hn; RNN nothing.
C10_HOST_DEVICE inline int64_t ws_width(Cell c, int64_t H) {
  return c == Cell::LSTM ? 5 * H : (c == Cell::GRU ? 4 * H : 0);
}
const char* cell_name(Cell c);

// Everything one sequence op receives. Optional tensors are undefined when absent.
struct SeqInputs {
  Cell cell = Cell::LSTM;
  at::Tensor input;         // [T, B, I]
  at::Tensor h0, c0;        // [B, P], [B, H] (c0: LSTM only)
  at::Tensor w_ih, w_hh;    // [G*H, I], [G*H, P]
  at::Tensor b_ih, b_hh;    // [G*H]
  at::Tensor w_hr;          // [P, H] (LSTM projection)
  at::Tensor lengths;       // int64 [B]: steps >= lengths[b] are padding
  at::Tensor h_mask;        // [B, P]: variational recurrent dropout mask
  bool reverse = false;
  std::string op = "lstm_seq";  // for error messages
};

// Checks shapes, dtypes and devices; raises a ValueError naming the argument. The Python layer
// (fastnn/ops/rnn.py) owns the user-facing checks and runs them before any backend; these are the
// compiled ops' own, because torch.ops.fastnn.* (and the *_backward ops) can be called directly
// and the kernels index every buffer by these shapes.
void validate(const SeqInputs& in);
// The backward's own tensors (the forward's are validate's): gradients, output and workspace.
void validate_backward(const SeqInputs& in, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                       const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& workspace);

// (output [T,B,P], h_n [B,P], c_n [B,H] (undefined unless LSTM), workspace [T,B,WS] in math dtype)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seq_forward(const SeqInputs& in);

// Gradients of (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), each an empty tensor where
// `need` is false or the input is absent.
std::array<at::Tensor, 8> seq_backward(const SeqInputs& in, const at::Tensor& grad_output,
                                       const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                       const at::Tensor& output, const at::Tensor& workspace,
                                       const std::array<bool, 8>& need);

// One step's pointwise work (all pointers into contiguous math-dtype buffers). Rows whose
// sequence has ended (t >= lengths[b]) keep their state, write zeros to output and workspace,
// and in the backward produce zero gate gradients.
template <typename T>
struct FwdStep {
  Cell cell;
  int64_t B, H, P;
  const T* gi;        // [B, G] input projection + folded biases
  const T* gh;        // [B, G] recurrent product (no bias)
  const T* b_hn;      // GRU: [H] or null
  T* h;               // [B, P] state (written unless `hpre`)
  const T* h_prev;    // [B, P] state before the step when it is not `h` (double buffering), or null
  T* c;               // [B, H] LSTM cell state
  T* out;             // [B, P] this step's output row (written unless `hpre`)
  T* ws;              // [B, WS]
  T* hpre;            // LSTM with projection: [B, H] receives o*tanh(c); h/out are the driver's
  const int64_t* lengths;  // [B] or null
  int64_t t;
  const T* gi_bias = nullptr;  // [G] added to gi, or null (CPU packed path: gi is then x W_ih^T
                               // alone, which spares the GEMM a pass that broadcasts the bias)
};

template <typename T>
struct BwdStep {
  Cell cell;
  int64_t B, H, P;
  const T* ws;        // [B, WS] this step
  const T* c_prev;    // LSTM: [B, H] cell state before this step
  const T* h_prev;    // GRU: [B, H] hidden state before this step (unmasked)
  const T* out;       // RNN: [B, H] this step's output
  const T* grad_out;  // [B, H] or null: gradient of this step's output (not with a projection)
  T* dh;              // [B, H] in: gradient of this step's h from later steps (or, with a
                      // projection, of o*tanh(c)); out (active rows, no projection): the part
                      // of the previous h's gradient that bypasses W_hh (GRU z*h; 0 otherwise)
  bool proj;          // dh is the projection's input gradient: read only
  T* dc;              // LSTM [B, H]: in from later steps, out for the previous step
  T* dgi;             // [B, G] pre-activation gradients, input side
  T* dgh;             // [B, G] hidden side (GRU differs in n; the same buffer otherwise)
  const int64_t* lengths;
  int64_t t;
};

// The CPU's whole-sequence forward (float, no projection): per step one parallel region over
// blocks of hidden units; each block computes its own gates' recurrent products from a packed
// copy of W_hh (so a thread streams the same slice every step, and that slice serves every batch
// row from L1) and then their pointwise step. No separate GEMM call, no second pass over gh.
struct PackedForward {
  Cell cell;
  int64_t T, B, H;
  bool reverse;
  const float* gi;       // [T, B, G] input projection (+ folded biases unless gi_bias)
  const float* gi_bias;  // [G] folded biases or null
  const float* w_hh;     // [G, H]
  const float* b_hn;     // GRU [H] or null
  const float* h_mask;   // [B, H] or null
  const int64_t* lengths;
  float* h;              // [B, H]: in h0, out h_n
  float* c;              // [B, H] LSTM: in c0, out c_n
  float* out;            // [T, B, H]
  float* ws;             // [T, B, WS]
};
void packed_forward_cpu(const PackedForward& f);
// y [R] = w [R, K] (row-major) . x [K], float32, parallel over rows: the projection of one input
// row (a streaming step), where a BLAS GEMV on the transposed weight is several times slower.
void matvec_cpu(const float* w, int64_t R, int64_t K, const float* x, float* y);

template <typename T>
void step_forward_cpu(const FwdStep<T>& s);
template <typename T>
void step_backward_cpu(const BwdStep<T>& s);

// The CPU kernels of one compiled variant of the isa/ sources; the entry points above call those of
// the level in use (cpu_dispatch.cpp).
struct CpuKernels {
  void (*packed_forward)(const PackedForward&);
  void (*matvec)(const float*, int64_t, int64_t, const float*, float*);
  void (*step_forward_f32)(const FwdStep<float>&);
  void (*step_forward_f64)(const FwdStep<double>&);
  void (*step_backward_f32)(const BwdStep<float>&);
  void (*step_backward_f64)(const BwdStep<double>&);
};
FASTNN_ISA_DECLARE(CpuKernels, cpu_kernels)

#ifdef FASTNN_WITH_CUDA
// The whole forward in one cooperative launch (float, no projection, no mask; opt-in with
// FASTNN_RNN_PERSISTENT=1); false when the sequence does not fit (then the caller runs it step by
// step). `s` describes step 0 (gi, out and
// ws at the buffers' starts); hbuf is [2, B, H] with h0 in its first half; barrier: two zeroed
// uint32 on the device. The final state lands in hbuf's half (T % 2).
bool persistent_forward_cuda(const FwdStep<float>& s, const float* w_hh, float* hbuf, int64_t T, bool reverse,
                             unsigned* barrier);
template <typename T>
void step_forward_cuda(const FwdStep<T>& s);
template <typename T>
void step_backward_cuda(const BwdStep<T>& s);
#endif

}  // namespace rnn
}  // namespace fastnn

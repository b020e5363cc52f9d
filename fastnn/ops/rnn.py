"""Recurrent ops: one layer and direction of LSTM/GRU/RNN over a sequence, and one LSTM/GRU step.

Public functional API (each a :class:`fastnn.backends.Op`; the backend is chosen per call), with
the signatures of ``fastnn.reference.rnn`` (see there, or ``help(fastnn.ops.lstm_seq)``, for the
arguments, shapes and outputs):

* ``lstm_seq(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask, reverse)
  -> (output, h_n, c_n, workspace)``
* ``gru_seq(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse) -> (output, h_n, workspace)``
* ``rnn_seq(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse, nonlinearity)
  -> (output, h_n, workspace)``
* ``lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> (hy, cy, workspace)``
* ``gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh) -> (hy, workspace)``

Backends: ``cpu``/``cuda`` run the compiled ops (autograd through the ``*_backward`` ops
registered here), ``triton`` the fused Triton cells (``fastnn::triton_lstm_cell``/``triton_gru_cell``,
kernels and launchers in kernels/triton/rnn.py), ``reference`` the pure-PyTorch code (autograd
by PyTorch).

Argument checks: this module owns the user-facing ones (every argument's type, shape, dtype and
device, ``nonlinearity``, and on CPU tensors the values of ``lengths``), run once per call before
a backend is chosen, so every backend gives the same error. The compiled ops keep their own
shape/dtype/device checks (csrc/rnn/rnn_engine.cpp: ``validate``), because ``torch.ops.fastnn.*``
and their ``*_backward`` can be called directly and the kernels index buffers by those shapes;
the Triton ops check the same here, in their bodies. ``lengths`` only ever enters comparisons
(``t < lengths[b]``) in every kernel, so unchecked values cannot reach memory out of bounds; on
CUDA tensors they are not read back (no host synchronisation): a value outside ``[0, T]`` acts as
its clamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _extension
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_like, check_tensor, dtype_names, fail
from ..backends import Op, on_triton
from ..reference import rnn as ref

__all__ = ["lstm_seq", "gru_seq", "rnn_seq", "lstm_cell", "gru_cell", "FLOAT_DTYPES", "validate"]

Tensor = torch.Tensor
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


# ---------------------------------------------------------------------------------------------
# Argument checks (see the module docstring for who owns which).

def _check_weights(kind: str, op: str, input: Tensor, states: tuple, w_ih: Tensor, w_hh: Tensor,
                   b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                   h_mask: Optional[Tensor]) -> None:
    """Everything but ``input``'s own rank and dtype. ``input`` is [..., B, I]; ``states`` the
    (name, tensor) pairs of the hidden state and, for LSTM, the cell state."""
    B, I = input.shape[-2], input.shape[-1]
    gates = GATES[kind]
    check_tensor(w_hh, "w_hh", dim=2, op=op)
    G = w_hh.shape[0]
    if G == 0 or G % gates:
        fail("w_hh", f"a 2-d tensor [{gates}*hidden_size, P] with hidden_size > 0", w_hh, op=op)
    H = G // gates
    P = H
    if w_hr is not None:
        check_tensor(w_hr, "w_hr", op=op)
        if kind != "lstm":
            fail("w_hr", "None (projections are LSTM-only)", w_hr, op=op)
        if w_hr.dim() != 2 or w_hr.shape[1] != H or not 0 < w_hr.shape[0] < H:
            fail("w_hr", f"a tensor [proj_size, {H}] with 0 < proj_size < hidden_size", w_hr, op=op)
        P = w_hr.shape[0]
    check_like(w_ih, "w_ih", input, "input", shape=(G, I), op=op)
    check_like(w_hh, "w_hh", input, "input", shape=(G, P), op=op)
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            check_like(b, name, input, "input", shape=(G,), op=op)
    if w_hr is not None:
        check_like(w_hr, "w_hr", input, "input", shape=(P, H), op=op)
    for (name, s), width in zip(states, (P, H)):
        check_like(s, name, input, "input", shape=(B, width), op=op)
    if h_mask is not None:
        check_like(h_mask, "h_mask", input, "input", shape=(B, P), op=op)


def _check_lengths(op: str, lengths: Optional[Tensor], input: Tensor) -> None:
    if lengths is None:
        return
    T, B = input.shape[0], input.shape[1]
    check_tensor(lengths, "lengths", dim=1, dtypes=INDEX_DTYPES, device=input.device, op=op)
    if lengths.shape[0] != B:
        fail("lengths", f"an int64 tensor of shape [{B}] on {input.device}", lengths, op=op)
    # values: read on the CPU only (see the module docstring); not while torch.compile traces
    if lengths.device.type == "cpu" and B > 0 and not torch.compiler.is_compiling():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            fail("lengths", f"values in [0, {T}] (the number of steps)", f"values in [{lo}, {hi}]", op=op)


def _check_seq(kind: str, op: str, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask, reverse) -> None:
    check_tensor(input, "input", dim=3, dtypes=FLOAT_DTYPES, op=op)
    if not isinstance(reverse, bool):
        fail("reverse", "a bool", reverse, op=op, error=TypeError)
    states = (("h0", h0),) + ((("c0", c0),) if kind == "lstm" else ())
    for name, s in states:
        check_tensor(s, name, op=op)
    _check_weights(kind, op, input, states, w_ih, w_hh, b_ih, b_hh, w_hr, h_mask)
    _check_lengths(op, lengths, input)


def validate(kind: str, op: str, input: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor] = None,
             lengths: Optional[Tensor] = None, h_mask: Optional[Tensor] = None) -> None:
    """Shapes, dtypes and devices of one sequence call (``input`` [T, B, I]); ``kind`` is lstm,
    gru or rnn, ``op`` the name the errors give."""
    _check_seq(kind, op, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask, False)


def _check_cell(kind: str, op: str, input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> None:
    check_tensor(input, "input", dim=2, dtypes=FLOAT_DTYPES, op=op)
    states = (("hx", hx),) + ((("cx", cx),) if kind == "lstm" else ())
    for name, s in states:
        check_tensor(s, name, op=op)
    _check_weights(kind, op, input, states, w_ih, w_hh, b_ih, b_hh, None, None)


def _validate_lstm_seq(a) -> None:
    _check_seq("lstm", "lstm_seq", a.input, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.lengths,
               a.h_mask, a.reverse)


def _validate_gru_seq(a) -> None:
    _check_seq("gru", "gru_seq", a.input, a.h0, None, a.w_ih, a.w_hh, a.b_ih, a.b_hh, None, a.lengths, a.h_mask,
               a.reverse)


def _validate_rnn_seq(a) -> None:
    if a.nonlinearity not in ("tanh", "relu"):
        fail("nonlinearity", "'tanh' or 'relu'", a.nonlinearity, op="rnn_seq")
    _check_seq("rnn", "rnn_seq", a.input, a.h0, None, a.w_ih, a.w_hh, a.b_ih, a.b_hh, None, a.lengths, a.h_mask,
               a.reverse)


def _validate_lstm_cell(a) -> None:
    _check_cell("lstm", "lstm_cell", a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh)


def _validate_gru_cell(a) -> None:
    _check_cell("gru", "gru_cell", a.input, a.hx, None, a.w_ih, a.w_hh, a.b_ih, a.b_hh)


def _check_cell_backward(kind: str, op: str, grads: tuple, hy: Tensor, workspace: Tensor, input: Tensor,
                         hx: Tensor) -> None:
    """The tensors a Triton cell backward reads besides the forward's (checked by _check_cell)."""
    H = hx.shape[1]
    for name, g in grads:
        if g is not None:
            check_like(g, name, hx, "hx", op=op)
    check_like(hy, "hy", hx, "hx", op=op)
    check_tensor(workspace, "workspace", dtypes=(torch.float32,), device=input.device, op=op)
    width = (5 if kind == "lstm" else 4) * H
    if tuple(workspace.shape) != (hx.shape[0], width):
        fail("workspace", f"a float32 tensor of shape [{hx.shape[0]}, {width}]", workspace, op=op)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops (and of the Triton cells, which share the
# backward convention). A backward op takes the gradients of the differentiable outputs, every
# forward input, the first output and the workspace, and a mask of the gradients wanted; it
# returns an empty tensor where a gradient is not wanted.

@dataclass(frozen=True)
class _Spec:
    name: str        # forward op
    kind: str        # lstm / gru / rnn
    n_diff: int      # leading tensor inputs that can take a gradient
    n_out_diff: int  # leading outputs that carry a gradient (the workspace, last, never does)
    cell: bool


SPECS = {
    "lstm_seq": _Spec("lstm_seq", "lstm", 8, 3, False),
    "gru_seq": _Spec("gru_seq", "gru", 6, 2, False),
    "rnn_seq": _Spec("rnn_seq", "rnn", 6, 2, False),
    "lstm_cell": _Spec("lstm_cell", "lstm", 7, 2, True),
    "gru_cell": _Spec("gru_cell", "gru", 6, 1, True),
}


def _fake_forward(spec: _Spec):
    def fake(input, h0, *rest):
        md = ref.math_dtype(input.dtype)
        if spec.kind == "lstm":
            w_hh = rest[2]
            w_hr = None if spec.cell else rest[5]
        else:
            w_hh, w_hr = rest[1], None
        H = w_hh.shape[0] // GATES[spec.kind]
        P = H if w_hr is None else w_hr.shape[0]
        ws_cols = {"lstm": 5 * H, "gru": 4 * H, "rnn": 0}[spec.kind]
        lead = (input.shape[0],) if spec.cell else (input.shape[0], input.shape[1])
        B = lead[-1]
        outs = [] if spec.cell else [input.new_empty((lead[0], B, P))]
        outs.append(input.new_empty((B, P)))
        if spec.kind == "lstm":
            outs.append(input.new_empty((B, H)))
        outs.append(input.new_empty(lead + (ws_cols,), dtype=md))
        return tuple(outs)
    return fake


def _fake_backward(spec: _Spec):
    def fake(*args):
        need = args[-1]
        inputs = args[spec.n_out_diff: spec.n_out_diff + spec.n_diff]
        ref_t = inputs[0]
        return tuple(x.new_empty(x.shape) if (n and x is not None) else ref_t.new_empty(ref.EMPTY_GRAD)
                     for x, n in zip(inputs, need))
    return fake


def _autograd(spec: _Spec, backward_op):
    def setup_context(ctx, inputs, output):
        is_tensor = [x is None or isinstance(x, Tensor) for x in inputs]
        ctx.is_tensor = is_tensor
        ctx.static = [None if t else x for x, t in zip(inputs, is_tensor)]
        ctx.save_for_backward(*[x for x, t in zip(inputs, is_tensor) if t], output[0], output[-1])
        ctx.mark_non_differentiable(output[-1])
        # Outputs nobody used (the workspace, always) get None, not a materialised zero tensor of
        # their size: the backward ops take optional gradients.
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        saved = list(ctx.saved_tensors)
        first, ws = saved[-2], saved[-1]
        it = iter(saved[:-2])
        args = [next(it) if t else s for t, s in zip(ctx.is_tensor, ctx.static)]
        need = [bool(n) for n in ctx.needs_input_grad[: spec.n_diff]]
        gs = backward_op(*grads[: spec.n_out_diff], *args, first, ws, need)
        return tuple(g if n else None for g, n in zip(gs, need)) + (None,) * (len(args) - spec.n_diff)

    return backward, setup_context


@_extension.on_load
def _register_native(_module) -> None:
    # When the compiled library loads (the first op call; importing fastnn does not load it).
    for name, spec in SPECS.items():
        torch.library.register_fake(f"fastnn::{name}")(_fake_forward(spec))
        torch.library.register_fake(f"fastnn::{name}_backward")(_fake_backward(spec))
        backward_op = getattr(torch.ops.fastnn, f"{name}_backward")
        bw, setup = _autograd(spec, backward_op)
        torch.library.register_autograd(f"fastnn::{name}", bw, setup_context=setup)


# ---------------------------------------------------------------------------------------------
# The public ops.

lstm_seq = Op("lstm_seq", signature=ref.lstm_seq, validate=_validate_lstm_seq)
gru_seq = Op("gru_seq", signature=ref.gru_seq, validate=_validate_gru_seq)
rnn_seq = Op("rnn_seq", signature=ref.rnn_seq, validate=_validate_rnn_seq)
lstm_cell = Op("lstm_cell", signature=ref.lstm_cell, validate=_validate_lstm_cell)
gru_cell = Op("gru_cell", signature=ref.gru_cell, validate=_validate_gru_cell)


def _native(name: str):
    """The compiled op ``fastnn::<name>``, called with the bound arguments (its schema's names)."""
    def run(**a):
        return getattr(torch.ops.fastnn, name)(**a)
    run.__name__ = f"_{name}_native"
    return run


for _op, _ref_fn in ((lstm_seq, ref.lstm_seq), (gru_seq, ref.gru_seq), (rnn_seq, ref.rnn_seq),
                     (lstm_cell, ref.lstm_cell), (gru_cell, ref.gru_cell)):
    _op.register("reference")(_ref_fn)
    for _device in ("cpu", "cuda"):
        _op.register(_device, native=_op.name)(_native(_op.name))


# ---------------------------------------------------------------------------------------------
# Triton cells: fastnn::triton_lstm_cell / triton_gru_cell (torch.library.triton_op, so that
# torch.compile sees the kernels) with the signatures and workspace of the compiled cells, and
# backward ops of the same convention: a Triton pointwise kernel, then torch GEMMs in fp32.

def _kernels():
    # Imported on first use: importing fastnn does not import Triton.
    from ..kernels import rnn as tk
    return tk


def _register_triton() -> None:
    if not hasattr(torch.library, "triton_op"):
        return
    from torch.library import triton_op

    @triton_op("fastnn::triton_lstm_cell", mutates_args=())
    def triton_lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                         b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        _check_cell("lstm", "triton_lstm_cell", input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        return _kernels().lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh)

    @triton_op("fastnn::triton_gru_cell", mutates_args=())
    def triton_gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                        b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        _check_cell("gru", "triton_gru_cell", input, hx, None, w_ih, w_hh, b_ih, b_hh)
        return _kernels().gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh)

    @triton_op("fastnn::triton_lstm_cell_backward", mutates_args=())
    def triton_lstm_cell_backward(grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor, hx: Tensor,
                                  cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                                  b_hh: Optional[Tensor], hy: Tensor, workspace: Tensor,
                                  output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        op = "triton_lstm_cell_backward"
        _check_cell("lstm", op, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        _check_cell_backward("lstm", op, (("grad_hy", grad_hy), ("grad_cy", grad_cy)), hy, workspace, input, hx)
        return _kernels().lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, b_ih, b_hh, hy, workspace,
                                             output_mask)

    @triton_op("fastnn::triton_gru_cell_backward", mutates_args=())
    def triton_gru_cell_backward(grad_hy: Optional[Tensor], input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                                 b_ih: Optional[Tensor], b_hh: Optional[Tensor], hy: Tensor, workspace: Tensor,
                                 output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        op = "triton_gru_cell_backward"
        _check_cell("gru", op, input, hx, None, w_ih, w_hh, b_ih, b_hh)
        _check_cell_backward("gru", op, (("grad_hy", grad_hy),), hy, workspace, input, hx)
        return _kernels().gru_cell_backward(grad_hy, input, hx, w_ih, w_hh, b_ih, b_hh, hy, workspace, output_mask)

    for fwd, bwd, spec in ((triton_lstm_cell, triton_lstm_cell_backward, SPECS["lstm_cell"]),
                           (triton_gru_cell, triton_gru_cell_backward, SPECS["gru_cell"])):
        bw, setup = _autograd(spec, bwd)
        fwd.register_autograd(bw, setup_context=setup)
        # Explicit fake kernels: tracing the launchers with fake tensors needs a GPU (under the
        # Triton interpreter the launch touches real storage).
        fwd.register_fake(_fake_forward(spec))
        bwd.register_fake(_fake_backward(spec))

    def _triton_dtypes(a) -> Optional[str]:
        if a.input.dtype not in TRITON_DTYPES:
            return f"argument 'input' is {a.input.dtype}; the Triton kernel covers {dtype_names(TRITON_DTYPES)}"
        return None

    @lstm_cell.register("triton", supports=_triton_dtypes)
    def _lstm_cell_triton(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        return torch.ops.fastnn.triton_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)

    @gru_cell.register("triton", supports=_triton_dtypes)
    def _gru_cell_triton(input, hx, w_ih, w_hh, b_ih, b_hh):
        return torch.ops.fastnn.triton_gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


on_triton(_register_triton)

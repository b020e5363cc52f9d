"""Recurrent ops: one layer and direction of LSTM/GRU/RNN over a sequence, and one LSTM/GRU step.

Public functional API (each a :class:`fastnn.backends.Op`; the backend is chosen per call), with
the signatures and outputs of the ``fastnn::`` ops and of ``fastnn.reference.rnn``:

* ``lstm_seq(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask, reverse)
  -> (output, h_n, c_n, workspace)``
* ``gru_seq(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse) -> (output, h_n, workspace)``
* ``rnn_seq(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse, nonlinearity)
  -> (output, h_n, workspace)``
* ``lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> (hy, cy, workspace)``
* ``gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh) -> (hy, workspace)``

``input`` is time-major ``[T, B, I]``; see fastnn/reference/rnn.py for ``lengths`` (padding),
``h_mask`` (variational recurrent dropout) and the workspace. Backends: ``cpu``/``cuda`` run the
compiled ops (autograd through the ``*_backward`` ops registered here), ``triton`` the fused
Triton cells (``fastnn::triton_lstm_cell``/``triton_gru_cell``), ``reference`` the pure-PyTorch
code (autograd by PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _extension
from ..backends import Op
from ..reference import rnn as ref

__all__ = ["lstm_seq", "gru_seq", "rnn_seq", "lstm_cell", "gru_cell", "FLOAT_DTYPES", "validate"]

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


# ---------------------------------------------------------------------------------------------
# Argument checks for the Python backends (the compiled ops check the same in C++, with the same
# wording).

def _describe(t: Tensor) -> str:
    return f"tensor of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _fail(op: str, arg: str, expected: str, t) -> None:
    got = _describe(t) if isinstance(t, Tensor) else repr(t)
    raise ValueError(f"fastnn: argument '{op}: {arg}': expected {expected}, got {got}")


def validate(kind: str, op: str, input: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor] = None,
             lengths: Optional[Tensor] = None, h_mask: Optional[Tensor] = None) -> None:
    """Shapes, dtypes and devices of one sequence call (``input`` [T, B, I])."""
    if input.dim() != 3:
        _fail(op, "input", "a 3-D tensor [T, B, input_size]", input)
    if input.dtype not in FLOAT_DTYPES:
        _fail(op, "input", "a float32, float64, bfloat16 or float16 tensor", input)
    gates = GATES[kind]
    if w_hh.dim() != 2 or w_hh.shape[0] % gates or w_hh.shape[0] == 0:
        _fail(op, "w_hh", f"a 2-D tensor [{gates}*hidden_size, P]", w_hh)
    G = w_hh.shape[0]
    H = G // gates
    T, B, I = input.shape
    if w_hr is not None:
        if kind != "lstm":
            _fail(op, "w_hr", "None (projections are LSTM-only)", w_hr)
        if w_hr.dim() != 2 or w_hr.shape[1] != H or not 0 < w_hr.shape[0] < H:
            _fail(op, "w_hr", f"a tensor [proj_size, {H}] with 0 < proj_size < hidden_size", w_hr)
    P = H if w_hr is None else w_hr.shape[0]

    def like(t, name, shape):
        if tuple(t.shape) != tuple(shape):
            _fail(op, name, f"a tensor of shape {list(shape)}", t)
        if t.dtype != input.dtype or t.device != input.device:
            _fail(op, name, f"the dtype and device of 'input' ({input.dtype}, {input.device})", t)

    like(w_ih, "w_ih", (G, I))
    like(w_hh, "w_hh", (G, P))
    if b_ih is not None:
        like(b_ih, "b_ih", (G,))
    if b_hh is not None:
        like(b_hh, "b_hh", (G,))
    if w_hr is not None:
        like(w_hr, "w_hr", (P, H))
    like(h0, "h0", (B, P))
    if kind == "lstm":
        like(c0, "c0", (B, H))
    if h_mask is not None:
        like(h_mask, "h_mask", (B, P))
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != B or lengths.dtype != torch.int64
                                or lengths.device != input.device):
        _fail(op, "lengths", f"an int64 tensor of shape [{B}] on {input.device}", lengths)


def _check_cell_input(op: str, input: Tensor) -> None:
    if input.dim() != 2:
        _fail(op, "input", "a 2-D tensor [B, input_size]", input)


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
            c0, w_ih, w_hh = rest[0], rest[1], rest[2]
            w_hr = None if spec.cell else rest[5]
        else:
            w_ih, w_hh = rest[0], rest[1]
            w_hr = None
        H = w_hh.shape[0] // GATES[spec.kind]
        P = H if w_hr is None else w_hr.shape[0]
        ws_cols = {"lstm": 5 * H, "gru": 4 * H, "rnn": 0}[spec.kind]
        if spec.cell:
            B = input.shape[0]
            outs = [input.new_empty((B, P))]
            if spec.kind == "lstm":
                outs.append(input.new_empty((B, H)))
            outs.append(input.new_empty((B, ws_cols), dtype=md))
            return tuple(outs)
        T, B = input.shape[0], input.shape[1]
        outs = [input.new_empty((T, B, P)), input.new_empty((B, P))]
        if spec.kind == "lstm":
            outs.append(input.new_empty((B, H)))
        outs.append(input.new_empty((T, B, ws_cols), dtype=md))
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

def _dtypes(allowed: tuple[torch.dtype, ...], what: str):
    def supports(input, *args, **kwargs) -> str | None:
        if input.dtype not in allowed:
            return f"argument 'input' is {input.dtype}; {what} covers {', '.join(str(d) for d in allowed)}"
        return None
    return supports


_NATIVE = _dtypes(FLOAT_DTYPES, "the compiled kernel")

lstm_seq = Op("lstm_seq")
gru_seq = Op("gru_seq")
rnn_seq = Op("rnn_seq")
lstm_cell = Op("lstm_cell", preference={"cuda": ("cuda", "triton", "reference")})
gru_cell = Op("gru_cell", preference={"cuda": ("cuda", "triton", "reference")})


@lstm_seq.register("reference")
def _lstm_seq_reference(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask, reverse):
    validate("lstm", "lstm_seq", input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask)
    return ref.lstm_seq(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, h_mask, reverse)


@lstm_seq.register("cpu", native="lstm_seq", supports=_NATIVE)
@lstm_seq.register("cuda", native="lstm_seq", supports=_NATIVE)
def _lstm_seq_native(*args):
    return torch.ops.fastnn.lstm_seq(*args)


@gru_seq.register("reference")
def _gru_seq_reference(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse):
    validate("gru", "gru_seq", input, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, h_mask)
    return ref.gru_seq(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse)


@gru_seq.register("cpu", native="gru_seq", supports=_NATIVE)
@gru_seq.register("cuda", native="gru_seq", supports=_NATIVE)
def _gru_seq_native(*args):
    return torch.ops.fastnn.gru_seq(*args)


@rnn_seq.register("reference")
def _rnn_seq_reference(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse, nonlinearity):
    validate("rnn", "rnn_seq", input, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, h_mask)
    return ref.rnn_seq(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, h_mask, reverse, nonlinearity)


@rnn_seq.register("cpu", native="rnn_seq", supports=_NATIVE)
@rnn_seq.register("cuda", native="rnn_seq", supports=_NATIVE)
def _rnn_seq_native(*args):
    return torch.ops.fastnn.rnn_seq(*args)


def _validate_cell(kind, op, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    _check_cell_input(op, input)
    validate(kind, op, input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh)


@lstm_cell.register("reference")
def _lstm_cell_reference(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    _validate_cell("lstm", "lstm_cell", input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return ref.lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


@lstm_cell.register("cpu", native="lstm_cell", supports=_NATIVE)
@lstm_cell.register("cuda", native="lstm_cell", supports=_NATIVE)
def _lstm_cell_native(*args):
    return torch.ops.fastnn.lstm_cell(*args)


@gru_cell.register("reference")
def _gru_cell_reference(input, hx, w_ih, w_hh, b_ih, b_hh):
    _validate_cell("gru", "gru_cell", input, hx, None, w_ih, w_hh, b_ih, b_hh)
    return ref.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


@gru_cell.register("cpu", native="gru_cell", supports=_NATIVE)
@gru_cell.register("cuda", native="gru_cell", supports=_NATIVE)
def _gru_cell_native(*args):
    return torch.ops.fastnn.gru_cell(*args)


# ---------------------------------------------------------------------------------------------
# Triton cells: fastnn::triton_lstm_cell / triton_gru_cell (torch.library.triton_op, so that
# torch.compile sees the kernels) with the signatures and workspace of the compiled cells, and
# backward ops of the same convention: a Triton pointwise kernel, then torch GEMMs in fp32.

_BLOCK_B, _BLOCK_H, _BLOCK_K, _BLOCK = 16, 32, 32, 1024


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: no TF32, to match the reference


def _grid(B: int, H: int):
    import triton
    return (triton.cdiv(B, _BLOCK_B), triton.cdiv(H, _BLOCK_H))


def _empty_grads(inputs, need):
    ref_t = inputs[0]
    return [ref_t.new_empty(ref.EMPTY_GRAD) for _ in need]


def _finish_grads(pairs, inputs, need):
    """pairs: gradient (fp32) per input slot or None; cast to each input's dtype, empty if unwanted."""
    out = []
    for g, x, n in zip(pairs, inputs, need):
        if n and x is not None and g is not None:
            out.append(g.to(x.dtype).reshape(x.shape))
        else:
            out.append(inputs[0].new_empty(ref.EMPTY_GRAD))
    return tuple(out)


def _kernels():
    # Imported on first use: importing fastnn does not import Triton.
    from ..kernels import rnn as tk
    return tk


def _register_triton() -> None:
    if not hasattr(torch.library, "triton_op"):
        return
    from torch.library import triton_op, wrap_triton

    @triton_op("fastnn::triton_lstm_cell", mutates_args=())
    def triton_lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                         b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        B, I = input.shape
        H = w_hh.shape[1]
        hy, cy = torch.empty_like(hx), torch.empty_like(cx)
        ws = input.new_empty((B, 5 * H), dtype=torch.float32)
        if B > 0:
            x, h, c = input.contiguous(), hx.contiguous(), cx.contiguous()
            has_bias = b_ih is not None
            wrap_triton(_kernels().lstm_cell_fwd)[_grid(B, H)](
                x, h, c, w_ih.contiguous(), w_hh.contiguous(), b_ih if has_bias else x, b_hh if has_bias else x,
                hy, cy, ws, B, I, H, HAS_BIAS=has_bias, PRECISION=_precision(input.dtype), BLOCK_B=_BLOCK_B,
                BLOCK_H=_BLOCK_H, BLOCK_K=_BLOCK_K)
        return hy, cy, ws

    @triton_op("fastnn::triton_gru_cell", mutates_args=())
    def triton_gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                        b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        B, I = input.shape
        H = w_hh.shape[1]
        hy = torch.empty_like(hx)
        ws = input.new_empty((B, 4 * H), dtype=torch.float32)
        if B > 0:
            x, h = input.contiguous(), hx.contiguous()
            has_bias = b_ih is not None
            wrap_triton(_kernels().gru_cell_fwd)[_grid(B, H)](
                x, h, w_ih.contiguous(), w_hh.contiguous(), b_ih if has_bias else x, b_hh if has_bias else x,
                hy, ws, B, I, H, HAS_BIAS=has_bias, PRECISION=_precision(input.dtype), BLOCK_B=_BLOCK_B,
                BLOCK_H=_BLOCK_H, BLOCK_K=_BLOCK_K)
        return hy, ws

    @triton_op("fastnn::triton_lstm_cell_backward", mutates_args=())
    def triton_lstm_cell_backward(grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor, hx: Tensor,
                                  cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                                  b_hh: Optional[Tensor], hy: Tensor, workspace: Tensor,
                                  output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, H = cx.shape
        dhy = grad_hy.contiguous() if grad_hy is not None else torch.zeros_like(hx)
        dcy = grad_cy.contiguous() if grad_cy is not None else torch.zeros_like(cx)
        dg = input.new_empty((B, 4 * H), dtype=torch.float32)
        dcx = input.new_empty((B, H), dtype=torch.float32)
        if B > 0:
            import triton
            wrap_triton(_kernels().lstm_cell_bwd)[(triton.cdiv(B * H, _BLOCK),)](
                workspace.contiguous(), cx.contiguous(), dhy, dcy, dg, dcx, B * H, H, BLOCK=_BLOCK)
        db = dg.sum(0)
        grads = [dg @ w_ih.float(), dg @ w_hh.float(), dcx, dg.t() @ input.float(), dg.t() @ hx.float(), db, db.clone()]
        return _finish_grads(grads, [input, hx, cx, w_ih, w_hh, b_ih, b_hh], output_mask)

    @triton_op("fastnn::triton_gru_cell_backward", mutates_args=())
    def triton_gru_cell_backward(grad_hy: Optional[Tensor], input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                                 b_ih: Optional[Tensor], b_hh: Optional[Tensor], hy: Tensor, workspace: Tensor,
                                 output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, H = hx.shape
        dhy = grad_hy.contiguous() if grad_hy is not None else torch.zeros_like(hx)
        dgi = input.new_empty((B, 3 * H), dtype=torch.float32)
        dgh = input.new_empty((B, 3 * H), dtype=torch.float32)
        direct = input.new_empty((B, H), dtype=torch.float32)
        if B > 0:
            import triton
            wrap_triton(_kernels().gru_cell_bwd)[(triton.cdiv(B * H, _BLOCK),)](
                workspace.contiguous(), hx.contiguous(), dhy, dgi, dgh, direct, B * H, H, BLOCK=_BLOCK)
        grads = [dgi @ w_ih.float(), dgh @ w_hh.float() + direct, dgi.t() @ input.float(), dgh.t() @ hx.float(),
                 dgi.sum(0), dgh.sum(0)]
        return _finish_grads(grads, [input, hx, w_ih, w_hh, b_ih, b_hh], output_mask)

    for fwd, bwd, spec in ((triton_lstm_cell, triton_lstm_cell_backward, SPECS["lstm_cell"]),
                           (triton_gru_cell, triton_gru_cell_backward, SPECS["gru_cell"])):
        bw, setup = _autograd(spec, bwd)
        fwd.register_autograd(bw, setup_context=setup)
        # Explicit fake kernels: tracing the launchers with fake tensors needs a GPU (under the
        # Triton interpreter the launch touches real storage).
        fwd.register_fake(_fake_forward(spec))
        bwd.register_fake(_fake_backward(spec))

    def _triton_dtypes(input, *args, **kwargs):
        if input.dtype not in TRITON_DTYPES:
            return f"argument 'input' is {input.dtype}; the Triton kernel covers float32, bfloat16, float16"
        return None

    @lstm_cell.register("triton", supports=_triton_dtypes)
    def _lstm_cell_triton(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        _validate_cell("lstm", "lstm_cell", input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        return torch.ops.fastnn.triton_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)

    @gru_cell.register("triton", supports=_triton_dtypes)
    def _gru_cell_triton(input, hx, w_ih, w_hh, b_ih, b_hh):
        _validate_cell("gru", "gru_cell", input, hx, None, w_ih, w_hh, b_ih, b_hh)
        return torch.ops.fastnn.triton_gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


_register_triton()

"""Pure-PyTorch recurrent ops with the exact signatures of the ``fastnn::*_seq`` / ``*_cell`` ops.

They are the test oracle, the benchmark's "same math, no fusion" point and the fallback of last
resort. Everything is differentiable by autograd; the ``*_backward`` references recompute the
forward under autograd (they ignore the saved workspace), which makes them an independent check
of the kernels' hand-written backward.

Conventions shared with the kernels (csrc/rnn/rnn.h):

* One layer, one direction. ``input`` is time-major ``[T, B, I]``; weights use torch.nn's layout
  and gate order (LSTM i, f, g, o; GRU r, z, n).
* ``lengths`` (int64 ``[B]``, optional): sequence ``b`` occupies steps ``0 .. lengths[b]-1``. Later
  steps leave the state untouched and produce zeros in ``output`` and ``workspace``; with
  ``reverse`` the recurrence for ``b`` starts at step ``lengths[b]-1`` from ``h0``. This is what a
  ``PackedSequence`` means, in padded form.
* ``h_mask`` (optional, ``[B, P]``): variational recurrent dropout. The state is multiplied by it
  where it enters the recurrent matrix product (not in the carried state or the output).
* ``workspace`` holds what the backward needs, computed in the op's math dtype (float32 for
  bf16/fp16 inputs): LSTM ``[T, B, 5H]`` = activated gates i, f, g, o and the cell state; GRU
  ``[T, B, 4H]`` = r, z, n and ``W_hn h + b_hn``; RNN ``[T, B, 0]`` (the output suffices).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "lstm_seq", "gru_seq", "rnn_seq", "lstm_seq_backward", "gru_seq_backward", "rnn_seq_backward",
    "lstm_cell", "gru_cell", "lstm_cell_backward", "gru_cell_backward", "math_dtype", "EMPTY_GRAD",
]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pointwise math and the workspace use: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_step(t: int, lengths: Optional[Tensor], new: Tensor, old: Tensor) -> Tensor:
    if lengths is None:
        return new
    return torch.where((t < lengths).unsqueeze(-1), new, old)


def _zero_inactive(t: int, lengths: Optional[Tensor], x: Tensor) -> Tensor:
    if lengths is None:
        return x
    return torch.where((t < lengths).unsqueeze(-1), x, torch.zeros_like(x))


def _recurrent_in(h: Tensor, h_mask: Optional[Tensor]) -> Tensor:
    return h if h_mask is None else h * h_mask


def _run(step, input: Tensor, states: list[Tensor], w_ih: Tensor, b_ih: Optional[Tensor], lengths: Optional[Tensor],
         reverse: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """The time loop shared by the three cells. ``step(gi_t, states) -> (out_t, new_states, ws_t)``."""
    T = input.shape[0]
    gi = F.linear(input, w_ih, b_ih)  # the input projection of every step at once
    outs: list[Optional[Tensor]] = [None] * T
    wss: list[Optional[Tensor]] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        out_t, new, ws_t = step(gi[t], states)
        states = [_masked_step(t, lengths, n, o) for n, o in zip(new, states)]
        outs[t] = _zero_inactive(t, lengths, out_t)
        wss[t] = _zero_inactive(t, lengths, ws_t)
    if T == 0:
        B = input.shape[1]
        out = input.new_empty((0, B, states[0].shape[-1]))
        ws = None
    else:
        out = torch.stack(outs)  # type: ignore[arg-type]
        ws = torch.stack(wss)  # type: ignore[arg-type]
    return out, states, ws  # type: ignore[return-value]


def lstm_seq(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, w_hr: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
             h_mask: Optional[Tensor] = None, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer and direction over a time-major sequence.

    Arguments (G = 4H gate rows in torch.nn's order i, f, g, o; P = proj_size, or H without one;
    every float tensor has ``input``'s dtype and device):

    * ``input`` [T, B, I]: float32, float64, bfloat16 or float16.
    * ``h0`` [B, P], ``c0`` [B, H]: the initial hidden and cell states.
    * ``w_ih`` [G, I], ``w_hh`` [G, P], ``b_ih`` / ``b_hh`` [G] or None (each on its own).
    * ``w_hr`` [P, H] or None: torch.nn.LSTM's projection (``proj_size``).
    * ``lengths`` int64 [B] or None: sequence b occupies steps 0 .. lengths[b]-1 (values in [0, T]).
    * ``h_mask`` [B, P] or None: variational recurrent dropout mask on the state entering W_hh.
    * ``reverse``: run from the last step to the first.

    Returns ``(output [T, B, P], h_n [B, P], c_n [B, H], workspace [T, B, 5H])``; the workspace
    (activated gates and cell state, float32 for bf16/fp16 inputs) is what the backward reads.
    """
    H = w_hh.shape[1] if w_hr is None else w_hr.shape[1]

    def step(gi_t, states):
        h, c = states
        gates = gi_t + F.linear(_recurrent_in(h, h_mask), w_hh, b_hh)
        i, f, g, o = gates.chunk(4, -1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c2 = f * c + i * g
        h2 = o * c2.tanh()
        if w_hr is not None:
            h2 = F.linear(h2, w_hr)
        return h2, [h2, c2], torch.cat([i, f, g, o, c2], -1)

    out, (hn, cn), ws = _run(step, input, [h0, c0], w_ih, b_ih, lengths, reverse)
    if ws is None:
        ws = input.new_empty((0, input.shape[1], 5 * H))
    return out, hn, cn, ws.to(math_dtype(input.dtype))


def gru_seq(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
            b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None, h_mask: Optional[Tensor] = None,
            reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One GRU layer and direction, with torch's ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``.

    Arguments as :func:`lstm_seq`'s (G = 3H gate rows r, z, n; no cell state, no projection):
    ``input`` [T, B, I], ``h0`` [B, H], ``w_ih`` [G, I], ``w_hh`` [G, H], ``b_ih`` / ``b_hh`` [G] or
    None, ``lengths`` int64 [B] or None, ``h_mask`` [B, H] or None, ``reverse``.

    Returns ``(output [T, B, H], h_n [B, H], workspace [T, B, 4H])`` (workspace: r, z, n and
    ``W_hn h + b_hn``, float32 for bf16/fp16 inputs).
    """
    H = w_hh.shape[1]

    def step(gi_t, states):
        (h,) = states
        gh = F.linear(_recurrent_in(h, h_mask), w_hh, b_hh)
        xr, xz, xn = gi_t.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = (xr + hr).sigmoid()
        z = (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        h2 = (1 - z) * n + z * h
        return h2, [h2], torch.cat([r, z, n, hn], -1)

    out, (hn,), ws = _run(step, input, [h0], w_ih, b_ih, lengths, reverse)
    if ws is None:
        ws = input.new_empty((0, input.shape[1], 4 * H))
    return out, hn, ws.to(math_dtype(input.dtype))


def rnn_seq(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
            b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None, h_mask: Optional[Tensor] = None,
            reverse: bool = False, nonlinearity: str = "tanh") -> tuple[Tensor, Tensor, Tensor]:
    """One Elman RNN layer and direction: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``.

    Arguments as :func:`gru_seq`'s with G = H, and ``nonlinearity`` "tanh" or "relu".
    Returns ``(output [T, B, H], h_n [B, H], workspace [T, B, 0])``.
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"fastnn: argument 'nonlinearity': expected 'tanh' or 'relu', got {nonlinearity!r}")
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def step(gi_t, states):
        (h,) = states
        h2 = act(gi_t + F.linear(_recurrent_in(h, h_mask), w_hh, b_hh))
        return h2, [h2], h2.new_empty((h2.shape[0], 0))

    out, (hn,), ws = _run(step, input, [h0], w_ih, b_ih, lengths, reverse)
    if ws is None:
        ws = input.new_empty((0, input.shape[1], 0))
    return out, hn, ws.to(math_dtype(input.dtype))


# ---------------------------------------------------------------------------------------------
# Backward references: recompute the forward under autograd. ``output_mask[k]`` says whether the
# k-th differentiable input needs its gradient; a gradient not asked for comes back as an empty
# tensor, as the kernels return it (a custom op cannot return None).

EMPTY_GRAD = (0,)


def _grads(fn, diff_inputs: list[Optional[Tensor]], output_mask: list[bool], outputs_grads: list[Optional[Tensor]]):
    leaves = []
    for x, need in zip(diff_inputs, output_mask):
        leaves.append(x.detach().requires_grad_(True) if (x is not None and need) else
                      (x.detach() if x is not None else None))
    with torch.enable_grad():
        outs = fn(*leaves)
        pairs = [(o, g) for o, g in zip(outs, outputs_grads) if g is not None and o.requires_grad]
        wanted = [x for x, need in zip(leaves, output_mask) if x is not None and need]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs and wanted else [None] * len(wanted)
    it = iter(got)
    result = []
    for x, need in zip(leaves, output_mask):
        if x is not None and need:
            g = next(it)
            result.append(torch.zeros_like(x) if g is None else g)
        else:
            ref = x if x is not None else diff_inputs[0]
            result.append(ref.new_empty(EMPTY_GRAD))
    return tuple(result)


def lstm_seq_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
                      input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                      b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
                      h_mask: Optional[Tensor], reverse: bool, output: Tensor, workspace: Tensor,
                      output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)."""
    def fn(x, h, c, wi, wh, bi, bh, wr):
        return lstm_seq(x, h, c, wi, wh, bi, bh, wr, lengths, h_mask, reverse)[:3]
    return _grads(fn, [input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr], output_mask, [grad_output, grad_h_n, grad_c_n])


def gru_seq_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, h0: Tensor,
                     w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                     lengths: Optional[Tensor], h_mask: Optional[Tensor], reverse: bool, output: Tensor,
                     workspace: Tensor, output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, h0, w_ih, w_hh, b_ih, b_hh)."""
    def fn(x, h, wi, wh, bi, bh):
        return gru_seq(x, h, wi, wh, bi, bh, lengths, h_mask, reverse)[:2]
    return _grads(fn, [input, h0, w_ih, w_hh, b_ih, b_hh], output_mask, [grad_output, grad_h_n])


def rnn_seq_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, h0: Tensor,
                     w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                     lengths: Optional[Tensor], h_mask: Optional[Tensor], reverse: bool, nonlinearity: str,
                     output: Tensor, workspace: Tensor, output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, h0, w_ih, w_hh, b_ih, b_hh)."""
    def fn(x, h, wi, wh, bi, bh):
        return rnn_seq(x, h, wi, wh, bi, bh, lengths, h_mask, reverse, nonlinearity)[:2]
    return _grads(fn, [input, h0, w_ih, w_hh, b_ih, b_hh], output_mask, [grad_output, grad_h_n])


# ---------------------------------------------------------------------------------------------
# Cells: one step, ``input [B, I]``. The workspace is the sequence op's, for one step: ``[B, 5H]``
# (LSTM) or ``[B, 4H]`` (GRU).

def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM step: ``input`` [B, I], ``hx`` / ``cx`` [B, H], ``w_ih`` [4H, I], ``w_hh`` [4H, H],
    ``b_ih`` / ``b_hh`` [4H] or None (float32, float64, bfloat16 or float16, all of ``input``'s dtype
    and device). Returns ``(hy [B, H], cy [B, H], workspace [B, 5H])``."""
    out, hy, cy, ws = lstm_seq(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh, None, None, None, False)
    return hy, cy, ws[0]


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One GRU step: ``input`` [B, I], ``hx`` [B, H], ``w_ih`` [3H, I], ``w_hh`` [3H, H], ``b_ih`` /
    ``b_hh`` [3H] or None (float32, float64, bfloat16 or float16, all of ``input``'s dtype and
    device). Returns ``(hy [B, H], workspace [B, 4H])``."""
    out, hy, ws = gru_seq(input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, None, None, False)
    return hy, ws[0]


def lstm_cell_backward(grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor, hx: Tensor, cx: Tensor,
                       w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], hy: Tensor,
                       workspace: Tensor, output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, hx, cx, w_ih, w_hh, b_ih, b_hh)."""
    def fn(x, h, c, wi, wh, bi, bh):
        return lstm_cell(x, h, c, wi, wh, bi, bh)[:2]
    return _grads(fn, [input, hx, cx, w_ih, w_hh, b_ih, b_hh], output_mask, [grad_hy, grad_cy])


def gru_cell_backward(grad_hy: Optional[Tensor], input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                      b_ih: Optional[Tensor], b_hh: Optional[Tensor], hy: Tensor, workspace: Tensor,
                      output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, hx, w_ih, w_hh, b_ih, b_hh)."""
    def fn(x, h, wi, wh, bi, bh):
        return gru_cell(x, h, wi, wh, bi, bh)[:1]
    return _grads(fn, [input, hx, w_ih, w_hh, b_ih, b_hh], output_mask, [grad_hy])

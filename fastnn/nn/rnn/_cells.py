"""fastnn.LSTMCell, GRUCell, RNNCell: torch.nn's cells on fastnn's one-step ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ... import ops
from ..._checks import fail
from ._common import DOC_BACKENDS, FastnnRepr, autocast_dtype, cast, check_on, check_state, without_autocast

__all__ = ["LSTMCell", "GRUCell", "RNNCell"]


def _cell_args(cell: nn.RNNCellBase, input: Tensor, hx, n_states: int):
    """torch's cell checks, batching and autocast; returns (input [B, I], states [B, H] each,
    weights (w_ih, w_hh, b_ih, b_hh), is_batched, autocast's dtype or None)."""
    name = type(cell).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    states = None if hx is None else (list(hx) if n_states == 2 else [hx])
    if states is not None:
        for i, s in enumerate(states):
            if s.dim() not in (1, 2):
                what = f"hx[{i}]" if n_states == 2 else "hidden state"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
        states = None if states is None else [s.unsqueeze(0) for s in states]
    B = input.size(0)
    if states is None:
        states = [torch.zeros(B, cell.hidden_size, dtype=input.dtype, device=input.device) for _ in range(n_states)]
    # The checks (and words) of torch's C++ cells.
    if input.size(1) != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}")
    for i, s in enumerate(states):
        if s.size(0) != B:
            raise RuntimeError(f"Input batch size {B} doesn't match hidden{i} batch size {s.size(0)}")
        if s.size(1) != cell.hidden_size:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {s.size(1)}, expected {cell.hidden_size}")
    weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    dtype = autocast_dtype(input)
    if dtype is not None:
        input = cast(input, dtype)
        states = [cast(s, dtype) for s in states]
        weights = [cast(w, dtype) for w in weights]
    elif input.dtype != weights[0].dtype:
        fail("input", f"the parameters' dtype {weights[0].dtype}", input)
    check_on(weights[0], input)
    for i, s in enumerate(states):
        check_state("hx" if n_states == 1 else ("hx", "cx")[i], s, input)
    return input, states, weights, is_batched, dtype


_CELL_DOC = """
    Arguments: ``input_size``, ``hidden_size``, ``bias`` (default True), ``device``, ``dtype``{extra}, as
    torch's. Forward: ``input`` [B, input_size] or [input_size]; ``{state}`` (default zeros) {shape}.
    Returns {returns}. Under ``torch.autocast`` the step runs in the autocast dtype.

    """ + DOC_BACKENDS


class LSTMCell(FastnnRepr, nn.LSTMCell):
    __doc__ = ("``torch.nn.LSTMCell`` on ``fastnn.ops.lstm_cell`` (both GEMMs and the gate math fused).\n"
               + _CELL_DOC.format(extra="", state="hx", shape="a tuple (h_0, c_0), each [B, hidden_size]",
                                  returns="``(h_1, c_1)``"))

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        x, (h, c), w, is_batched, dtype = _cell_args(self, input, hx, 2)
        with without_autocast(dtype, x):
            hy, cy, _ = ops.lstm_cell.trusted(x, h, c, *w)
        if not is_batched:
            hy, cy = hy.squeeze(0), cy.squeeze(0)
        return hy, cy


class GRUCell(FastnnRepr, nn.GRUCell):
    __doc__ = ("``torch.nn.GRUCell`` on ``fastnn.ops.gru_cell``.\n"
               + _CELL_DOC.format(extra="", state="hx", shape="[B, hidden_size]", returns="``h_1``"))

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), w, is_batched, dtype = _cell_args(self, input, hx, 1)
        with without_autocast(dtype, x):
            hy, _ = ops.gru_cell.trusted(x, h, *w)
        return hy if is_batched else hy.squeeze(0)


class RNNCell(FastnnRepr, nn.RNNCell):
    __doc__ = ("``torch.nn.RNNCell`` on one step of ``fastnn.ops.rnn_seq``.\n"
               + _CELL_DOC.format(extra=", ``nonlinearity`` ('tanh' or 'relu')", state="hx",
                                  shape="[B, hidden_size]", returns="``h_1``"))

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), w, is_batched, dtype = _cell_args(self, input, hx, 1)
        with without_autocast(dtype, x):
            _, hy, _ = ops.rnn_seq.trusted(x.unsqueeze(0), h, *w, None, None, False, self.nonlinearity)
        return hy if is_batched else hy.squeeze(0)

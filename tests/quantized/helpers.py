"""Shared builders for the quantized tests."""

import pytest
import torch

from fastnn import _extension
from fastnn.ops import quantized as qops
from fastnn.reference import quantized as ref


def needs_cpu_kernels():
    if _extension.load() is None or not _extension.has_kernel("int8_linear", "CPU"):
        why = _extension.error() or "the loaded library was built without csrc/quantized"
        pytest.skip(f"the compiled quantized kernels are not available here ({why})")


def weights(rows: int, cols: int, gen=None):
    return ref.quantize_weight(torch.randn(rows, cols, generator=gen) / max(cols, 1) ** 0.5)


def lstm_args(T: int, B: int, I: int, H: int, gates: int = 4, bias: bool = True, proj: int = 0):
    """Arguments of a sequence op; ``proj``: an LSTM's proj_size (``w`` then ends with w_hr, its scales)."""
    P = proj or H
    w_ih, s_ih = weights(gates * H, I)
    w_hh, s_hh = weights(gates * H, P)
    b_ih = torch.randn(gates * H) * 0.1 if bias else None
    b_hh = torch.randn(gates * H) * 0.1 if bias else None
    x = torch.randn(T, B, I)
    h0, c0 = torch.randn(B, P) * 0.5, torch.randn(B, H) * 0.5
    return x, h0, c0, (w_ih, s_ih, w_hh, s_hh, b_ih, b_hh, *(weights(P, H) if proj else ()))


def run_seq(kind: str, backend: str, x, h0, c0, w, lengths=None, reverse=False, weight_only=False):
    if kind.startswith("lstm"):  # lstm / lstm_proj
        return qops.int8_lstm_seq.call(backend, x, h0, c0, *w[:6], lengths, reverse, weight_only, *w[6:])
    if kind.startswith("rnn"):  # rnn_tanh / rnn_relu
        return qops.int8_rnn_seq.call(backend, x, h0, *w, lengths, reverse, weight_only, kind[4:])
    return qops.int8_gru_seq.call(backend, x, h0, *w, lengths, reverse, weight_only)


GATES = {"lstm": 4, "lstm_proj": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def seq_args(kind: str, T: int, B: int, I: int, H: int):
    """lstm_args for ``kind``; "lstm_proj" projects to a size that is not a whole number of vectors."""
    return lstm_args(T, B, I, H, GATES[kind], proj=H // 2 + 3 if kind == "lstm_proj" else 0)

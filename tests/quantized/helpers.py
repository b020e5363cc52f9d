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


def lstm_args(T: int, B: int, I: int, H: int, gates: int = 4, bias: bool = True):
    w_ih, s_ih = weights(gates * H, I)
    w_hh, s_hh = weights(gates * H, H)
    b_ih = torch.randn(gates * H) * 0.1 if bias else None
    b_hh = torch.randn(gates * H) * 0.1 if bias else None
    x = torch.randn(T, B, I)
    h0, c0 = torch.randn(B, H) * 0.5, torch.randn(B, H) * 0.5
    return x, h0, c0, (w_ih, s_ih, w_hh, s_hh, b_ih, b_hh)


def run_seq(kind: str, backend: str, x, h0, c0, w, lengths=None, reverse=False, weight_only=False):
    if kind == "lstm":
        return qops.int8_lstm_seq.call(backend, x, h0, c0, *w, lengths, reverse, weight_only)
    if kind.startswith("rnn"):  # rnn_tanh / rnn_relu
        return qops.int8_rnn_seq.call(backend, x, h0, *w, lengths, reverse, weight_only, kind[4:])
    return qops.int8_gru_seq.call(backend, x, h0, *w, lengths, reverse, weight_only)


GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}

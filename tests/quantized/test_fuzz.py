"""Property-based tests of the int8 ops: drawn shapes (0, 1, odd), strides, special values and
lengths; each call matches the reference or raises fastnn's clear error, and never crashes."""

import pytest
import torch

from fastnn.ops import quantized as qops
from fastnn.reference import quantized as ref

from .helpers import needs_cpu_kernels

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

pytestmark = pytest.mark.fuzz

SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e38, -1e37, 1e-44, 0.0]


def _values(draw, shape, special: bool):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if special and x.numel():
        idx = draw(st.integers(0, x.numel() - 1))
        x.view(-1)[idx] = draw(st.sampled_from(SPECIALS))
    return x


@st.composite
def linear_case(draw):
    M = draw(st.sampled_from([0, 1, 2, 5]))
    K = draw(st.sampled_from([0, 1, 7, 31, 32, 33, 65]))
    N = draw(st.sampled_from([1, 3, 4, 9]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if layout == "transposed":
        x = _values(draw, (K, M), draw(st.booleans())).t()
    elif layout == "sliced":
        x = _values(draw, (M, 2 * K), draw(st.booleans()))[:, ::2]
    elif layout == "expanded":
        x = _values(draw, (1, K), draw(st.booleans())).expand(M, K)
    else:
        x = _values(draw, (M, K), draw(st.booleans()))
    w, s = ref.quantize_weight(torch.randn(N, K))
    if draw(st.booleans()) and K:
        w[0, 0] = -128  # outside the symmetric range: the kernels must still be exact
    bias = torch.randn(N) if draw(st.booleans()) else None
    return x, w, s, bias, draw(st.booleans())


def _same(got, want):
    # rows with NaN/inf/huge values are computed in fp64 on every backend: NaN and inf in the same
    # places; other rows agree to fp32 rounding
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)


@given(linear_case())
def test_int8_linear(case):
    needs_cpu_kernels()
    x, w, s, bias, weight_only = case
    x_before = x.clone()
    got = qops.int8_linear.call("cpu", x, w, s, bias, weight_only)
    want = qops.int8_linear.call("reference", x, w, s, bias, weight_only)
    assert got.shape == want.shape
    _same(got, want)
    assert torch.equal(x, x_before) or torch.isnan(x).any()  # inputs are never modified


@st.composite
def seq_case(draw):
    kind = draw(st.sampled_from(["lstm", "gru", "rnn"]))
    T, B = draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([0, 1, 3]))
    I, H = draw(st.sampled_from([1, 4, 33])), draw(st.sampled_from([1, 5, 8]))
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind] * H
    x = _values(draw, (B, T, I), draw(st.booleans())).transpose(0, 1)  # batch-first storage, time-major view
    # an LSTM's projection: h has P < H units (W_hr [P, H])
    P = draw(st.integers(1, H - 1)) if kind == "lstm" and H > 1 and draw(st.booleans()) else H
    w_ih, s_ih = ref.quantize_weight(torch.randn(G, I))
    w_hh, s_hh = ref.quantize_weight(torch.randn(G, P))
    proj = ref.quantize_weight(torch.randn(P, H)) if P != H else ()
    lengths = None
    if draw(st.booleans()) and B:
        lengths = torch.tensor(draw(st.lists(st.integers(-1, T + 1), min_size=B, max_size=B)), dtype=torch.int64)
    return kind, x, torch.zeros(B, P), torch.zeros(B, H), (w_ih, s_ih, w_hh, s_hh, torch.randn(G), None), \
        lengths, draw(st.booleans()), draw(st.booleans()), proj


@given(seq_case())
def test_int8_sequences(case):
    needs_cpu_kernels()
    kind, x, h0, c0, w, lengths, reverse, weight_only, proj = case
    op = {"lstm": qops.int8_lstm_seq, "gru": qops.int8_gru_seq, "rnn": qops.int8_rnn_seq}[kind]
    states = (h0, c0) if kind == "lstm" else (h0,)
    args = (x, *states, *w, lengths, reverse, weight_only) + (("relu",) if kind == "rnn" else proj)
    bad = lengths is not None and bool(((lengths < 0) | (lengths > x.shape[0])).any())
    if bad:
        for backend in ("cpu", "reference"):
            with pytest.raises(ValueError, match="lengths"):
                op.call(backend, *args)
        return
    got, want = op.call("cpu", *args), op.call("reference", *args)
    for g, r in zip(got, want):
        # relu states after a huge input are huge: compare them relative to their size
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-3, equal_nan=True)

"""Property-based tests of the recurrent ops (hypothesis, the global profile of tests/conftest.py):
lstm_seq / gru_seq / rnn_seq / lstm_cell / gru_cell on every backend that can serve the drawn
inputs, against the reference. Drawn: odd and zero sizes (T = 0, B = 0), dtypes, layouts
(transposed, sliced, expanded), either bias alone, NaN and huge inputs, and bad arguments (lengths
out of range or of the wrong shape or dtype, mismatched shapes). Each call must agree with the
reference or raise a clear Python error; the compiled ops called directly with bad arguments run
in a subprocess, so that a crash fails the test instead of killing the session."""

import pytest
import torch

from fastnn import backends, ops, testing
from fastnn.backends import BackendError
from fastnn.reference import rnn as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

pytestmark = pytest.mark.fuzz

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CLEAR_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, BackendError)


@st.composite
def _tensor(draw, shape, dtype, scale=0.5, special=False):
    """A tensor of ``shape`` in a drawn layout: contiguous, transposed (2-d), sliced or expanded."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    base = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    if layout == "transposed" and len(shape) == 2:
        t = base(shape[1], shape[0]).t()
    elif layout == "sliced" and len(shape) >= 1:
        t = base(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        t = base(1, *shape[1:]).expand(*shape)
    else:
        t = base(*shape)
    if special and t.numel() > 0:
        value = draw(st.sampled_from([None, float("nan"), float("inf"), 1e30]))
        if value is not None:
            t = t.clone()
            where = torch.unravel_index(torch.tensor(draw(st.integers(0, t.numel() - 1))), t.shape)
            t[tuple(int(i) for i in where)] = value
    return t


@st.composite
def _call(draw):
    """(op, reference, args, kwargs) of one drawn call, valid or not."""
    name = draw(st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell"]))
    kind = name.replace("_cell", "")
    cell = name.endswith("_cell")
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    T = 1 if cell else draw(st.sampled_from([0, 1, 2, 3, 5]))
    B = draw(st.sampled_from([0, 1, 2, 3]))
    I = draw(st.sampled_from([1, 2, 3, 7]))
    H = draw(st.sampled_from([1, 2, 5, 9]))
    G = GATES[kind] * H
    P = H
    w_hr = None
    if kind == "lstm" and not cell and H > 1 and draw(st.booleans()):
        P = draw(st.integers(1, H - 1))
        w_hr = draw(_tensor((P, H), dtype))
    x = draw(_tensor((B, I) if cell else (T, B, I), dtype, scale=1.0, special=True))
    h0 = draw(_tensor((B, P), dtype))
    c0 = draw(_tensor((B, H), dtype)) if kind == "lstm" else None
    w_ih, w_hh = draw(_tensor((G, I), dtype)), draw(_tensor((G, P), dtype))
    b_ih = draw(_tensor((G,), dtype)) if draw(st.booleans()) else None
    b_hh = draw(_tensor((G,), dtype)) if draw(st.booleans()) else None
    spoil = draw(st.sampled_from(["none"] * 6 + ["w_ih", "h0", "dtype", "lengths", "lengths_dtype", "lengths_shape"]))
    if spoil == "w_ih":
        w_ih = w_ih[:, :-1] if I > 1 else w_ih[:-1]
    elif spoil == "h0":
        h0 = torch.zeros(B + 1, P, dtype=dtype)
    elif spoil == "dtype":
        h0 = h0.to(torch.float64 if dtype == torch.float32 else torch.float32)
    if cell:
        op = ops.lstm_cell if kind == "lstm" else ops.gru_cell
        fn = ref.lstm_cell if kind == "lstm" else ref.gru_cell
        args = [x, h0, c0, w_ih, w_hh, b_ih, b_hh] if kind == "lstm" else [x, h0, w_ih, w_hh, b_ih, b_hh]
        return op, fn, args, {}
    lengths = None
    if draw(st.booleans()) or spoil.startswith("lengths"):
        lengths = torch.tensor([draw(st.integers(0, T)) for _ in range(B)], dtype=torch.int64)
        if spoil == "lengths" and B > 0:
            lengths[draw(st.integers(0, B - 1))] = draw(st.sampled_from([-1, T + 1, 2 ** 40]))
        elif spoil == "lengths_dtype":
            lengths = lengths.to(torch.int32)
        elif spoil == "lengths_shape":
            lengths = torch.zeros(B + 1, dtype=torch.int64)
    h_mask = draw(_tensor((B, P), dtype)) if draw(st.booleans()) else None
    reverse = draw(st.booleans())
    kw = dict(lengths=lengths, h_mask=h_mask, reverse=reverse)
    if kind == "lstm":
        return ops.lstm_seq, ref.lstm_seq, [x, h0, c0, w_ih, w_hh, b_ih, b_hh], dict(w_hr=w_hr, **kw)
    if kind == "gru":
        return ops.gru_seq, ref.gru_seq, [x, h0, w_ih, w_hh, b_ih, b_hh], kw
    return ops.rnn_seq, ref.rnn_seq, [x, h0, w_ih, w_hh, b_ih, b_hh], dict(nonlinearity=kind[4:], **kw)


def _backends_for(op, args, kwargs):
    out = []
    for b in backends.BACKENDS:
        if b in op.impls:
            try:
                if op.reason(b, *args, **kwargs) is None:
                    out.append(b)
            except CLEAR_ERRORS:
                pass
    return out


@given(_call())
def test_every_backend_agrees_with_the_reference_or_raises_clearly(call):
    op, fn, args, kwargs = call
    snapshot = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        want = op.call("reference", *args, **kwargs)
    except CLEAR_ERRORS as exc:
        assert "fastnn" in str(exc), f"unclear error: {exc!r}"
        # every backend gives the same error (the checks run before the backend is chosen)
        for b in _backends_for(op, args, kwargs) + ["reference"]:
            with pytest.raises(type(exc)) as info:
                with backends.force(b):
                    op(*args, **kwargs)
            assert str(info.value) == str(exc), b
        return
    for b in _backends_for(op, args, kwargs):
        if b == "reference":
            continue
        with backends.force(b):
            got = op(*args, **kwargs)
        assert len(got) == len(want)
        for g_, w_ in zip(got, want):
            assert g_.shape == w_.shape and g_.dtype == w_.dtype, b
            # NaN/inf inputs: the same positions must be non-finite; elsewhere, the tolerance
            if not torch.isfinite(w_).all() or not torch.isfinite(g_).all():
                assert torch.equal(torch.isnan(g_), torch.isnan(w_)), b
                continue
            testing.assert_close(g_, w_, msg=f"{op.name} on {b}")
    for a, s in zip(args, snapshot):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, s) or (torch.isnan(a) == torch.isnan(s)).all(), "an input was modified"


PROBE = r'''
import torch
import fastnn
from fastnn.reference import rnn as ref
fastnn._extension.load()  # the compiled ops register on first use
torch.manual_seed(0)
B, I, H = 3, 4, 5
x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
w_ih, w_hh, b = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H)
hy, cy, ws = ref.lstm_cell(x, h, c, w_ih, w_hh, b, b)
gh = torch.randn(B, H)
probes = {
    "short workspace": lambda: torch.ops.fastnn.lstm_cell_backward(gh, gh, x, h, c, w_ih, w_hh, b, b, hy, ws[:, :3], [True] * 7),
    "short hy": lambda: torch.ops.fastnn.lstm_cell_backward(gh, gh, x, h, c, w_ih, w_hh, b, b, hy[:1], ws, [True] * 7),
    "short w_hh": lambda: torch.ops.fastnn.lstm_cell(x, h, c, w_ih, w_hh[:, :2], b, b),
    "seq lengths too short": lambda: torch.ops.fastnn.lstm_seq(x[None], h, c, w_ih, w_hh, b, b, None,
                                                              torch.ones(1, dtype=torch.int64), None, False),
    "seq short grad": lambda: torch.ops.fastnn.gru_seq_backward(torch.randn(1, 1, 1), None, x[None], h,
                                                               torch.randn(3 * H, I), torch.randn(3 * H, H), None,
                                                               None, None, None, False, torch.randn(1, B, H),
                                                               torch.randn(1, B, 4 * H), [True] * 6),
}
ok = 0
for name, probe in probes.items():
    try:
        probe()
        print("NO ERROR", name)
    except (ValueError, RuntimeError) as exc:
        assert "fastnn" in str(exc), (name, str(exc))
        ok += 1
print("clear errors:", ok, "of", len(probes))
'''


def test_compiled_ops_called_directly_with_bad_arguments_raise():
    """torch.ops.fastnn.* (and the *_backward ops) with shapes that would make a kernel read past a
    buffer: an error naming the argument, in a subprocess so that a crash fails only this test.
    (The Triton backward ops' checks are in test_triton.py.)"""
    if not ops.lstm_cell.available(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(4, 1),
                                   torch.zeros(4, 1), None, None).count("cpu"):
        pytest.skip("the compiled library is not loaded")
    proc = testing.run_isolated(PROBE)
    assert proc.returncode == 0, f"crashed or failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "NO ERROR" not in proc.stdout, proc.stdout

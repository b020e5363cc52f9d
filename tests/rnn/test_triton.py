"""The Triton LSTM/GRU cells (fastnn::triton_*_cell) with operands in any layout and either bias
alone, against the reference (under TRITON_INTERPRET=1 on a machine without a GPU)."""

import pytest
import torch

from fastnn import backends, ops, testing
from fastnn.reference import rnn as ref

GATES = {"lstm": 4, "gru": 3}


def _op(kind):
    return ops.lstm_cell if kind == "lstm" else ops.gru_cell


def _ref(kind):
    return ref.lstm_cell if kind == "lstm" else ref.gru_cell


def _cell_args(kind, B=3, I=5, H=6, *, layout="contiguous", biases=("ih", "hh")):
    g = torch.Generator().manual_seed(7)
    G = GATES[kind] * H

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    def state():
        if layout == "transposed":  # [B, H] with strides (1, B)
            return t(H, B).t()
        if layout == "sliced":
            return t(B, 2 * H)[:, ::2]
        return t(B, H)

    def bias():
        if layout == "sliced":
            return t(2 * G)[::2]
        if layout == "expanded":
            return t(1).expand(G)
        return t(G)

    x = t(I, B).t() if layout == "transposed" else t(B, I)
    w_ih = t(I, G).t() if layout == "transposed" else t(G, I)
    w_hh = t(H, G).t() if layout == "transposed" else t(G, H)
    b_ih = bias() if "ih" in biases else None
    b_hh = bias() if "hh" in biases else None
    states = [state(), state()] if kind == "lstm" else [state()]
    return [x, *states, w_ih, w_hh, b_ih, b_hh]


def _run_both(kind, args):
    testing.backend_or_skip(_op(kind), "triton", *args)
    leaves = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args]
    with backends.force("triton"):
        got = _op(kind)(*leaves)
    want = _ref(kind)(*args)
    for g_, w_ in zip(got, want):
        testing.assert_close(g_, w_)
        assert g_.is_contiguous()
    return leaves, got


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_triton_cell_any_layout(kind, layout):
    _run_both(kind, _cell_args(kind, layout=layout))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("biases", [("hh",), ("ih",), ()], ids=lambda b: "+".join(b) or "none")
def test_triton_cell_either_bias_alone(kind, biases):
    """Each bias is added (and gets its gradient) on its own: b_ih=None must not drop b_hh."""
    args = _cell_args(kind, biases=biases)
    leaves, got = _run_both(kind, args)
    weights = [torch.randn_like(o) for o in got[:-1]]
    present = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got[:-1], weights)), present)
    ref_leaves = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args]
    want = _ref(kind)(*ref_leaves)
    ref_present = [x for x in ref_leaves if x is not None]
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want[:-1], weights)), ref_present)
    for g_, w_ in zip(grads, ref_grads):
        testing.assert_close(g_, w_)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_triton_backward_op_checks_the_workspace(kind):
    """The public backward op reads the workspace by B and H: a wrong one is a clear error, not a
    read past its end."""
    args = _cell_args(kind)
    testing.backend_or_skip(_op(kind), "triton", *args)
    fwd = _ref(kind)(*args)
    bad_ws = fwd[-1][:, :-1]
    bargs = [torch.randn_like(o) for o in fwd[:-1]] + args + [fwd[0], bad_ws, [True] * len(args)]
    with pytest.raises(ValueError, match=f"triton_{kind}_cell_backward: workspace"):
        getattr(torch.ops.fastnn, f"triton_{kind}_cell_backward")(*bargs)

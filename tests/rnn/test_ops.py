"""fastnn.ops.{lstm,gru,rnn}_seq and lstm_cell/gru_cell against fastnn.reference.rnn, on every backend:
forward outputs and workspace, the hand-written backward ops, opcheck, gradcheck and bad input."""

import contextlib
import pytest
import torch

from fastnn import backends, ops, testing
from fastnn.reference import rnn as ref

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# (T, B, I, H): size 1 everywhere, odd sizes, a hidden size that is not a multiple of the vector width,
# batch 1 over enough steps for the CPU's packed float32 path (its batch-1 dot products), with a tail
# (kept small: the random weights grow with H, and at H ~ 20 a plain RNN's gradients reach ~20, where
# float32 rounding alone exceeds the elementwise tolerance)
SHAPES = [(1, 1, 1, 1), (5, 3, 7, 9), (4, 2, 16, 24), (6, 1, 5, 13), (3, 0, 4, 5), (0, 2, 3, 4)]
# per call: projection (LSTM only), padding lengths, variational mask, direction, biases
CONFIGS = [
    dict(),
    dict(reverse=True),
    dict(lengths=True),
    dict(lengths=True, reverse=True, mask=True),
    dict(bias=False, mask=True),
    dict(proj=True, lengths=True, reverse=True),
]


def _cfg_id(c):
    return "-".join(k for k, v in c.items() if v) or "plain"


def make_args(kind, T, B, I, H, dtype=torch.float64, device="cpu", *, proj=False, lengths=False, mask=False,
              reverse=False, bias=True, requires_grad=False):
    """The positional arguments of the op for ``kind`` (the seq op)."""
    g = torch.Generator().manual_seed(T * 1000 + B * 100 + I * 10 + H)
    G = GATES[kind] * H
    P = max(1, H // 2) if (proj and kind == "lstm" and H > 1) else H

    def t(*shape, scale=0.5):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return x.requires_grad_(requires_grad)

    x = t(T, B, I, scale=1.0)
    h0 = t(B, P)
    w_ih, w_hh = t(G, I), t(G, P)
    b_ih, b_hh = (t(G), t(G)) if bias else (None, None)
    lens = None
    if lengths and B > 0:
        lens = torch.randint(0, T + 1, (B,), generator=g).to(device)
        lens[0] = T  # the longest sequence fills the buffer, as with a PackedSequence
    hm = None
    if mask:
        hm = ((torch.rand(B, P, generator=g) > 0.3).to(torch.float64) / 0.7).to(dtype=dtype, device=device)
    if kind == "lstm":
        c0 = t(B, H)
        w_hr = t(P, H) if P != H else None
        return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, hm, reverse]
    args = [x, h0, w_ih, w_hh, b_ih, b_hh, lens, hm, reverse]
    if kind.startswith("rnn"):
        args.append(kind[4:])
    return args


def seq_op(kind):
    return {"lstm": ops.lstm_seq, "gru": ops.gru_seq}.get(kind, ops.rnn_seq)


def ref_fn(kind):
    return {"lstm": ref.lstm_seq, "gru": ref.gru_seq}.get(kind, ref.rnn_seq)


def n_diff(kind):
    return 8 if kind == "lstm" else 6


# projections exist for LSTM only
KIND_CFGS = [(k, c) for k in KINDS for c in CONFIGS if k == "lstm" or not c.get("proj")]


@pytest.mark.parametrize("kind,cfg", KIND_CFGS, ids=lambda x: x if isinstance(x, str) else _cfg_id(x))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_seq_forward_backward_matches_reference(backend, device_for, kind, shape, cfg, dtype):
    op = seq_op(kind)
    args = make_args(kind, *shape, dtype=dtype, device=device_for, requires_grad=True, **cfg)
    testing.backend_or_skip(op, backend, *args)
    with backends.force(backend):
        got = op(*args)
    want = ref_fn(kind)(*args)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        testing.assert_close(a, e, dtype=dtype)
    # gradients of every differentiable input through the op's autograd
    outs_a, outs_e = got[:-1], want[:-1]
    if shape[0] == 0 or shape[1] == 0:
        return
    weights = [torch.randn_like(o) for o in outs_e]
    leaves = [a for a in args[:n_diff(kind)] if isinstance(a, torch.Tensor)]
    ga = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_a, weights)), leaves)
    ge = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs_e, weights)), leaves)
    for a, e in zip(ga, ge):
        testing.assert_close(a, e, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7, 1, 8, 100), (5, 4, 8, 100), (1, 1, 300, 100), (2, 1, 300, 100)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("cfg", [dict(), dict(lengths=True, reverse=True, mask=True)], ids=_cfg_id)
def test_cpu_sequence_split_over_threads(kind, shape, cfg):
    """The CPU's float32 sequence path splits the hidden units over threads (problems big enough
    for it: these shapes) and runs every step in one parallel region; batch 1 takes its dot-product
    kernel, and one or two input rows their projection as split matrix-vector products. Forward
    results against the reference, with two threads."""
    args = _split_args(kind, shape, **cfg)
    with _two_threads(), backends.force("cpu"):
        got = seq_op(kind)(*args)
    for a, e in zip(got, ref_fn(kind)(*args)):
        testing.assert_close(a, e, dtype=torch.float32)


def _split_args(kind, shape, **cfg):
    """make_args, with weights at torch's scale (~1/sqrt(H)): make_args's would make a plain RNN of
    this width explode, and compare float32 rounding instead of kernels."""
    args = make_args(kind, *shape, dtype=torch.float32, **cfg)
    w = 3 if kind == "lstm" else 2
    args[w], args[w + 1] = args[w] / shape[3] ** 0.5, args[w + 1] / shape[3] ** 0.5
    testing.backend_or_skip(seq_op(kind), "cpu", *args)
    return args


@contextlib.contextmanager
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7, 1, 8, 100), (5, 4, 8, 100)], ids=lambda s: "T%dB%dI%dH%d" % s)
def test_cpu_sequence_finishes_on_one_task_as_on_two(kind, shape, monkeypatch):
    """On a busy machine the tasks of the split recurrence agree to let one of them finish the
    sequence alone (a thread whose core another process holds would make every step wait for the
    scheduler). FASTNN_LOCKSTEP_SOLO_FROM=g forces that from generation g: bit-identical results."""
    args = _split_args(kind, shape, lengths=True)
    with _two_threads(), backends.force("cpu"):
        both = seq_op(kind)(*args)
        for g in ("0", "3"):
            monkeypatch.setenv("FASTNN_LOCKSTEP_SOLO_FROM", g)
            for a, e in zip(seq_op(kind)(*args), both):
                assert torch.equal(a, e)


def _backward_args(kind, args, cell=False):
    """(op, ref, full argument list) of the backward op for forward ``args``."""
    fwd = ref_fn(kind)(*args)
    grads = [torch.randn_like(o) for o in fwd[:-1]]
    return grads + list(args) + [fwd[0], fwd[-1]]


@pytest.mark.parametrize("kind,cfg", KIND_CFGS, ids=lambda x: x if isinstance(x, str) else _cfg_id(x))
@pytest.mark.parametrize("need", ["all", "frozen", "input_only"])
def test_backward_op_matches_reference(kind, cfg, need):
    args = make_args(kind, 6, 3, 5, 7, **cfg)
    name = "lstm_seq" if kind == "lstm" else ("gru_seq" if kind == "gru" else "rnn_seq")
    testing.backend_or_skip(seq_op(kind), "cpu", *args)
    n = n_diff(kind)
    mask = {"all": [True] * n, "frozen": [True, True] + [False] * (n - 2),
            "input_only": [True] + [False] * (n - 1)}[need]
    bargs = _backward_args(kind, args) + [mask]
    got = getattr(torch.ops.fastnn, f"{name}_backward")(*bargs)
    want = getattr(ref, f"{name}_backward")(*bargs)
    for i, (a, e) in enumerate(zip(got, want)):
        if not mask[i] or args[i] is None:
            assert a.numel() == 0, f"gradient {i} was not asked for but came back with shape {list(a.shape)}"
        else:
            testing.assert_close(a, e, msg=f"gradient {i}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_ops_match_reference_on_every_backend(backend, device_for, kind):
    for B, I, H in [(1, 1, 1), (3, 7, 9), (0, 4, 5)]:
        a = make_args(kind, 1, B, I, H, dtype=torch.float32, device=device_for, requires_grad=True)
        x = a[0][0]
        args = [x, a[1], a[2], a[3], a[4], a[5], a[6]] if kind == "lstm" else [x, a[1], a[2], a[3], a[4], a[5]]
        op = ops.lstm_cell if kind == "lstm" else ops.gru_cell
        testing.backend_or_skip(op, backend, *args)
        with backends.force(backend):
            got = op(*args)
        want = (ref.lstm_cell if kind == "lstm" else ref.gru_cell)(*args)
        for g_, w_ in zip(got, want):
            testing.assert_close(g_, w_)
        if B == 0:
            continue
        leaves = [t for t in args if t is not None]
        ws = [torch.randn_like(o) for o in want[:-1]]
        ga = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got[:-1], ws)), leaves)
        ge = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want[:-1], ws)), leaves)
        for g_, w_ in zip(ga, ge):
            testing.assert_close(g_, w_)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_backward_op_matches_reference(kind):
    a = make_args(kind, 1, 3, 4, 5)
    if kind == "lstm":
        args = [a[0][0], a[1], a[2], a[3], a[4], a[5], a[6]]
    else:
        args = [a[0][0], a[1], a[2], a[3], a[4], a[5]]
    testing.backend_or_skip(ops.lstm_cell if kind == "lstm" else ops.gru_cell, "cpu", *args)
    fwd = (ref.lstm_cell if kind == "lstm" else ref.gru_cell)(*args)
    mask = [True] * len(args)
    bargs = [torch.randn_like(o) for o in fwd[:-1]] + args + [fwd[0], fwd[-1], mask]
    got = getattr(torch.ops.fastnn, f"{kind}_cell_backward")(*bargs)
    want = getattr(ref, f"{kind}_cell_backward")(*bargs)
    for g_, w_ in zip(got, want):
        testing.assert_close(g_, w_)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_bounded(backend, device_for, kind, dtype):
    """bf16/fp16: error against float64 at most 2x PyTorch's own error in that dtype."""
    if backend == "reference":
        pytest.skip("the reference in low precision is PyTorch's own computation, the baseline of the rule")
    args64 = make_args(kind, 12, 4, 32, 48, lengths=True)
    args = [a.to(device=device_for, dtype=dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else
            (a.to(device_for) if isinstance(a, torch.Tensor) else a) for a in args64]
    op = seq_op(kind)
    testing.backend_or_skip(op, backend, *args)
    with backends.force(backend):
        got = op(*args)
    want = ref_fn(kind)(*args64)
    torch_lp = ref_fn(kind)(*args)  # PyTorch doing the same in that dtype
    for a, e, p in zip(got[:-1], want[:-1], torch_lp[:-1]):
        testing.assert_error_bounded(a.cpu(), e, p.cpu(), floor=1e-3, msg=f"{kind} {dtype}")


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    args = make_args(kind, 3, 2, 3, 4, lengths=True, mask=True, proj=True, requires_grad=True)
    testing.backend_or_skip(seq_op(kind), "cpu", *args)
    n = n_diff(kind)

    def f(*diff):
        full = list(diff) + args[n:]
        with backends.force("cpu"):
            return seq_op(kind)(*full)[:-1]

    assert torch.autograd.gradcheck(f, tuple(args[:n]), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    name = "lstm_seq" if kind == "lstm" else ("gru_seq" if kind == "gru" else "rnn_seq")
    for cfg in [dict(), dict(lengths=True, mask=True, reverse=True, proj=True)]:
        args = make_args(kind, 3, 2, 3, 4, dtype=torch.float32, requires_grad=True, **cfg)
        testing.backend_or_skip(seq_op(kind), "cpu", *args)
        testing.opcheck(getattr(torch.ops.fastnn, name), tuple(args))
        n = n_diff(kind)
        bargs = _backward_args(kind, [a.detach() if isinstance(a, torch.Tensor) else a for a in args]) + [[True] * n]
        testing.opcheck(getattr(torch.ops.fastnn, f"{name}_backward"), tuple(bargs))
    if kind in ("lstm", "gru"):
        a = make_args(kind, 1, 2, 3, 4, dtype=torch.float32, requires_grad=True)
        cargs = [a[0][0], a[1], a[2], a[3], a[4], a[5]] + ([a[6]] if kind == "lstm" else [])
        testing.opcheck(getattr(torch.ops.fastnn, f"{kind}_cell"), tuple(cargs))


BAD = [
    ("input", lambda a: a.__setitem__(0, a[0][..., :-1]), "w_ih"),  # feature size differs from w_ih
    ("h0", lambda a: a.__setitem__(1, a[1][:-1]), "h0"),
    ("dtype", lambda a: a.__setitem__(1, a[1].double()), "h0"),
    ("w_hh", lambda a: a.__setitem__(3, a[3][:-1]), "w_hh"),
    ("lengths", lambda a: a.__setitem__(6, torch.ones(5, dtype=torch.int64)), "lengths"),
    ("lengths > T", lambda a: a.__setitem__(6, torch.tensor([4, 5, 1])), "lengths"),
    ("lengths < 0", lambda a: a.__setitem__(6, torch.tensor([4, -1, 1])), "lengths"),
    ("h0 [P, B]", lambda a: a.__setitem__(1, a[1].t()), "h0"),
    ("2d input", lambda a: a.__setitem__(0, a[0][0]), "input"),
]


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_names_the_argument(backend_name, case):
    _, spoil, arg = case
    args = make_args("gru", 4, 3, 5, 6, dtype=torch.float32)
    testing.backend_or_skip(ops.gru_seq, backend_name, *args)
    spoil(args)
    with pytest.raises(ValueError, match=f"argument 'gru_seq: {arg}'"):
        with backends.force(backend_name):
            ops.gru_seq(*args)


def test_lstm_projection_shape_error():
    args = make_args("lstm", 3, 2, 3, 6, dtype=torch.float32, proj=True)
    args[7] = args[7][:, :-1]
    with pytest.raises(ValueError, match="argument 'lstm_seq: w_hr'"):
        with backends.force("reference"):
            ops.lstm_seq(*args)
    if ops.lstm_seq.reason("cpu", *args) is None:
        with pytest.raises(ValueError, match="argument 'lstm_seq: w_hr'"):
            ops.lstm_seq.call("cpu", *args)


def test_inputs_are_not_modified():
    args = make_args("lstm", 5, 3, 4, 6, dtype=torch.float32, lengths=True, mask=True, proj=True)
    testing.backend_or_skip(ops.lstm_seq, "cpu", *args)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = ops.lstm_seq.call("cpu", *args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    # no output aliases an input (h_n is a fresh tensor even for T = 0)
    args0 = make_args("lstm", 0, 3, 4, 6, dtype=torch.float32)
    out = ops.lstm_seq.call("cpu", *args0)
    assert out[1].data_ptr() != args0[1].data_ptr() and torch.equal(out[1], args0[1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_triton_cell_opcheck(kind):
    a = make_args(kind, 1, 3, 5, 6, dtype=torch.float32, requires_grad=True)
    args = [a[0][0], a[1], a[2], a[3], a[4], a[5]] + ([a[6]] if kind == "lstm" else [])
    op = ops.lstm_cell if kind == "lstm" else ops.gru_cell
    testing.backend_or_skip(op, "triton", *args)
    testing.opcheck(getattr(torch.ops.fastnn, f"triton_{kind}_cell"), tuple(args))
    fwd = getattr(ref, f"{kind}_cell")(*[t.detach() if t is not None else None for t in args])
    bargs = [torch.randn_like(o) for o in fwd[:-1]] + [t.detach() for t in args] + [fwd[0], fwd[-1], [True] * len(args)]
    got = getattr(torch.ops.fastnn, f"triton_{kind}_cell_backward")(*bargs)
    want = getattr(ref, f"{kind}_cell_backward")(*bargs)
    for g_, w_ in zip(got, want):
        testing.assert_close(g_, w_)

"""fastnn.LSTM/GRU/RNN and the cells against torch.nn: construction, outputs and gradients, every input
form, state_dict both ways, convert/revert, torch.compile / torch.export, training options, bad input."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastnn
from fastnn import backends, testing

PAIRS = [(nn.LSTM, fastnn.LSTM), (nn.GRU, fastnn.GRU), (nn.RNN, fastnn.RNN)]
CELLS = [(nn.LSTMCell, fastnn.LSTMCell), (nn.GRUCell, fastnn.GRUCell), (nn.RNNCell, fastnn.RNNCell)]
MODULE_BACKENDS = ["reference", "cpu"]  # on the CPU; the GPU tests are in test_gpu.py

# constructor kwargs (input_size=5, hidden_size=7 always)
CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, batch_first=True, bias=False),
    dict(bidirectional=True, batch_first=True),
    dict(proj_size=3, num_layers=2, bidirectional=True),
    dict(nonlinearity="relu", num_layers=2),
]


# the smallest lstm_seq call: can a backend run on this machine at all?
_PROBE = (torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(4, 1), torch.zeros(4, 1))


def _applies(torch_cls, cfg):
    if "proj_size" in cfg and torch_cls is not nn.LSTM:
        return False
    if "nonlinearity" in cfg and torch_cls is not nn.RNN:
        return False
    return True


CASES = [(t, f, c) for t, f in PAIRS for c in CONFIGS if _applies(t, c)]


def _id(x):
    if isinstance(x, type):
        return x.__name__
    return "-".join(f"{k}={v}" for k, v in x.items()) or "default"


def pair(torch_cls, fastnn_cls, cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    a = torch_cls(5, 7, dtype=dtype, **cfg)
    torch.manual_seed(seed)
    b = fastnn_cls(5, 7, dtype=dtype, **cfg)
    return a, b


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def check_same(out_a, out_b, dtype):
    fa, fb = torch.utils._pytree.tree_leaves(out_a), torch.utils._pytree.tree_leaves(out_b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        testing.assert_close(y, x, dtype=dtype)


@pytest.mark.parametrize("torch_cls,fastnn_cls,cfg", CASES, ids=_id)
def test_same_parameters_under_the_same_seed(torch_cls, fastnn_cls, cfg):
    a, b = pair(torch_cls, fastnn_cls, cfg, torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert repr(b) == "fastnn." + repr(a)  # torch's words, under fastnn's name


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("torch_cls,fastnn_cls,cfg", CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_outputs_and_gradients_match_torch(backend, torch_cls, fastnn_cls, cfg, dtype):
    a, b = pair(torch_cls, fastnn_cls, cfg, dtype)
    testing.backend_or_skip(fastnn.ops.lstm_seq, backend, *_PROBE)
    T, B = 6, 3
    x = torch.randn((B, T, 5) if cfg.get("batch_first") else (T, B, 5), dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with backends.force(backend):
        out_b = b(xb)
    out_a = a(xa)
    check_same(out_a, out_b, dtype)
    ws = [torch.randn_like(t) for t in torch.utils._pytree.tree_leaves(out_a)]
    sum((t * w).sum() for t, w in zip(torch.utils._pytree.tree_leaves(out_a), ws)).backward()
    sum((t * w).sum() for t, w in zip(torch.utils._pytree.tree_leaves(out_b), ws)).backward()
    testing.assert_close(xb.grad, xa.grad, dtype=dtype)
    for (n, ga), (_, gb) in zip(grads(a).items(), grads(b).items()):
        testing.assert_close(gb, ga, dtype=dtype, msg=n)


@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS, ids=_id)
def test_initial_state_unbatched_and_empty_batch(torch_cls, fastnn_cls):
    cfg = dict(num_layers=2, bidirectional=True)
    a, b = pair(torch_cls, fastnn_cls, cfg)
    lstm = torch_cls is nn.LSTM
    # initial states, batched
    h = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)
    hx = (h, c) if lstm else h
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    out_a, out_b = a(x, hx), b(x, hx)
    check_same(out_a, out_b, torch.float64)
    ga = torch.autograd.grad(out_a[0].sum(), [h, c] if lstm else [h])
    gb = torch.autograd.grad(out_b[0].sum(), [h, c] if lstm else [h])
    check_same(ga, gb, torch.float64)
    # unbatched, with and without state
    xu = torch.randn(5, 5, dtype=torch.float64)
    hu = (h[:, 0].detach(), c[:, 0].detach()) if lstm else h[:, 0].detach()
    check_same(a(xu), b(xu), torch.float64)
    check_same(a(xu, hu), b(xu, hu), torch.float64)
    # batch of 0 gives empty outputs, as torch's
    x0 = torch.randn(5, 0, 5, dtype=torch.float64)
    check_same(a(x0), b(x0), torch.float64)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS, ids=_id)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences(backend, torch_cls, fastnn_cls, enforce_sorted):
    cfg = dict(num_layers=2, bidirectional=True, **({"proj_size": 4} if torch_cls is nn.LSTM else {}))
    a, b = pair(torch_cls, fastnn_cls, cfg)
    testing.backend_or_skip(fastnn.ops.lstm_seq, backend, *_PROBE)
    lengths = torch.tensor([6, 3, 5, 1]) if not enforce_sorted else torch.tensor([6, 5, 3, 1])
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    lstm = torch_cls is nn.LSTM
    P = 4 if lstm else 7
    h0 = torch.randn(4, 4, P, dtype=torch.float64)
    hx = (h0, torch.randn(4, 4, 7, dtype=torch.float64)) if lstm else h0
    out_a, hid_a = a(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), hx)
    with backends.force(backend):
        out_b, hid_b = b(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), hx)
    assert torch.equal(out_a.batch_sizes, out_b.batch_sizes)
    assert (out_b.sorted_indices is None) == enforce_sorted
    check_same((out_a.data, hid_a), (out_b.data, hid_b), torch.float64)
    pa, _ = pad_packed_sequence(out_a)
    pb, _ = pad_packed_sequence(out_b)
    ga = torch.autograd.grad(pa.sum() + torch.utils._pytree.tree_leaves(hid_a)[0].sum(), [x] + list(a.parameters()))
    gb = torch.autograd.grad(pb.sum() + torch.utils._pytree.tree_leaves(hid_b)[0].sum(), [x] + list(b.parameters()))
    check_same(ga, gb, torch.float64)


@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS, ids=_id)
def test_dropout_between_layers(torch_cls, fastnn_cls):
    a, b = pair(torch_cls, fastnn_cls, dict(num_layers=3, dropout=0.5))
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    a.eval(), b.eval()
    check_same(a(x), b(x), torch.float64)  # eval: no dropout
    a.train(), b.train()
    torch.manual_seed(1)
    ya = a(x)
    torch.manual_seed(1)
    yb = b(x)
    # torch's CPU kernel draws its masks like F.dropout, layer by layer: the same numbers
    check_same(ya, yb, torch.float64)
    torch.manual_seed(2)
    assert not torch.allclose(b(x)[0], yb[0]), "training outputs should change with the dropout masks"


def test_frozen_weights_get_no_gradient():
    m = fastnn.LSTM(5, 7, num_layers=2)
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 2, 5, requires_grad=True)
    m(x)[0].sum().backward()
    assert x.grad is not None and all(p.grad is None for p in m.parameters())
    # half frozen: only the unfrozen layer's weights get gradients
    m = fastnn.GRU(5, 7, num_layers=2)
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith("l1"))
    m(torch.randn(4, 2, 5))[0].sum().backward()
    assert all((p.grad is not None) == n.endswith("l1") for n, p in m.named_parameters())


@pytest.mark.parametrize("torch_cls,fastnn_cls,cfg", CASES[:8], ids=_id)
def test_state_dict_both_ways(torch_cls, fastnn_cls, cfg):
    a, _ = pair(torch_cls, fastnn_cls, cfg, seed=0)
    _, b = pair(torch_cls, fastnn_cls, cfg, seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    if cfg.get("batch_first"):
        x = x.transpose(0, 1)
    check_same(a(x), b(x), torch.float64)
    _, b2 = pair(torch_cls, fastnn_cls, cfg, seed=2)
    a.load_state_dict(b2.state_dict())
    check_same(a(x), b2(x), torch.float64)


@pytest.mark.parametrize("torch_cls,fastnn_cls", CELLS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cells_match_torch(torch_cls, fastnn_cls, dtype):
    for backend in MODULE_BACKENDS:
        torch.manual_seed(0)
        a = torch_cls(5, 7, dtype=dtype)
        torch.manual_seed(0)
        b = fastnn_cls(5, 7, dtype=dtype)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        lstm = torch_cls is nn.LSTMCell
        for batched in (True, False):
            shape = (3, 5) if batched else (5,)
            x = torch.randn(shape, dtype=dtype)
            hshape = (3, 7) if batched else (7,)
            h = torch.randn(hshape, dtype=dtype, requires_grad=True)
            c = torch.randn(hshape, dtype=dtype, requires_grad=True)
            for hx in (None, (h, c) if lstm else h):
                with backends.force(backend):
                    yb = b(x, hx)
                ya = a(x, hx)
                check_same(ya, yb, dtype)
                la = sum(t.sum() * (i + 1) for i, t in enumerate(torch.utils._pytree.tree_leaves(ya)))
                lb = sum(t.sum() * (i + 1) for i, t in enumerate(torch.utils._pytree.tree_leaves(yb)))
                check_same(torch.autograd.grad(la, list(a.parameters())),
                           torch.autograd.grad(lb, list(b.parameters())), dtype)


def test_convert_and_revert_keep_weights():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.LSTM(5, 7, batch_first=True, num_layers=2)
            self.mid = nn.Sequential(nn.GRU(7, 6), nn.Identity())
            self.cell = nn.GRUCell(6, 6)
            self.rnn = nn.RNN(6, 4, nonlinearity="relu")
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            y, _ = self.enc(x)
            y, _ = self.mid[0](y.transpose(0, 1))
            h = self.cell(y[-1])
            z, _ = self.rnn(y + h)
            return self.head(z)

    torch.manual_seed(0)
    m = Model().double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    want = m(x)
    params_before = {n: p for n, p in m.named_parameters()}
    sd = copy.deepcopy(m.state_dict())
    fastnn.convert(m)
    assert type(m.enc) is fastnn.LSTM and type(m.mid[0]) is fastnn.GRU
    assert type(m.cell) is fastnn.GRUCell and type(m.rnn) is fastnn.RNN
    assert all(p is params_before[n] for n, p in m.named_parameters()), "parameters must be kept, not copied"
    testing.assert_close(m(x), want)
    assert list(m.state_dict()) == list(sd)
    fastnn.revert(m)
    assert type(m.enc) is nn.LSTM and type(m.cell) is nn.GRUCell and type(m.rnn) is nn.RNN
    testing.assert_close(m(x), want)
    # a model saved converted loads into plain torch
    m2 = Model().double()
    m2.load_state_dict(fastnn.convert(m).state_dict())
    testing.assert_close(m2(x), want)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    m = fastnn.LSTM(5, 7, num_layers=2, batch_first=True)
    g = fastnn.GRU(7, 3)
    x = torch.randn(2, 6, 5)

    def f(x):
        y, _ = m(x)
        z, h = g(y.transpose(0, 1))
        return z.sum() + h.sum()

    want = f(x)
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    testing.assert_close(got, want)
    # training through AOTAutograd: the registered backward ops run in the compiled graph
    want_grads = torch.autograd.grad(f(x), list(m.parameters()))
    got_grads = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), list(m.parameters()))
    for a, b in zip(got_grads, want_grads):
        testing.assert_close(a, b)


def test_torch_export_dynamic_sequence_length():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fastnn.LSTM(5, 7, batch_first=True, bidirectional=True)
            self.gru = fastnn.GRU(14, 3, batch_first=True)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.gru(y)[0]

    m = Model().eval()
    T = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(m, (torch.randn(2, 6, 5),), dynamic_shapes={"x": {1: T}})
    targets = {str(n.target) for n in ep.graph.nodes}
    if fastnn.ops.lstm_seq.choose(*_PROBE) == "cpu":
        assert any("fastnn.lstm_seq" in t for t in targets), targets
    for length in (3, 11):
        x = torch.randn(2, length, 5)
        testing.assert_close(ep.module()(x), m(x))


def test_recurrent_dropout_option():
    torch.manual_seed(0)
    m = fastnn.LSTM(5, 7, num_layers=2, recurrent_dropout=0.4)
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, num_layers=2)
    x = torch.randn(6, 3, 5)
    m.eval()
    testing.assert_close(m(x)[0], ref(x)[0])  # off in eval
    m.train()
    y1, y2 = m(x)[0], m(x)[0]
    assert not torch.allclose(y1, y2), "each call draws new masks"
    assert not torch.allclose(y1, ref(x)[0])
    y1.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="recurrent_dropout"):
        fastnn.GRU(5, 7, recurrent_dropout=1.0)
    # revert warns that torch has no such option
    with pytest.warns(UserWarning, match="recurrent_dropout"):
        fastnn.revert(m)


def test_forget_bias_option():
    torch.manual_seed(0)
    m = fastnn.LSTM(5, 8, num_layers=2, bidirectional=True, forget_bias=1.0)
    torch.manual_seed(0)
    ref = nn.LSTM(5, 8, num_layers=2, bidirectional=True)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if n.startswith("bias_ih"):
            assert torch.all(p[8:16] == 1.0) and torch.equal(p[:8], q[:8]) and torch.equal(p[16:], q[16:])
        elif n.startswith("bias_hh"):
            assert torch.all(p[8:16] == 0.0) and torch.equal(p[16:], q[16:])
        else:
            assert torch.equal(p, q), n
    m.reset_parameters()
    assert torch.all(m.bias_ih_l0[8:16] == 1.0)
    with pytest.raises(ValueError, match="forget_bias"):
        fastnn.LSTM(5, 8, bias=False, forget_bias=1.0)


@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS, ids=_id)
def test_bad_input_raises_like_torch(torch_cls, fastnn_cls):
    a, b = pair(torch_cls, fastnn_cls, dict(num_layers=2), torch.float32)
    lstm = torch_cls is nn.LSTM
    x = torch.randn(5, 3, 5)
    bad = {
        "wrong feature size": (torch.randn(5, 3, 4), None),
        "wrong state batch": (x, (torch.zeros(2, 2, 7), torch.zeros(2, 3, 7)) if lstm else torch.zeros(2, 2, 7)),
        "wrong state layers": (x, (torch.zeros(1, 3, 7), torch.zeros(2, 3, 7)) if lstm else torch.zeros(1, 3, 7)),
        "4-D input": (torch.randn(2, 5, 3, 5), None),
        "input dtype": (x.double(), None),
        "zero-length sequence": (torch.randn(0, 3, 5), None),
    }
    for what, (inp, hx) in bad.items():
        with pytest.raises(Exception) as ea:
            a(inp, hx)
        with pytest.raises(Exception) as eb:
            b(inp, hx)
        assert type(eb.value) is type(ea.value), (what, ea.value, eb.value)
        assert str(eb.value) == str(ea.value), what
    # where torch's error is obscure, ours names the argument
    hx = (torch.zeros(2, 3, 7, dtype=torch.float64), torch.zeros(2, 3, 7)) if lstm else torch.zeros(2, 3, 7).double()
    with pytest.raises(ValueError, match="argument 'hx'"):
        b(x, hx)


def test_cell_bad_input_raises_like_torch():
    for torch_cls, fastnn_cls in CELLS:
        a, b = torch_cls(5, 7), fastnn_cls(5, 7)
        lstm = torch_cls is nn.LSTMCell
        cases = [(torch.randn(3, 4), None),
                 (torch.randn(3, 5), (torch.zeros(2, 7), torch.zeros(2, 7)) if lstm else torch.zeros(2, 7)),
                 (torch.randn(3, 5), (torch.zeros(3, 6), torch.zeros(3, 7)) if lstm else torch.zeros(3, 6)),
                 (torch.randn(2, 3, 5), None)]
        for inp, hx in cases:
            with pytest.raises(Exception) as ea:
                a(inp, hx)
            with pytest.raises(Exception) as eb:
                b(inp, hx)
            assert type(eb.value) is type(ea.value) and str(eb.value) == str(ea.value)


def test_flatten_parameters_and_to():
    m = fastnn.GRU(5, 7)
    m.flatten_parameters()
    m = m.double()
    y, h = m(torch.randn(3, 2, 5, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_inputs_not_modified_and_no_warning():
    m = fastnn.LSTM(5, 7, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 5)
    h = (torch.randn(4, 3, 7), torch.randn(4, 3, 7))
    keep = (x.clone(), h[0].clone(), h[1].clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x, h)
    assert torch.equal(x, keep[0]) and torch.equal(h[0], keep[1]) and torch.equal(h[1], keep[2])


@pytest.mark.parametrize("cls", [fastnn.LSTM, fastnn.GRU], ids=lambda c: c.__name__)
def test_layer_norm_option(cls):
    torch.manual_seed(0)
    ref = (nn.LSTM if cls is fastnn.LSTM else nn.GRU)(5, 7, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    m = cls(5, 7, num_layers=2, bidirectional=True, layer_norm=True).double()
    # the recurrent weights are torch's draws; the norms come on top, under their own names
    sd = m.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k].float(), v), k
    assert any(k.startswith("ln_ih.3.") for k in sd) and any(k.startswith("ln_hh.0.") for k in sd)
    m.reset_parameters()
    assert torch.equal(m.ln_ih[0].weight, torch.ones_like(m.ln_ih[0].weight))
    # one step by hand, every parameter random (one layer, one direction)
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    one = cls(5, 7, layer_norm=True).double()
    one.load_state_dict({k: v for k, v in m.state_dict().items()
                         if k.endswith("_l0") or (k.startswith("ln_") and k.split(".")[1] == "0")})
    gi = m.ln_ih[0](x[0] @ m.weight_ih_l0.T) + m.bias_ih_l0
    gh = m.ln_hh[0](torch.zeros(2, 7, dtype=torch.float64) @ m.weight_hh_l0.T) + m.bias_hh_l0
    if cls is fastnn.LSTM:
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = i.sigmoid() * g.tanh()
        h = o.sigmoid() * m.ln_c[0](c).tanh()
    else:
        xr, xz, xn = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        h = (1 - z) * (xn + r * hn).tanh()
    testing.assert_close(one(x)[0][0], h)
    # packed sequences give what each sequence gives alone
    xs = torch.randn(6, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 2])
    packed_out, _ = m(pack_padded_sequence(xs, lengths))
    padded, _ = pad_packed_sequence(packed_out)
    for b in range(3):
        alone = m(xs[: lengths[b], b:b + 1])[0]
        testing.assert_close(padded[: lengths[b], b:b + 1], alone)
    padded.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="no torch.nn counterpart"):
        fastnn.revert(m)
    with pytest.raises(ValueError, match="layer_norm"):
        fastnn.LSTM(5, 7, proj_size=3, layer_norm=True)


def _count_fastnn_lstm_calls(monkeypatch):
    calls = []
    trusted = fastnn.ops.lstm_seq.trusted
    monkeypatch.setattr(fastnn.ops.lstm_seq, "trusted", lambda *a, **k: calls.append(1) or trusted(*a, **k))
    return calls


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_at_large_cpu_batches_runs_torchs_kernel(monkeypatch, packed):
    """The last resort of the drop-in promise: where fastnn's kernel measured slower (float32 CPU
    LSTM, batch >= backends.TORCH_LSTM_CPU_MIN_BATCH), torch's own kernel runs: torch's numbers, its
    gradients; below that batch, forced backends and options torch lacks keep fastnn's kernel."""
    calls = _count_fastnn_lstm_calls(monkeypatch)
    n = backends.TORCH_LSTM_CPU_MIN_BATCH
    torch.manual_seed(0)
    base = nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
    fast = fastnn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
    fast.load_state_dict(base.state_dict())
    x = torch.randn(n, 4, 5)
    if packed:
        x = pack_padded_sequence(x, torch.randint(1, 5, (n,)), batch_first=True, enforce_sorted=False)
    got, want = fast(x), base(x)
    assert calls == []
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(g, w)
    sum(t.sum() for t in torch.utils._pytree.tree_leaves(got) if t.is_floating_point()).backward()
    sum(t.sum() for t in torch.utils._pytree.tree_leaves(want) if t.is_floating_point()).backward()
    for pf, pb in zip(fast.parameters(), base.parameters()):
        assert torch.equal(pf.grad, pb.grad)

    fast(torch.randn(n - 1, 4, 5))  # a smaller batch: fastnn's kernel
    assert len(calls) == 4  # 2 layers x 2 directions
    if backends.forced("lstm_seq") is None:
        with backends.force("cpu", ops=["lstm_seq"]):
            fast(torch.randn(n, 4, 5))
        assert len(calls) == 8
    for options in (dict(layer_norm=True), dict(proj_size=3), dict(recurrent_dropout=0.1)):
        assert not fastnn.LSTM(5, 7, batch_first=True, **options)._runs_torch_kernel(torch.randn(n, 4, 5)), options
    del calls[:]
    fast.double()(torch.randn(n, 4, 5, dtype=torch.float64))  # float64: fastnn's kernel
    assert len(calls) == 4

"""Quantized modules against the float layers they replace; quantize_dynamic / dequantize; state
dicts; torch.compile and torch.export; bad input."""

import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastnn.nn.rnn as fnn
from fastnn.quantized import GRU, LSTM, RNN, GRUCell, Linear, LSTMCell, RNNCell, dequantize, quantize_dynamic

from .helpers import needs_cpu_kernels

# Error bounds against the float layer. int8 rounding moves each weight by at most scale/2 =
# max|w_row|/254 and each activation by max|x_row|/254: about 0.4% of a row's largest value per
# element, mostly averaging out over a dot product (random signs). With inputs and weights of
# unit scale, the output error is ~0.5% of the output's magnitude; a recurrence adds it up over a
# few steps but its gates saturate. 3% (dynamic) and 1.5% (weight-only) of the largest output
# leave margin for that, and are still far below what a wrong kernel gives (O(100%)).
DYNAMIC_BOUND = 0.03
WEIGHT_ONLY_BOUND = 0.015


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    if request.param == "cpu":
        needs_cpu_kernels()
    from fastnn import backends
    with backends.force(request.param, ops=["int8_linear", "int8_lstm_seq", "int8_gru_seq"]):
        yield request.param


@pytest.mark.parametrize("weight_only", [False, True])
def test_linear_vs_float(backend, weight_only):
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    q = quantize_dynamic(m, weight_only=weight_only)
    assert isinstance(q[0], Linear) and isinstance(q[2], Linear) and isinstance(m[0], nn.Linear)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert rel_err(q(x), m(x)) < (WEIGHT_ONLY_BOUND if weight_only else DYNAMIC_BOUND)


RNN_CASES = [
    dict(),
    dict(batch_first=True),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, batch_first=True, bias=False),
]


QTYPES = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


@pytest.mark.parametrize("cls,extra", [(nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}), (nn.RNN, {"nonlinearity": "relu"})])
@pytest.mark.parametrize("opts", RNN_CASES)
@pytest.mark.parametrize("weight_only", [False, True])
def test_recurrent_vs_float(backend, cls, extra, opts, weight_only):
    m = cls(12, 24, **opts, **extra)
    q = quantize_dynamic(m, weight_only=weight_only)
    assert type(q) is QTYPES[cls] and getattr(q, "nonlinearity", "tanh") == extra.get("nonlinearity", "tanh")
    bound = WEIGHT_ONLY_BOUND if weight_only else DYNAMIC_BOUND
    T, B = 6, 3
    x = torch.randn(B, T, 12) if opts.get("batch_first") else torch.randn(T, B, 12)
    D = 2 if opts.get("bidirectional") else 1
    L = opts.get("num_layers", 1)
    h0 = torch.randn(L * D, B, 24) * 0.5
    hx = (h0, torch.randn(L * D, B, 24) * 0.5) if cls is nn.LSTM else h0
    with torch.no_grad():
        for args in ((x,), (x, hx)):
            got, want = q(*args), m(*args)
            assert rel_err(got[0], want[0]) < bound
            for g, w in zip(torch.utils._pytree.tree_leaves(got[1]), torch.utils._pytree.tree_leaves(want[1])):
                assert g.shape == w.shape and rel_err(g, w) < bound
        # unbatched input (and state)
        x1 = x[0] if opts.get("batch_first") else x[:, 0]
        hx1 = tuple(h[:, 0] for h in hx) if cls is nn.LSTM else hx[:, 0]
        got, want = q(x1, hx1), m(x1, hx1)
        assert got[0].shape == want[0].shape and rel_err(got[0], want[0]) < bound


@pytest.mark.parametrize("cls", [nn.LSTM, fnn.LSTM])
@pytest.mark.parametrize("opts", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)])
@pytest.mark.parametrize("weight_only", [False, True])
def test_lstm_projection_vs_float(backend, cls, opts, weight_only):
    """LSTM(proj_size=P): W_hr int8 too; output and h of size P, c of size H; initial states, packed
    and unbatched input; state_dict, dequantize and repr."""
    m = cls(12, 24, proj_size=7, **opts)
    q = quantize_dynamic(m, weight_only=weight_only)
    assert type(q) is LSTM and q.proj_size == 7 and "proj_size=7" in repr(q)
    assert q.weight_hr_l0_q.dtype == torch.int8 and q.weight_hr_l0_q.shape == (7, 24)
    bound = WEIGHT_ONLY_BOUND if weight_only else DYNAMIC_BOUND
    T, B, D, L = 6, 3, 2 if opts.get("bidirectional") else 1, opts.get("num_layers", 1)
    first = opts.get("batch_first", False)
    x = torch.randn(B, T, 12) if first else torch.randn(T, B, 12)
    hx = (torch.randn(L * D, B, 7) * 0.5, torch.randn(L * D, B, 24) * 0.5)
    lengths = torch.tensor([2, 6, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=first, enforce_sorted=False)
    x1 = x[0] if first else x[:, 0]
    with torch.no_grad():
        for args in ((x,), (x, hx), (packed, hx), (x1,), (x1, tuple(h[:, 0] for h in hx))):
            got, want = q(*args), m(*args)
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert g.shape == w.shape and rel_err(g, w) < bound
        with pytest.raises(RuntimeError, match="Expected hidden size"):
            q(x, (hx[1], hx[1]))  # h of the cell's size, not the projection's
        q2 = quantize_dynamic(cls(12, 24, proj_size=7, **opts), weight_only=weight_only)
        q2.load_state_dict(q.state_dict())
        torch.testing.assert_close(q2(x, hx), q(x, hx), rtol=0, atol=0)
        f = dequantize(q)
        assert type(f) is cls and f.proj_size == 7
        assert rel_err(f(x, hx)[0], m(x, hx)[0]) < bound


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(backend, cls, enforce_sorted):
    m = cls(5, 8, num_layers=2, bidirectional=True)
    q = quantize_dynamic(m)
    lengths = torch.tensor([6, 4, 2]) if enforce_sorted else torch.tensor([2, 6, 4])
    x = torch.randn(6, 3, 5)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    with torch.no_grad():
        got, want = q(packed), m(packed)
    assert torch.equal(got[0].batch_sizes, want[0].batch_sizes)
    assert (got[0].sorted_indices is None) == (want[0].sorted_indices is None)
    assert rel_err(got[0].data, want[0].data) < DYNAMIC_BOUND
    for g, w in zip(torch.utils._pytree.tree_leaves(got[1]), torch.utils._pytree.tree_leaves(want[1])):
        assert rel_err(g, w) < DYNAMIC_BOUND
    pg, _ = pad_packed_sequence(got[0])
    assert torch.all(pg[2:, lengths.tolist().index(2)] == 0)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN, fnn.LSTM])
def test_unbatched_input_without_hx(backend, cls):
    # torch's layers take an unbatched [T, I] input with no initial state (zeros, [L*D, H]).
    m = cls(10, 16, num_layers=2, bidirectional=True)
    q = quantize_dynamic(m)
    x = torch.randn(5, 10)
    with torch.no_grad():
        got, want = q(x), m(x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert g.shape == w.shape and rel_err(g, w) < DYNAMIC_BOUND


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell, fnn.LSTMCell, fnn.GRUCell, fnn.RNNCell])
def test_cells_vs_float(backend, cls):
    m = cls(10, 16, nonlinearity="relu") if issubclass(cls, nn.RNNCell) else cls(10, 16)
    q = quantize_dynamic(m)
    want = next(q for f, q in ((nn.LSTMCell, LSTMCell), (nn.GRUCell, GRUCell), (nn.RNNCell, RNNCell))
                if issubclass(cls, f))
    assert type(q) is want
    x, h = torch.randn(3, 10), torch.randn(3, 16) * 0.5
    hx = (h, torch.randn(3, 16) * 0.5) if issubclass(cls, nn.LSTMCell) else h
    with torch.no_grad():
        for args in ((x,), (x, hx), (x[0], torch.utils._pytree.tree_map(lambda t: t[0], hx))):
            got, want = q(*args), m(*args)
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert g.shape == w.shape and rel_err(g, w) < DYNAMIC_BOUND
    assert type(dequantize(q)) is cls


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cell_fast_path_matches_the_general_path(cls):
    """A float32 CPU batch with its state goes straight to the kernel (_fast_step); a list state (LSTM)
    or a float64 state (GRU, RNN) takes the general path: the same numbers, and the same errors."""
    needs_cpu_kernels()
    q = quantize_dynamic(cls(12, 20))
    x, h, c = torch.randn(3, 12), torch.randn(3, 20), torch.randn(3, 20)
    with torch.no_grad():
        if cls is nn.LSTMCell:
            assert q._fast_step(x, (h, c)) is not None
            for a, b in zip(q(x, (h, c)), q(x, [h, c])):
                assert torch.equal(a, b)
        else:
            assert q._fast_step(x, h) is not None
            assert torch.equal(q(x, h), q(x, h.double()))
        bad = (h[:, :5], c) if cls is nn.LSTMCell else h[:, :5]
        with pytest.raises(ValueError, match="'h0'.*shape \\[3, 20\\]"):  # the general path's check
            q(x, bad)
        meta = (h.to("meta"), c.to("meta")) if cls is nn.LSTMCell else h.to("meta")
        with pytest.raises(NotImplementedError, match="the state hx is on meta"):
            q(x, meta)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x.requires_grad_(), (h, c) if cls is nn.LSTMCell else h)


def test_fastnn_layers_are_quantized_and_restored(backend):
    model = nn.ModuleDict({"lstm": fnn.LSTM(6, 10, batch_first=True), "gru": fnn.GRU(10, 4, batch_first=True)})
    q = quantize_dynamic(model)
    assert isinstance(q["lstm"], LSTM) and isinstance(q["gru"], GRU)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        y = model["gru"](model["lstm"](x)[0])[0]
        got = q["gru"](q["lstm"](x)[0])[0]
    assert rel_err(got, y) < DYNAMIC_BOUND
    back = dequantize(q)
    assert type(back["lstm"]) is fnn.LSTM and type(back["gru"]) is fnn.GRU
    r = quantize_dynamic(fnn.RNN(3, 4, nonlinearity="relu"))
    assert isinstance(r, RNN) and r.nonlinearity == "relu"
    back = dequantize(r)
    assert type(back) is fnn.RNN and back.nonlinearity == "relu"


def test_dequantize_gives_the_int8_weights_in_float():
    m = nn.Sequential(nn.Linear(8, 16), nn.LSTM(16, 12))
    q = quantize_dynamic(m, weight_only=True)
    f = dequantize(q)
    assert type(f[0]) is nn.Linear and type(f[1]) is nn.LSTM and isinstance(q[0], Linear)
    with torch.no_grad():
        w = q[0].weight_q.float() * q[0].weight_scale[:, None]
        assert torch.equal(f[0].weight, w)
        x = torch.randn(4, 2, 8)
        torch.testing.assert_close(f[0](x), q[0](x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f[1](f[0](x))[0], q[1](q[0](x))[0], rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_size():
    needs_cpu_kernels()

    def model():
        return nn.Sequential(nn.Linear(64, 128), nn.LSTM(128, 256, batch_first=True))

    m = model()
    q = quantize_dynamic(m)
    sd = q.state_dict()
    assert sd["0.weight_q"].dtype == torch.int8 and sd["1.weight_hh_l0_q"].dtype == torch.int8
    assert sd["1.weight_hh_l0_scale"].shape == (1024,) and sd["1.bias_ih_l0"].dtype == torch.float32

    def nbytes(state):
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.tell()

    ratio = nbytes(sd) / nbytes(m.state_dict())
    assert ratio <= 0.27, ratio
    other = quantize_dynamic(model())  # same architecture, other weights
    other.load_state_dict(sd)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(other[1](other[0](x))[0], q[1](q[0](x))[0])


def test_loading_a_float_state_dict_names_the_key():
    m = nn.Sequential(nn.Linear(4, 8), nn.GRU(8, 3))
    q = quantize_dynamic(m)
    with pytest.raises(RuntimeError, match="'0.weight' is a float weight"):
        q.load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="'1.weight_ih_l0' is a float weight"):
        q.load_state_dict(m.state_dict(), strict=False)
    bad = q.state_dict()
    bad["0.weight_q"] = bad["0.weight_q"].float()
    with pytest.raises(RuntimeError, match="'0.weight_q' must be an int8 tensor"):
        q.load_state_dict(bad)


def test_repr_says_what_is_quantized():
    q = quantize_dynamic(nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 3)), weight_only=True)
    text = repr(q)
    assert "fastnn.quantized.Linear(in_features=4, out_features=8" in text and "fastnn.quantized.LSTM(8, 3" in text
    assert "weights int8 per-channel, activations fp32 (weight-only)" in text
    assert "activations int8 dynamic per row" in repr(quantize_dynamic(nn.Linear(2, 2)))


def test_autograd_recording_is_a_clear_error(backend):
    q = quantize_dynamic(nn.LSTM(4, 5))
    x = torch.randn(3, 2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x)
    with torch.no_grad():
        assert not q(x)[0].requires_grad
    out = q(x.detach())[0]  # nothing requires grad: no graph
    assert out.grad_fn is None


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(4, 3), torch.randn(2, 5)),
    (lambda: nn.LSTM(4, 3), torch.randn(3, 2, 5)),
    (lambda: nn.GRUCell(4, 3), torch.randn(2, 5)),
])
def test_input_of_the_wrong_width_names_the_size(backend, make, x):
    q = quantize_dynamic(make())
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to (in_features|input_size). "
                                                             r"Expected 4, got 5"):
        q(x)


def test_module_calls_skip_the_per_call_validation(monkeypatch):
    """At batch 1 the ops' Python validation costs more than the int8 kernel: a module passing its own
    weights goes straight to the compiled kernel when nothing forces another backend."""
    needs_cpu_kernels()
    from fastnn.backends import Op
    calls = []
    checked = Op._checked
    monkeypatch.setattr(Op, "_checked", lambda self, *a: calls.append(self.name) or checked(self, *a))
    model = quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 3, num_layers=2, bidirectional=True)))
    cell = quantize_dynamic(nn.LSTMCell(4, 3))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 4))[0]
        cell(torch.randn(1, 4))
    assert calls == [] and out.shape == (2, 1, 6)
    x = torch.randn(2, 1, 4, requires_grad=True)  # recording: through the op, which refuses it
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x)
    assert calls == ["int8_linear"]


def test_dtype_and_spec_errors():
    m = nn.Linear(3, 3)
    with pytest.raises(NotImplementedError, match="float16"):
        quantize_dynamic(m, dtype=torch.float16)
    with pytest.raises(ValueError, match="expected torch.qint8, got torch.quint8"):
        quantize_dynamic(m, dtype=torch.quint8)
    with pytest.raises(TypeError, match="qconfig_spec"):
        quantize_dynamic(m, qconfig_spec=nn.Linear)
    with pytest.raises(NotImplementedError, match="layer_norm"):
        quantize_dynamic(fnn.LSTM(4, 5, layer_norm=True))


def test_nothing_to_quantize_warns_and_returns_unchanged():
    m = nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing to quantize"):
        q = quantize_dynamic(m)
    assert type(q[0]) is nn.Conv1d and torch.equal(q[0].weight, m[0].weight)
    with pytest.warns(UserWarning, match="nothing to quantize"):
        quantize_dynamic(nn.Sequential(nn.Linear(2, 2)), qconfig_spec={nn.LSTM})


def test_spec_selects_by_type_and_name_like_torch():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.rnn = nn.GRU(4, 4)
            self.attn = nn.MultiheadAttention(4, 2)  # its out_proj subclasses nn.Linear: never swapped
            self.head = nn.Linear(4, 2)

    q = quantize_dynamic(Model())
    assert isinstance(q.enc[0], Linear) and isinstance(q.rnn, GRU) and isinstance(q.head, Linear)
    assert not isinstance(q.attn.out_proj, Linear)
    q = quantize_dynamic(Model(), {"enc"})
    assert isinstance(q.enc[1], Linear) and type(q.rnn) is nn.GRU and type(q.head) is nn.Linear
    q = quantize_dynamic(Model(), {nn.GRU: object(), "head": None})
    assert isinstance(q.rnn, GRU) and type(q.head) is nn.Linear
    m = Model()
    same = quantize_dynamic(m, {nn.GRU}, inplace=True)
    assert same is m and isinstance(m.rnn, GRU)


def test_empty_batch_and_empty_sequence_behave_as_float(backend):
    m = nn.LSTM(4, 5, batch_first=True)
    q = quantize_dynamic(m)
    with torch.no_grad():
        got, want = q(torch.randn(0, 3, 4)), m(torch.randn(0, 3, 4))
    assert got[0].shape == want[0].shape and got[1][0].shape == want[1][0].shape
    with pytest.raises(RuntimeError, match="sequence length"):
        m(torch.randn(2, 0, 4))
    with pytest.raises(RuntimeError, match="sequence length"):
        q(torch.randn(2, 0, 4))


def test_empty_batches_behave_as_float(backend):
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        for m, x in ((lin, torch.randn(0, 4)), (lin, torch.randn(2, 0, 4)), (nn.GRU(4, 5), torch.randn(3, 0, 4)),
                     (fnn.LSTM(4, 5, batch_first=True), torch.randn(0, 3, 4)), (nn.LSTMCell(4, 5), torch.randn(0, 4)),
                     (nn.RNNCell(4, 5), torch.randn(0, 4))):
            got, want = quantize_dynamic(m)(x), m(x)
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert g.shape == w.shape and g.dtype == w.dtype
    with pytest.raises(RuntimeError, match="sequence length"):
        quantize_dynamic(fnn.GRU(4, 5))(torch.randn(0, 2, 4))


@pytest.mark.parametrize("cls", [nn.Linear, nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, fnn.GRU])
def test_float64_model_quantizes_and_returns_float64(backend, cls):
    torch.manual_seed(0)
    m = cls(6, 8).double()
    q = quantize_dynamic(m)
    x = torch.randn(3, 2, 6, dtype=torch.float64) if cls not in (nn.Linear, nn.LSTMCell, nn.GRUCell) else \
        torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        got, want = q(x), m(x)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert g.dtype == torch.float64 and g.shape == w.shape and rel_err(g, w) < DYNAMIC_BOUND
        if cls in (nn.LSTM, nn.GRU):  # initial states of the input's dtype, and a PackedSequence
            hx = torch.zeros(1, 2, 8, dtype=torch.float64)
            got = q(x, (hx, hx) if cls is nn.LSTM else hx)
            assert got[0].dtype == torch.float64
            packed = pack_padded_sequence(x, torch.tensor([3, 2]))
            assert q(packed)[0].data.dtype == torch.float64
    back = dequantize(q)
    assert type(back) is cls and all(p.dtype == torch.float64 for p in back.parameters())
    q.double()  # converting the quantized module keeps the fp32 scales and biases the kernels read
    assert all(b.dtype in (torch.int8, torch.float32) for b in q.buffers())
    with torch.no_grad():
        assert torch.utils._pytree.tree_leaves(q(x))[0].dtype == torch.float64


def test_float_inputs_of_other_dtypes_come_back_in_their_dtype(backend):
    q = quantize_dynamic(nn.Linear(4, 3))
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16):
            assert q(torch.randn(2, 4, dtype=dtype)).dtype == dtype
        with pytest.raises(ValueError, match="'int8_linear: input'.*float32"):
            q(torch.ones(2, 4, dtype=torch.int64))


def test_gru_and_rnn_refuse_proj_size_as_torch_does():
    for torch_cls, fastnn_cls in ((nn.GRU, fnn.GRU), (nn.RNN, fnn.RNN)):
        for value in (0, 2):
            with pytest.raises(ValueError) as want:
                torch_cls(4, 5, proj_size=value)
            with pytest.raises(ValueError) as got:
                fastnn_cls(4, 5, proj_size=value)
            assert str(got.value) == str(want.value)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fnn.GRU(4, 5, projection=2)


def test_module_on_another_device_names_itself():
    # No GPU here: the meta device stands in for CUDA (the same check, on device.type).
    for m, x in ((nn.Linear(4, 4), torch.randn(2, 4)), (nn.GRU(4, 4), torch.randn(2, 1, 4)),
                 (nn.LSTMCell(4, 4), torch.randn(2, 4))):
        q = quantize_dynamic(m)
        name = type(q).__name__
        with pytest.raises(NotImplementedError, match=f"fastnn.quantized.{name}: the input is on meta.*no GPU path"):
            q(x.to("meta"))
        q.to("meta")
        with pytest.raises(NotImplementedError, match=f"fastnn.quantized.{name}: the module's weights are on meta"):
            q(x)


def test_non_cpu_input_says_there_is_no_gpu_path():
    q = quantize_dynamic(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(NotImplementedError, match="no GPU path"):
        q(torch.randn(2, 4, device="meta"))
    ql = quantize_dynamic(nn.GRU(4, 4))
    with pytest.raises(NotImplementedError, match="no GPU path"):
        ql(torch.randn(2, 1, 4, device="meta"))


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_torch_compile_fullgraph():
    needs_cpu_kernels()
    q = quantize_dynamic(Tagger().eval())
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        want = q(x)
        torch._dynamo.reset()
        got = torch.compile(q, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("proj_size", [0, 5])
def test_torch_export_keeps_the_int8_ops(proj_size):
    needs_cpu_kernels()
    model = Tagger().eval()
    if proj_size:
        model.lstm = nn.LSTM(6, 16, num_layers=2, batch_first=True, bidirectional=True, proj_size=proj_size)
        model.head = nn.Linear(2 * proj_size, 3)
    q = quantize_dynamic(model)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        ep = torch.export.export(q, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("fastnn.int8_lstm_seq" in t for t in targets) == 4, targets
    assert any("fastnn.int8_linear" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), q(x))


@pytest.mark.gpu
def test_cuda_model_or_input_says_there_is_no_gpu_path():
    q = quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 3)))
    with pytest.raises(NotImplementedError, match="no GPU path"):
        q[0](torch.randn(2, 4, device="cuda"))
    q = q.cuda()
    with pytest.raises(NotImplementedError, match="no GPU path"):
        q[0](torch.randn(2, 4))
    with pytest.raises(NotImplementedError, match="no GPU path"):
        q[1](torch.randn(5, 2, 4, device="cuda"))


def test_inf_input_saturates_lstm_gates_except_where_a_weight_quantizes_to_zero():
    """What the README says of inf inputs: one inf feature drives every gate whose (dequantized)
    weight on it is nonzero to the float LSTM's saturated value, so the step's output matches the
    float LSTM's; a weight that quantizes to 0 gives inf * 0 = NaN where the float LSTM saturates."""
    needs_cpu_kernels()
    torch.manual_seed(0)
    m = nn.LSTM(4, 3, batch_first=True)
    x = torch.randn(1, 3, 4)
    x[0, 1, 2] = float("inf")
    with torch.no_grad():
        want, _ = m(x)
        got, _ = quantize_dynamic(m)(x)
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        assert (got - want).abs().max() < 0.01  # outputs ~0.1: int8 rounding, not a wrong step
        assert torch.equal(got[0, 1] == 0, want[0, 1] == 0)  # the saturated units are the same
        m.weight_ih_l0[3, 2] = 1e-4 * m.weight_ih_l0[3].abs().max()  # forget gate of unit 0: rounds to 0
        want, _ = m(x)
        got, _ = quantize_dynamic(m)(x)
    assert torch.isfinite(want).all()
    assert torch.isnan(got[0, 1, 0]) and torch.isfinite(got[0, 1, 1:]).all()
    assert torch.isnan(got[0, 2]).all()  # through W_hh, every unit at the next step


def test_dequantize_keeps_eval_mode():
    model = nn.Sequential(nn.Linear(6, 6), nn.LSTM(6, 8, num_layers=2, dropout=0.5),
                          fnn.LSTM(8, 8, recurrent_dropout=0.3)).eval()
    back = dequantize(quantize_dynamic(model))
    assert not any(m.training for m in back.modules())
    x = torch.randn(5, 3, 6)
    with torch.no_grad():
        assert torch.equal(back[1](back[0](x))[0], back[1](back[0](x))[0])  # no dropout at inference


def test_forward_hooks_survive_the_swap_as_in_torch():
    seen = []
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_forward_pre_hook(lambda m, a: seen.append("pre"))
    model[0].register_forward_hook(lambda m, a, out: seen.append("fwd"))
    with torch.no_grad():
        torch.ao.quantization.quantize_dynamic(model)(torch.randn(2, 4))
        want, seen[:] = list(seen), []
        q = quantize_dynamic(model)
        q(torch.randn(2, 4))
        assert seen == want == ["pre", "fwd"]
        seen.clear()
        dequantize(q)(torch.randn(2, 4))
        assert seen == ["pre", "fwd"]


@pytest.mark.parametrize("spec", [
    {nn.Linear: "qc", "1.0": None},
    {"1": "qc", "1.1": None},
    {"": "qc", "0": None},
    {"1": "qc"},
    {nn.Linear, "1.0"},
])
def test_qconfig_spec_selects_what_torch_selects(spec):
    """torch's rule: a module takes its name's entry, else its type's, else its parent's; None deselects."""
    qc = torch.ao.quantization.default_dynamic_qconfig
    if isinstance(spec, dict):
        spec = {k: (qc if v == "qc" else v) for k, v in spec.items()}

    def model():
        return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))

    def picked(m, is_quantized):
        return sorted(name for name, mod in m.named_modules() if is_quantized(mod))

    ours = picked(quantize_dynamic(model(), spec), lambda mod: isinstance(mod, Linear))
    torchs = picked(torch.ao.quantization.quantize_dynamic(model(), spec),
                    lambda mod: isinstance(mod, torch.ao.nn.quantized.dynamic.Linear))
    assert ours == torchs


def test_float16_qconfig_is_refused_as_dtype_float16_is():
    with pytest.raises(NotImplementedError, match="float16"):
        quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear: torch.ao.quantization.float16_dynamic_qconfig})


def test_cell_hx_of_the_wrong_form_is_a_clear_error():
    q = quantize_dynamic(nn.LSTMCell(4, 3))
    x, h = torch.randn(2, 4), torch.zeros(2, 3)
    with torch.no_grad():
        for hx in ((h, h, h), (h,), torch.stack([h, h])):
            with pytest.raises(TypeError, match="hx must be a tuple of two tensors"):
                q(x, hx)
        with pytest.raises(TypeError, match="hx must be a tensor"):
            quantize_dynamic(nn.GRUCell(4, 3))(x, (h,))

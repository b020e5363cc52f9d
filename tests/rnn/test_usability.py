"""What a user sees of the recurrent modules and ops: autocast as torch's layers follow it, a repr
that says what runs, real signatures and docstrings."""

import inspect

import pytest
import torch
from torch import nn

import fastnn
from fastnn import backends, ops, testing

PAIRS = [(nn.LSTM, fastnn.LSTM), (nn.GRU, fastnn.GRU), (nn.RNN, fastnn.RNN)]
CELLS = [(nn.LSTMCell, fastnn.LSTMCell), (nn.GRUCell, fastnn.GRUCell), (nn.RNNCell, fastnn.RNNCell)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS + CELLS, ids=lambda c: c.__name__)
def test_cpu_autocast_after_linear_follows_torch(backend, torch_cls, fastnn_cls):
    """An fp32 layer fed by a Linear under autocast: torch runs it in bfloat16; so does fastnn."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    t = torch_cls(6, 8)
    f = fastnn_cls(6, 8)
    f.load_state_dict(t.state_dict())
    x = torch.randn(5, 3, 6) if torch_cls in (nn.LSTM, nn.GRU, nn.RNN) else torch.randn(3, 6)
    op = {nn.LSTMCell: ops.lstm_cell, nn.GRUCell: ops.gru_cell}.get(torch_cls)
    if op is None:
        op = ops.lstm_seq if torch_cls is nn.LSTM else (ops.gru_seq if torch_cls is nn.GRU else ops.rnn_seq)
    if backend == "cpu" and not fastnn._extension.available():
        pytest.skip("the compiled library is not loaded")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = t(lin(x))
        with backends.force(backend, ops=[op.name]):
            got = f(lin(x))
    got_l, want_l = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    for g, w in zip(got_l, want_l):
        assert g.dtype == w.dtype == torch.bfloat16
        testing.assert_close(g.float(), w.float(), dtype=torch.bfloat16)
    # gradients reach the fp32 parameters
    sum(g.float().sum() for g in got_l).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in f.parameters())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ops_in_the_autocast_dtype_under_autocast(backend):
    """The ops themselves (bf16 operands, called under autocast): the compiled kernel's own float32
    GEMMs must not be autocast to bfloat16 behind its back."""
    from .test_ops import make_args, ref_fn

    args = make_args("lstm", 4, 3, 5, 6, dtype=torch.bfloat16)
    testing.backend_or_skip(ops.lstm_seq, backend, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16), backends.force(backend):
        got = ops.lstm_seq(*args)
    for g, w in zip(got, ref_fn("lstm")(*args)):
        assert g.dtype == w.dtype
        testing.assert_close(g.float(), w.float(), dtype=torch.bfloat16)


def test_no_autocast_keeps_the_dtype_check():
    m = fastnn.LSTM(4, 5)
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(3, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("cls,args,kwargs,text", [
    (fastnn.LSTM, (16, 32), dict(batch_first=True), "fastnn.LSTM(16, 32, batch_first=True)"),
    (fastnn.GRU, (4, 8), dict(num_layers=2, recurrent_dropout=0.25), "fastnn.GRU(4, 8, num_layers=2, recurrent_dropout=0.25)"),
    (fastnn.LSTM, (4, 8), dict(forget_bias=1.0), "fastnn.LSTM(4, 8, forget_bias=1.0)"),
    (fastnn.GRU, (4, 8), dict(layer_norm=True), "fastnn.GRU(\n  4, 8, layer_norm=True\n  (ln_ih): ModuleList"),
    (fastnn.LSTMCell, (3, 5), dict(), "fastnn.LSTMCell(3, 5)"),
    (fastnn.RNNCell, (3, 5), dict(nonlinearity="relu"), "fastnn.RNNCell(3, 5, nonlinearity=relu)"),
])
def test_repr_says_fastnn(cls, args, kwargs, text):
    assert repr(cls(*args, **kwargs)).startswith(text)


def test_converted_model_prints_fastnn():
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 6))
    fastnn.convert(model)
    assert "(1): fastnn.LSTM(4, 6)" in repr(model)


@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS, ids=lambda c: c.__name__)
def test_layer_signature_is_torchs_plus_fastnns(torch_cls, fastnn_cls):
    params = inspect.signature(fastnn_cls).parameters
    names = list(params)
    torch_names = ["input_size", "hidden_size", "num_layers"] + (["nonlinearity"] if torch_cls is nn.RNN else []) + [
        "bias", "batch_first", "dropout", "bidirectional"] + (["proj_size"] if torch_cls is nn.LSTM else []) + [
        "device", "dtype"]
    assert names[:len(torch_names)] == torch_names
    extras = {nn.LSTM: ["recurrent_dropout", "forget_bias", "layer_norm"], nn.GRU: ["recurrent_dropout", "layer_norm"],
              nn.RNN: ["recurrent_dropout"]}[torch_cls]
    assert names[len(torch_names):] == extras
    assert all(params[n].kind == inspect.Parameter.KEYWORD_ONLY for n in extras)
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    # positional use as torch's, and the same parameters
    torch.manual_seed(0)
    t = torch_cls(3, 4, 2)
    torch.manual_seed(0)
    f = fastnn_cls(3, 4, 2)
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), f.parameters()))


@pytest.mark.parametrize("cls", [fastnn.LSTM, fastnn.GRU, fastnn.RNN, fastnn.LSTMCell, fastnn.GRUCell, fastnn.RNNCell])
def test_module_docstring_names_arguments_shapes_and_backends(cls):
    doc = inspect.getdoc(cls)
    for word in ("input_size", "hidden_size", "Backends", "autocast", "[B,"):
        assert word in doc, (cls.__name__, word)


@pytest.mark.parametrize("op", [ops.lstm_seq, ops.gru_seq, ops.rnn_seq, ops.lstm_cell, ops.gru_cell], ids=str)
def test_op_signature_and_help(op):
    params = inspect.signature(op).parameters
    assert "input" in params and "w_hh" in params
    assert params["b_ih"].default is None
    doc = op.__doc__
    assert "Returns" in doc and "Backends: reference" in doc

"""The recurrent kernels on a GPU, at the benchmark's sizes and at odd ones (the opt-in persistent
kernel needs every block resident; the step path covers what it does not). Skipped without a CUDA
device."""

import pytest
import torch

import fastnn
from fastnn import backends, testing
from fastnn.reference import rnn as ref

from .test_ops import make_args, ref_fn, seq_op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("T,B,I,H", [(32, 64, 512, 512), (16, 1, 128, 256), (8, 8, 64, 1024), (5, 3, 7, 9)])
@pytest.mark.parametrize("cfg", [dict(), dict(lengths=True, reverse=True), dict(mask=True)],
                         ids=["plain", "lengths-reverse", "mask"])
def test_cuda_sequence_matches_float64_reference(kind, T, B, I, H, cfg):
    args64 = make_args(kind, T, B, I, H, **cfg)
    args = [a.to("cuda", torch.float32) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else (a.cuda() if isinstance(a, torch.Tensor) else a) for a in args64]
    with backends.force("cuda"):
        got = seq_op(kind)(*args)
    want = ref_fn(kind)(*args64)
    for g, w in zip(got[:-1], want[:-1]):
        # fp32 against float64: a long recurrence accumulates rounding, so compare normwise
        assert testing.max_rel_error(g.cpu(), w) < 1e-4


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_module_low_precision_against_cudnn_error(kind, dtype):
    torch.manual_seed(0)
    cls_t, cls_f = (torch.nn.LSTM, fastnn.LSTM) if kind == "lstm" else (torch.nn.GRU, fastnn.GRU)
    t = cls_t(256, 256, num_layers=2).cuda()
    f = cls_f(256, 256, num_layers=2).cuda()
    f.load_state_dict(t.state_dict())
    x = torch.randn(64, 16, 256, device="cuda")
    want = t.double()(x.double())[0]
    got = f.to(dtype)(x.to(dtype))[0]
    cudnn = t.to(dtype)(x.to(dtype))[0]
    testing.assert_error_bounded(got, want, cudnn, msg=f"{kind} {dtype}")


def test_cuda_training_step_matches_cpu():
    torch.manual_seed(0)
    m = fastnn.LSTM(32, 64, num_layers=2, bidirectional=True).double()
    mc = fastnn.LSTM(32, 64, num_layers=2, bidirectional=True).double().cuda()
    mc.load_state_dict(m.state_dict())
    x = torch.randn(20, 4, 32, dtype=torch.float64)
    m(x)[0].sum().backward()
    mc(x.cuda())[0].sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), mc.named_parameters()):
        testing.assert_close(q.grad.cpu(), p.grad, msg=n)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_streaming_cell_on_every_gpu_backend(kind):
    B, H = 1, 256
    a = make_args(kind, 1, B, H, H, dtype=torch.float32, device="cuda")
    args = [a[0][0], a[1], a[2], a[3], a[4], a[5]] + ([a[6]] if kind == "lstm" else [])
    op = fastnn.ops.lstm_cell if kind == "lstm" else fastnn.ops.gru_cell
    want = (ref.lstm_cell if kind == "lstm" else ref.gru_cell)(*[t.double() for t in args])
    for backend in op.available(*args):
        with backends.force(backend):
            got = op(*args)
        for g, w in zip(got, want):
            assert testing.max_rel_error(g.cpu(), w.cpu()) < 1e-5, backend


def test_compile_on_gpu():
    m = fastnn.GRU(16, 32, batch_first=True).cuda()
    x = torch.randn(4, 9, 16, device="cuda")
    testing.assert_close(torch.compile(m, fullgraph=True)(x)[0], m(x)[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("T,B,I,H", [(32, 64, 512, 512), (16, 1, 128, 256), (8, 8, 64, 1024), (5, 3, 7, 9),
                                     (7, 5, 16, 33)])
@pytest.mark.parametrize("cfg", [dict(), dict(lengths=True, reverse=True)], ids=["plain", "lengths-reverse"])
def test_persistent_kernel_matches_float64_reference(monkeypatch, kind, T, B, I, H, cfg):
    """The opt-in persistent kernel (FASTNN_RNN_PERSISTENT=1): warps split each unit's dot products,
    rows of h(t-1) staged in shared memory, batch rows in tiles of 4 (B = 5: a partial tile)."""
    monkeypatch.setenv("FASTNN_RNN_PERSISTENT", "1")
    test_cuda_sequence_matches_float64_reference(kind, T, B, I, H, cfg)


def test_sequence_on_a_device_other_than_the_current_one():
    """The compiled op runs on its input's device (a device guard), not on the current one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (the input on cuda:1 while cuda:0 is current)")
    args64 = make_args("lstm", 6, 3, 5, 7)
    args = [a.to("cuda:1", torch.float32) if isinstance(a, torch.Tensor) else a for a in args64]
    with torch.cuda.device(0), backends.force("cuda"):
        got = seq_op("lstm")(*args)
    assert all(g.device == torch.device("cuda:1") for g in got)
    for g, w in zip(got[:-1], ref_fn("lstm")(*args64)[:-1]):
        assert testing.max_rel_error(g.cpu(), w) < 1e-4


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_triton_cell_on_a_device_other_than_the_current_one(kind):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (the input on cuda:1 while cuda:0 is current)")
    a = make_args(kind, 1, 3, 8, 16, dtype=torch.float32)
    args = [a[0][0], a[1], a[2], a[3], a[4], a[5]] + ([a[6]] if kind == "lstm" else [])
    op = fastnn.ops.lstm_cell if kind == "lstm" else fastnn.ops.gru_cell
    want = (ref.lstm_cell if kind == "lstm" else ref.gru_cell)(*[t.double() for t in args])
    with torch.cuda.device(0), backends.force("triton"):
        got = op(*[t.to("cuda:1") for t in args])
    for g, w in zip(got, want):
        assert g.device == torch.device("cuda:1")
        assert testing.max_rel_error(g.cpu(), w) < 1e-5


@pytest.mark.parametrize("cls", [fastnn.LSTM, fastnn.GRU])
def test_cuda_autocast_after_linear(cls):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).cuda()
    m = cls(8, 16).cuda()
    t = (torch.nn.LSTM if cls is fastnn.LSTM else torch.nn.GRU)(8, 16).cuda()
    t.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        got = m(lin(x))[0]
        want = t(lin(x))[0]
    assert got.dtype == want.dtype == torch.float16
    assert testing.max_rel_error(got.float(), want.float()) < 1e-2

"""The recurrent kernels on a GPU at the sizes of TARGETS.md (the persistent kernel needs every block
resident; the step path covers what it does not). Skipped without a CUDA device."""

import pytest
import torch

import fastnn
from fastnn import backends, testing
from fastnn.reference import rnn as ref

from test_rnn_ops import make_args, ref_fn, seq_op

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

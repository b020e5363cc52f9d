"""fastnn.MoE under torch.compile(fullgraph=True), torch.export and CUDA-graph capture: no graph
breaks, no host synchronisation, same numbers as eager."""

import pytest
import torch

import fastnn
from fastnn import backends, testing


def _layer(device="cpu", **kw):
    torch.manual_seed(0)
    return fastnn.MoE(16, 12, 4, 2, shared_expert_size=8, shared_expert_gate=True, device=device, **kw)


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_compile_fullgraph_matches_eager(backend, mode):
    m = _layer()
    x = torch.randn(2, 5, 16, requires_grad=mode == "train")
    force = backends.force(backend) if backend != "default" else torch.enable_grad()
    with force:
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        if mode == "train":
            y = compiled(x)
            (gx,) = torch.autograd.grad(y.square().sum(), x)
            want = m(x)
            (wx,) = torch.autograd.grad(want.square().sum(), x)
            testing.assert_close(gx, wx)
        else:
            with torch.no_grad():
                y, want = compiled(x), m(x)
    testing.assert_close(y, want)


def test_compile_inductor_training_step():
    """The default (inductor) backend, forward and backward, capacity routing included."""
    m = _layer(capacity_factor=1.0, aux_loss_coef=0.01)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(24, 16, requires_grad=True)
    y = compiled(x)
    loss = y.square().mean() + m.aux_loss
    loss.backward()
    g_compiled = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    y2 = m(x)
    (y2.square().mean() + m.aux_loss).backward()
    testing.assert_close(y, y2)
    for a, (n, p) in zip(g_compiled, m.named_parameters()):
        testing.assert_close(a, p.grad, msg=n)


def test_export_round_trip():
    m = _layer().eval()
    x = torch.randn(7, 16)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        got = ep.module()(x)
        want = m(x)
    testing.assert_close(got, want)
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("fastnn" in n for n in names), names  # the custom ops are in the graph, not decomposed away


@pytest.mark.gpu
def test_cuda_graph_capture_and_compile():
    m = _layer("cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = m(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)  # warm-up (Triton autotuning, allocations) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x)
        graph.replay()
        torch.cuda.synchronize()
        testing.assert_close(out, want)
        compiled = torch.compile(m, fullgraph=True)
        testing.assert_close(compiled(x), want)

"""Recurrent-layer benchmark cases (LSTM / GRU).

The baseline is the torch.nn layer on the same device with the same weights (cuDNN on the GPU,
oneDNN/ATen on the CPU); the nn.LSTMCell / nn.GRUCell loop a user would write is shown beside it. Inference runs
under ``torch.no_grad()``; training is one forward and backward of ``output.sum()``. The error is
that of fastnn's output against the float64 reference (fastnn.reference.rnn) on the same inputs.
"""

from __future__ import annotations

import copy

import torch

from .. import backends
from .. import nn as fnn
from .. import testing
from ..reference import rnn as ref
from .cases import Goal, Run, case

_TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
_FASTNN = {"lstm": fnn.LSTM, "gru": fnn.GRU}
_CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}


def _pair(kind, I, H, device, dtype, num_layers=1):
    torch.manual_seed(0)
    base = _TORCH[kind](I, H, num_layers=num_layers).to(device=device, dtype=dtype)
    fast = _FASTNN[kind](I, H, num_layers=num_layers).to(device=device, dtype=dtype)
    fast.load_state_dict(base.state_dict())
    return base, fast


def _error(kind, fast, x) -> float:
    """fastnn's output against the float64 reference of one layer (the first)."""
    with torch.no_grad():
        got = fast(x)[0].float()
        w = [p.detach().double() for p in (fast.weight_ih_l0, fast.weight_hh_l0, fast.bias_ih_l0, fast.bias_hh_l0)]
        xd = x.double()
        B, H = x.shape[1], fast.hidden_size
        h0 = torch.zeros(B, H, dtype=torch.float64, device=x.device)
        if fast.num_layers != 1:
            return float("nan")
        if kind == "lstm":
            want = ref.lstm_seq(xd, h0, h0, *w, None, None, None, False)[0]
        else:
            want = ref.gru_seq(xd, h0, *w, None, None, False)[0]
    return testing.max_rel_error(got, want)


def _cell_loop(kind, base, x, train: bool):
    cell = _CELLS[kind](base.input_size, base.hidden_size).to(device=x.device, dtype=x.dtype)
    T, B = x.shape[0], x.shape[1]

    def loop():
        with torch.set_grad_enabled(train):
            h = torch.zeros(B, base.hidden_size, device=x.device, dtype=x.dtype)
            c = torch.zeros_like(h)
            outs = []
            for t in range(T):
                if kind == "lstm":
                    h, c = cell(x[t], (h, c))
                else:
                    h = cell(x[t], h)
                outs.append(h)
            if train:
                torch.stack(outs).sum().backward()
    return loop


def _run(kind, T, B, I, H, device, dtype=torch.float32, train=False, cell_loop=True) -> Run:
    base, fast = _pair(kind, I, H, device, dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    if train:
        xb, xf = x.clone().requires_grad_(), x.clone().requires_grad_()

        def baseline():
            base(xb)[0].sum().backward()

        def fastnn():
            fast(xf)[0].sum().backward()
    else:
        def baseline():
            with torch.no_grad():
                return base(x)

        def fastnn():
            with torch.no_grad():
                return fast(x)
    others = {}
    if cell_loop:
        others[f"nn.{_CELLS[kind].__name__} loop"] = _cell_loop(kind, base, x, train)
    note = ""
    if kind == "lstm" and backends.lstm_runs_torch_kernel(x.device, dtype, B):
        # fastnn.LSTM runs torch's kernel here (the last resort of the drop-in promise): the row says
        # so, and times fastnn's own kernel beside it.
        note = (f"fastnn.LSTM runs torch's own kernel at a float32 CPU batch >= {backends.TORCH_LSTM_CPU_MIN_BATCH} "
                "(fastnn.backends.lstm_runs_torch_kernel); fastnn's kernel is the 'fastnn kernel' column")

        def forced(fn=fastnn):
            with backends.force("cpu", ops=["lstm_seq"]):
                return fn()
        others["fastnn kernel (FASTNN_BACKEND=lstm_seq:cpu)"] = forced
    if train and device.type == "cuda":
        note = _peak_memory_note(baseline, fastnn, device)
    G = (4 if kind == "lstm" else 3) * H
    # TFLOP/s is a GPU column; on the CPU it would print 0
    flops = 2 * T * B * G * (I + H) * (3 if train else 1) if device.type == "cuda" else None
    return Run(baseline=baseline, baseline_name=f"torch.nn.{_TORCH[kind].__name__}", fastnn=fastnn,
               error=lambda: _error(kind, fast, x.detach()), others=others, flops=flops, note=note)


def _peak_memory_note(baseline, fastnn, device) -> str:
    peaks = {}
    for name, fn in (("torch", baseline), ("fastnn", fastnn)):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peaks[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return f"peak training memory above the inputs: torch {peaks['torch']:.0f} MiB, fastnn {peaks['fastnn']:.0f} MiB"


def _step_run(kind, H, device) -> Run:
    """One streaming step at batch 1: torch.nn.{LSTM,GRU} on a length-1 sequence (cuDNN) against
    fastnn's fused cell."""
    torch.manual_seed(0)
    base = _TORCH[kind](H, H).to(device)
    cell = (fnn.LSTMCell if kind == "lstm" else fnn.GRUCell)(H, H).to(device)
    with torch.no_grad():
        for a, b in (("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh"), ("bias_ih_l0", "bias_ih"),
                     ("bias_hh_l0", "bias_hh")):
            getattr(cell, b).copy_(getattr(base, a))
    x = torch.randn(1, 1, H, device=device)
    h = torch.zeros(1, 1, H, device=device)
    hx = (h, h.clone()) if kind == "lstm" else h
    cx = (h[0], h[0].clone()) if kind == "lstm" else h[0]

    def baseline():
        with torch.no_grad():
            return base(x, hx)

    def fastnn():
        with torch.no_grad():
            return cell(x[0], cx)

    def error():
        base64 = copy.deepcopy(base).double()
        with torch.no_grad():
            got = cell(x[0], cx)
            got = got[0] if kind == "lstm" else got
            want = base64(x.double(), tuple(t.double() for t in hx) if kind == "lstm" else hx.double())[1]
            want = want[0][0] if kind == "lstm" else want[0]
        return testing.max_rel_error(got, want)

    others = {}
    if device.type == "cpu":
        # the drop-in comparison on the CPU: torch's own cell with the same weights
        tcell = _CELLS[kind](H, H).to(device)
        tcell.load_state_dict(cell.state_dict())

        def torch_cell():
            with torch.no_grad():
                return tcell(x[0], cx)

        others[f"nn.{_CELLS[kind].__name__}"] = torch_cell
    return Run(baseline=baseline, baseline_name=f"torch.nn.{_TORCH[kind].__name__} (T=1)", fastnn=fastnn,
               error=error, others=others)


def _compiled_cell_loop_run(device) -> Run:
    """An LSTMCell loop T=128 B=64 H=512, the code a user would otherwise torch.compile. The
    baseline is the eager nn.LSTMCell loop (compiling it takes ~12 s and ran slower on an H100;
    cuDNN's nn.LSTM is shown beside it)."""
    T, B, H = 128, 64, 512
    torch.manual_seed(0)
    tcell = torch.nn.LSTMCell(H, H).to(device)
    fcell = fnn.LSTMCell(H, H).to(device)
    fcell.load_state_dict(tcell.state_dict())
    lstm = torch.nn.LSTM(H, H).to(device)
    x = torch.randn(T, B, H, device=device)

    def loop(cell, x=x):
        def run():
            with torch.no_grad():
                h = torch.zeros(B, H, device=device, dtype=x.dtype)
                c = torch.zeros_like(h)
                for t in range(T):
                    h, c = cell(x[t], (h, c))
                return h
        return run

    def cudnn():
        with torch.no_grad():
            return lstm(x)

    def error():
        return testing.max_rel_error(loop(fcell)(), loop(copy.deepcopy(tcell).double(), x.double())())

    return Run(baseline=loop(tcell), baseline_name="nn.LSTMCell loop (eager)", fastnn=loop(fcell),
               error=error, others={"cuDNN nn.LSTM": cudnn})


def _cudnn(what: str, cudnn_ms: float, goal_ms: float) -> str:
    return f"H100 {what}: cuDNN {cudnn_ms:g} ms; goal <= {goal_ms:g} ms"


def _cpu(what: str, torch_ms: float, goal_ms: float) -> str:
    return f"2-core CPU, 2 threads, {what}: torch.nn {torch_ms:g} ms; goal <= {goal_ms:g} ms"


# The drop-in rows without an absolute goal: never slower than torch, on AVX2 and AVX-512 alike.
DROP_IN = Goal(1.0, "drop-in replacement: no slower than torch on AVX2 and AVX-512 CPUs alike")

# ---- GPU rows: (cuDNN ms, goal ms) on an H100, fp32 unless named

_BIG = {("lstm", False): (12.7, 6.3, 2.0), ("lstm", True): (23.8, 23.8, 1.0),
        ("gru", False): (11.1, 5.5, 2.0), ("gru", True): (23.1, 23.1, 1.0)}
for (_kind, _train), (_ms, _goal_ms, _ratio) in _BIG.items():
    _mode = "train" if _train else "infer"

    @case("rnn", f"{_kind}_{_mode}_T512_B64_H512", shape="T=512 B=64 I=512 H=512",
          dtype=torch.float32, devices=("cuda",), goal=Goal(_ratio, _cudnn(f"{_kind} {_mode}", _ms, _goal_ms)))
    def _gpu_big(device, _kind=_kind, _train=_train):
        return _run(_kind, 512, 64, 512, 512, device, train=_train, cell_loop=False)

for _train, (_ms, _goal_ms, _ratio) in ((False, (10.3, 5.2, 2.0)), (True, (22.7, 22.7, 1.0))):
    _mode = "train" if _train else "infer"

    @case("rnn", f"lstm_{_mode}_T512_B64_H512_bf16", shape="T=512 B=64 I=512 H=512",
          dtype=torch.bfloat16, devices=("cuda",), goal=Goal(_ratio, _cudnn(f"lstm bf16 {_mode}", _ms, _goal_ms)))
    def _gpu_bf16(device, _train=_train):
        return _run("lstm", 512, 64, 512, 512, device, dtype=torch.bfloat16, train=_train, cell_loop=False)


@case("rnn", "lstm_infer_T128_B256_H1024", shape="T=128 B=256 I=1024 H=1024", dtype=torch.float32,
      devices=("cuda",), goal=Goal(1.0, _cudnn("lstm infer", 4.51, 4.5)))
def _gpu_wide(device):
    return _run("lstm", 128, 256, 1024, 1024, device, cell_loop=False)


_EDGE = {"lstm": dict(gpu=(1.07, 0.35), cpu=(3.14, 2.1), step=(35, 3.5)),
         "gru": dict(gpu=(0.96, 0.32), cpu=(6.26, 4.2), step=(14, 1.4))}
for _kind, _at in _EDGE.items():
    @case("rnn", f"{_kind}_infer_T64_B1_H256_gpu", shape="T=64 B=1 I=128 H=256", dtype=torch.float32,
          devices=("cuda",), goal=Goal(3.0, _cudnn(f"{_kind} infer, batch 1", *_at["gpu"])))
    def _edge_gpu(device, _kind=_kind):
        return _run(_kind, 64, 1, 128, 256, device)

    @case("rnn", f"{_kind}_infer_T64_B1_H256", shape="T=64 B=1 I=128 H=256", dtype=torch.float32,
          devices=("cpu",), goal=Goal(1.5, _cpu(f"{_kind} infer, batch 1", *_at["cpu"])), quick=True)
    def _edge_cpu(device, _kind=_kind):
        return _run(_kind, 64, 1, 128, 256, device)

    @case("rnn", f"{_kind}_step_B1_H256", shape="one step B=1 H=256", dtype=torch.float32, devices=("cuda",),
          goal=Goal(_at["step"][1], f"H100 one {_kind} step: cuDNN {_at['step'][0]} us; goal <= 10 us"))
    def _step(device, _kind=_kind):
        return _step_run(_kind, 256, device)

    @case("rnn", f"{_kind}_step_B1_H256_cpu", shape="one step B=1 H=256", dtype=torch.float32, devices=("cpu",),
          goal=DROP_IN)
    def _step_cpu(device, _kind=_kind):
        return _step_run(_kind, 256, device)


@case("rnn", "lstm_cell_loop_T128_B64_H512", shape="T=128 B=64 H=512", dtype=torch.float32, devices=("cuda",),
      goal=Goal(2.0, "H100: eager nn.LSTMCell loop 6.9 ms (8.1 ms torch.compile'd, after 11.6 s of compiling; "
                     "cuDNN nn.LSTM 1.83 ms); goal: fused cell loop <= 3.5 ms"))
def _cell_loop_case(device):
    return _compiled_cell_loop_run(device)


# ---- CPU rows: (torch.nn ms, goal ms) on a 2-core AVX2 machine, 2 threads

for _kind, (_ms, _goal_ms) in (("lstm", (94, 63)), ("gru", (61, 41))):
    @case("rnn", f"{_kind}_infer_T100_B32_H256", shape="T=100 B=32 I=256 H=256", dtype=torch.float32,
          devices=("cpu",), goal=Goal(1.5, _cpu(f"{_kind} infer", _ms, _goal_ms)))
    def _cpu_mid(device, _kind=_kind):
        return _run(_kind, 100, 32, 256, 256, device, cell_loop=False)


@case("rnn", "lstm_train_T100_B32_H256", shape="T=100 B=32 I=256 H=256", dtype=torch.float32, devices=("cpu",),
      goal=Goal(1.0, _cpu("lstm train", 203, 203)))
def _cpu_train(device):
    return _run("lstm", 100, 32, 256, 256, device, train=True, cell_loop=False)


@case("rnn", "lstm_infer_T64_B1_H256_bf16", shape="T=64 B=1 I=128 H=256", dtype=torch.bfloat16, devices=("cpu",),
      goal=DROP_IN)
def _cpu_bf16(device):
    return _run("lstm", 64, 1, 128, 256, device, dtype=torch.bfloat16, cell_loop=False)

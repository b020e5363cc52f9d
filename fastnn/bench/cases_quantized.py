"""Quantized inference cases (CPU): fastnn's int8 layers against every other way to run the model.

Each row times, in the same run and with the same weights:

- fastnn int8: the float model through ``fastnn.quantize_dynamic`` (the row's "fastnn" column);
- onnxruntime int8: the torch model exported with ``torch.onnx.export`` and quantized with
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights; ``DynamicQuantizeLSTM`` for an LSTM,
  ``MatMulInteger`` for matrix products; onnxruntime leaves a GRU in fp32);
- onnxruntime fp32, torch fp32 and fastnn fp32;
- on the sequence rows, fastnn int8 as an AOTInductor package (``fastnn.aoti``), which should run
  within 10% of fastnn int8 eager or faster.

onnxruntime runs with as many intra-op threads as torch (one inter-op thread). The recurrent rows'
baseline is onnxruntime int8, the fastest thing a user has today; where onnxruntime is not installed
the baseline falls back to torch fp32 and those goals are not applicable. The error column is fastnn
int8 against torch fp32 (normwise, see fastnn.testing.max_rel_error); the note gives onnxruntime
int8's error on the same input and the sizes of the saved weights.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import warnings

import torch
from torch import nn

from .. import nn as fnn
from .. import testing
from ..quantized import quantize_dynamic
from .cases import Goal, Run, case

_LAYERS = {"lstm": (nn.LSTM, fnn.LSTM), "gru": (nn.GRU, fnn.GRU)}
_CELLS = {"lstm": (nn.LSTMCell, fnn.LSTMCell), "gru": (nn.GRUCell, fnn.GRUCell)}
_AVX512 = "2-thread AVX-512 machine"


class _Flat(nn.Module):
    """A layer called with plain tensors and returning its first output: the form the ONNX export
    and an onnxruntime session see (cells get (x, h) or (x, h, c))."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, *state):
        out = self.layer(x, state if len(state) > 1 else state[0]) if state else self.layer(x)
        return out[0] if isinstance(out, tuple) else out


def _onnxruntime(layer: nn.Module, inputs: tuple[torch.Tensor, ...], int8: bool):
    """An onnxruntime session of `layer` (exported, and quantized if int8) and a callable that runs
    it on `inputs`; None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_quantize
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        names = [f"in{i}" for i in range(len(inputs))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # The TorchScript exporter writes nn.LSTM / nn.GRU as the ONNX LSTM / GRU ops, which
            # onnxruntime's quantizer turns into its int8 kernels; it also exports in about a second.
            torch.onnx.export(_Flat(layer).eval(), inputs, path, input_names=names, dynamo=False)
            if int8:  # (quiet: the quantizer logs advice to pre-process the model on every call)
                root, level = logging.getLogger(), logging.getLogger().level
                root.setLevel(logging.ERROR)
                try:
                    ort_quantize(path, path, weight_type=QuantType.QInt8)
                finally:
                    root.setLevel(level)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(names, inputs)}
    return lambda: session.run(None, feed)[0]


def _bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def _no_grad(fn, *args):
    def run():
        with torch.inference_mode():
            return fn(*args)
    return run


def _aoti(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The int8 module as an AOTInductor package (fastnn.aoti), loaded and ready to time; None
    without fastnn's compiled library."""
    from .. import _extension, aoti

    if _extension.library_path() is None:
        return None
    folder = tempfile.mkdtemp(prefix="fastnn-bench-aoti-")
    runner = aoti.load(aoti.package(module, inputs, os.path.join(folder, "model.pt2")))
    return lambda: runner(*inputs)


def _compare(fp32: nn.Module, inputs: tuple[torch.Tensor, ...], fast_fp32: nn.Module | None,
             baseline: str, packaged: bool = False) -> Run:
    """The row for the float module `fp32` (torch) called on `inputs`: fastnn int8 against the
    named baseline, with the others beside it (and the int8 model as an AOTInductor package
    when `packaged`)."""
    int8 = quantize_dynamic(fp32)
    want = _Flat(fp32)(*inputs).detach()
    flat8 = _Flat(int8)
    timed = {"torch fp32": _no_grad(_Flat(fp32), *inputs)}
    if fast_fp32 is not None:
        timed["fastnn fp32"] = _no_grad(_Flat(fast_fp32), *inputs)
    packaged_run = _aoti(flat8, inputs) if packaged else None
    if packaged_run is not None:
        timed["fastnn int8 AOTInductor"] = packaged_run
    ort8, ort32 = _onnxruntime(fp32, inputs, int8=True), _onnxruntime(fp32, inputs, int8=False)
    notes = [f"saved weights: fp32 {_bytes(fp32) / 1024:.0f} KiB, int8 {_bytes(int8) / 1024:.0f} KiB "
             f"({_bytes(int8) / _bytes(fp32):.2f}x)"]
    if ort8 is not None:
        timed["onnxruntime int8"], timed["onnxruntime fp32"] = ort8, ort32
        err = testing.max_rel_error(torch.from_numpy(ort8()).reshape(want.shape), want)
        notes.append(f"onnxruntime int8 max rel err {err:.2g}")
    else:
        notes.append("onnxruntime is not installed: no onnxruntime columns")
    applies = baseline in timed
    if not applies:
        baseline = "torch fp32"
    return Run(baseline=timed.pop(baseline), baseline_name=baseline, fastnn=_no_grad(flat8, *inputs),
               error=lambda: testing.max_rel_error(flat8(*inputs).detach(), want), others=timed,
               note="; ".join(notes), goal_applies=applies)


def _sequence(kind: str, T: int, B: int, I: int, H: int) -> Run:
    torch.manual_seed(0)
    layer_cls, fast_cls = _LAYERS[kind]
    fp32 = layer_cls(I, H).eval()
    fast = fast_cls(I, H).eval()
    fast.load_state_dict(fp32.state_dict())
    return _compare(fp32, (torch.randn(T, B, I),), fast, "onnxruntime int8", packaged=True)


def _step(kind: str, H: int) -> Run:
    torch.manual_seed(0)
    cell_cls, fast_cls = _CELLS[kind]
    fp32 = cell_cls(H, H).eval()
    fast = fast_cls(H, H).eval()
    fast.load_state_dict(fp32.state_dict())
    state = (torch.randn(1, H),) * (2 if kind == "lstm" else 1)
    return _compare(fp32, (torch.randn(1, H), *state), fast, "fastnn fp32")


def _cpu_case(name: str, shape: str, goal: Goal, also: tuple[Goal, ...] = (), quick: bool = False):
    return case("quantized", name, shape=shape, dtype=torch.float32, devices=("cpu",), goal=goal, also=also,
                quick=quick)


@_cpu_case("lstm_infer_T64_B1", "T=64 B=1 I=128 H=256",
           Goal(1.25, f"{_AVX512}: onnxruntime int8 0.48 ms; goal <= 0.38 ms"),
           also=(Goal(3.0, f"{_AVX512}: fastnn fp32 0.84 ms; int8 reads a quarter of the weight bytes",
                      against="fastnn fp32"),))
def _lstm_b1(device):
    return _sequence("lstm", 64, 1, 128, 256)


@_cpu_case("gru_infer_T64_B1", "T=64 B=1 I=128 H=256",
           Goal(1.5, "onnxruntime has no int8 GRU (its quantized model runs the fp32 GRU op): "
                     "1.5x the faster of its fp32 and int8 models"),
           also=(Goal(1.5, "the same goal against onnxruntime's fp32 model", against="onnxruntime fp32"),))
def _gru_b1(device):
    return _sequence("gru", 64, 1, 128, 256)


@_cpu_case("lstm_infer_T100_B32", "T=100 B=32 I=256 H=256",
           Goal(1.2, f"{_AVX512}: onnxruntime int8 7.8 ms; goal <= 6.5 ms"),
           also=(Goal(1.5, f"{_AVX512}: fastnn fp32 29 ms", against="fastnn fp32"),))
def _lstm_b32(device):
    return _sequence("lstm", 100, 32, 256, 256)


@_cpu_case("lstm_cell_step_B1", "B=1 H=256",
           Goal(2.0, "one streaming step reads W_ih and W_hh once: int8 moves a quarter of fp32's bytes"))
def _lstm_step(device):
    return _step("lstm", 256)


@_cpu_case("gru_cell_step_B1", "B=1 H=256",
           Goal(2.0, "one streaming step reads W_ih and W_hh once: int8 moves a quarter of fp32's bytes"),
           quick=True)
def _gru_step(device):
    return _step("gru", 256)


def _linear(B: int) -> Run:
    torch.manual_seed(0)
    fp32 = nn.Linear(1024, 1024).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(B, 1024)
    run = _compare(fp32, (x,), None, "torch fp32")
    run.others = {**run.others, "torch fp32": run.baseline}
    run.baseline, run.baseline_name = _no_grad(ao, x), "torch.ao quantize_dynamic Linear"
    return run


_LINEAR_GOAL = Goal(1.0, "at least as fast as torch's own dynamic int8 Linear (fbgemm/oneDNN), the "
                         "layer a user of torch.ao.quantization.quantize_dynamic has")


@_cpu_case("linear_1024_B1", "B=1 1024->1024", _LINEAR_GOAL)
def _linear_b1(device):
    return _linear(1)


@_cpu_case("linear_1024_B64", "B=64 1024->1024", _LINEAR_GOAL)
def _linear_b64(device):
    return _linear(64)


def _moe(T: int, H: int, I: int, E: int, k: int) -> Run:
    """fastnn.MoE (fp32: the baseline) against its int8 layer, with the Hugging Face loop (torch fp32)
    and the weight-only int8 layer beside them. No onnxruntime columns: fastnn's MoE ops do not
    export to a graph onnxruntime runs."""
    from .cases_moe import _Problem

    pb = _Problem(torch.device("cpu"), T=T, H=H, I=I, E=E, k=k, dtype=torch.float32)
    fp32 = pb.layer.eval()
    int8, weight_only = quantize_dynamic(fp32), quantize_dynamic(fp32, weight_only=True)
    x = pb.x
    with torch.inference_mode():
        want = fp32(x)
        wo_err = testing.max_rel_error(weight_only(x), want)
    note = (f"saved weights: fp32 {_bytes(fp32) / 1024:.0f} KiB, int8 {_bytes(int8) / 1024:.0f} KiB "
            f"({_bytes(int8) / _bytes(fp32):.2f}x); weight-only int8 max rel err {wo_err:.2g}")
    return Run(baseline=_no_grad(fp32, x), baseline_name="fastnn fp32", fastnn=_no_grad(int8, x),
               error=lambda: testing.max_rel_error(_no_grad(int8, x)(), want),
               others={"torch fp32 (HF loop)": _no_grad(pb.hf_loop),
                       "fastnn int8 weight-only": _no_grad(weight_only, x)},
               flops=pb.flops, note=note)


@_cpu_case("moe_layer_T512", "T=512 H=512 I=1024 E=8 k=2",
           Goal(1.5, "the expert GEMMs are ~all of the layer's time (1.6 G multiply-adds); fastnn fp32 runs "
                     "them in BLAS sgemm (8 per FMA), int8 in the s8s8 kernels of qgemm.h (AVX2: 32 per "
                     "vpmaddubsw step of 5 instructions; AVX-512 VNNI: 64 per vpdpbusd step of 4)"))
def _moe_layer(device):
    return _moe(512, 512, 1024, 8, 2)

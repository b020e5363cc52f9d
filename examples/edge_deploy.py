"""Ship the CO2 forecaster of examples/forecast.py to a CPU device: quantize it, export it two ways,
and run every artifact in a fresh process, as the device would.

    python examples/edge_deploy.py                  # train (15 epochs), then deploy
    python examples/edge_deploy.py --save f.pt      # ... and keep the trained weights
    python examples/edge_deploy.py --load f.pt      # deploy weights trained before
    python examples/edge_deploy.py --quick          # 3 epochs on 600 windows (the test suite's run)

One table compares, on the CO2 test windows:

    torch fp32             the same model built from nn.LSTM, eager torch
    fastnn fp32            fastnn.LSTM, eager
    fastnn int8            fastnn.quantize_dynamic, eager
    fastnn int8 AOTI       fastnn.aoti.package, run with torch and fastnn's compiled library only
    fastnn int8 ONNX       fastnn.onnx.export, run in onnxruntime without fastnn
    onnxruntime int8       the torch model through torch.onnx.export and onnxruntime's own
                           quantize_dynamic (its DynamicQuantizeLSTM)

Columns: the artifact's size on disk, the median latency of one window at batch 1 (2 threads), the
forecast RMSE in ppm, and the peak resident memory of the process that ran it. Each artifact runs in
its own fresh Python process, so the memory column is what loading and running it costs there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def _forecast_module():
    spec = importlib.util.spec_from_file_location("forecast", os.path.join(HERE, "forecast.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TorchForecaster(nn.Module):
    """examples/forecast.py's Forecaster built from torch.nn's layers (the same state_dict keys)."""

    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTM(1, 128, batch_first=True)
        self.lstm2 = nn.LSTM(128, 64, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        y, _ = self.lstm1(x)
        y, _ = self.lstm2(y)
        return self.head(y[:, -1]).squeeze(-1)


# The fresh process: loads one artifact, forecasts every window one at a time (batch 1), and prints
# the predictions, the median latency and its peak resident memory as JSON. Each kind imports only
# what running that artifact needs.
RUNNER = r'''
import json, sys, time
import numpy as np
kind, path, windows, threads, extra = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
x = np.load(windows)
if kind in ("onnx", "ort-int8"):
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = threads; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    run = lambda w: float(np.asarray(sess.run(None, {name: w})[0]).reshape(-1)[0])
else:
    import torch
    torch.set_num_threads(threads)
    if kind == "aoti":
        torch.ops.load_library(extra)        # fastnn's compiled library; fastnn's Python is not imported
        model = torch._inductor.aoti_load_package(path)
        assert "fastnn" not in sys.modules
    else:
        sys.path.insert(0, extra)            # examples/: the model classes
        import edge_deploy
        model = edge_deploy.build(kind, path)
    def run(w):
        with torch.inference_mode():
            return float(model(torch.from_numpy(w)).reshape(-1)[0])
preds, times = [], []
for i in range(len(x)):
    w = x[i:i + 1]
    t = time.perf_counter(); preds.append(run(w)); times.append(time.perf_counter() - t)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak over from the fork).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"pred": preds, "latency_ms": 1e3 * float(np.median(times[len(times) // 10:])),
                  "peak_rss_mb": hwm / 1024}))
'''


def build(kind: str, path: str) -> nn.Module:
    """The eager models of the table, from their saved state_dicts (the RUNNER's eager kinds)."""
    state = torch.load(path, weights_only=True)
    if kind == "torch":
        model = TorchForecaster()  # fastnn is not imported: the torch row's memory is torch's alone
    else:
        import fastnn

        model = _forecast_module().Forecaster()
        if kind == "int8":
            model = fastnn.quantize_dynamic(model)
    model.load_state_dict(state)
    return model.eval()


def _run_fresh(kind: str, path: str, windows: str, threads: int) -> dict:
    import fastnn

    extra = fastnn.library_path() if kind == "aoti" else HERE
    proc = subprocess.run([sys.executable, "-c", RUNNER, kind, path, windows, str(threads), extra or ""],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} artifact failed in a fresh process:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export_torch_onnx_int8(model: nn.Module, example: torch.Tensor, path: str) -> None:
    import logging
    import warnings

    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path + ".fp32.onnx"
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript exporter writes nn.LSTM as the ONNX LSTM op, which onnxruntime's quantizer
        # turns into its int8 DynamicQuantizeLSTM.
        torch.onnx.export(model, (example,), fp32, input_names=["x"], dynamo=False,
                          dynamic_axes={"x": {0: "batch"}})
        root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process (a shape inference pass)
        try:
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    os.remove(fp32)


def artifacts(model: nn.Module, example: torch.Tensor, folder: str) -> dict[str, str]:
    """Every artifact of the table, written into ``folder``: {kind: path}."""
    import fastnn

    model = model.eval()
    int8 = fastnn.quantize_dynamic(model)
    torch_model = TorchForecaster()
    torch_model.load_state_dict(model.state_dict())
    out = {k: os.path.join(folder, f) for k, f in (("torch", "torch_fp32.pt"), ("fp32", "fastnn_fp32.pt"),
                                                  ("int8", "fastnn_int8.pt"), ("aoti", "fastnn_int8.pt2"),
                                                  ("onnx", "fastnn_int8.onnx"), ("ort-int8", "torch_ort_int8.onnx"))}
    torch.save(torch_model.state_dict(), out["torch"])
    torch.save(model.state_dict(), out["fp32"])
    torch.save(int8.state_dict(), out["int8"])
    fastnn.aoti.package(int8, (example,), out["aoti"])
    fastnn.onnx.export(int8, (example,), out["onnx"])
    _export_torch_onnx_int8(torch_model.eval(), example, out["ort-int8"])
    return out


ROWS = {"torch": "torch fp32", "fp32": "fastnn fp32", "int8": "fastnn int8", "aoti": "fastnn int8 AOTI",
        "onnx": "fastnn int8 ONNX (onnxruntime)", "ort-int8": "onnxruntime int8 (its own quantization)"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15, help="training epochs on the CO2 series (default: 15)")
    p.add_argument("--quick", action="store_true", help="3 epochs on the first 600 windows; 100 test windows")
    p.add_argument("--load", metavar="PATH", help="a state_dict of examples/forecast.py's Forecaster to deploy")
    p.add_argument("--save", metavar="PATH", help="save the trained model's state_dict here")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (default: 2)")
    args = p.parse_args(argv)
    import fastnn

    forecast = _forecast_module()
    torch.manual_seed(0)
    xtr, ytr, xte, _, last, target, stats = forecast.windows(forecast.load_series("co2"))
    model = forecast.Forecaster()
    if args.load:
        model.load_state_dict(torch.load(args.load, weights_only=True))
    else:
        epochs = 3 if args.quick else args.epochs
        if args.quick:
            xtr, ytr = xtr[:600], ytr[:600]
        forecast.train(model, xtr, ytr, model.parameters(), epochs)
    if args.save:
        torch.save(model.state_dict(), args.save)
    if args.quick:
        xte, last, target = xte[:100], last[:100], target[:100]
    mu, sd = stats
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        windows = os.path.join(folder, "windows.npy")
        np.save(windows, xte.numpy())
        paths = artifacts(model, xte[:1], folder)
        for kind, path in paths.items():
            r = _run_fresh(kind, path, windows, args.threads)
            level = last + np.asarray(r["pred"]) * sd + mu
            # an ONNX file may keep its weights beside it (<name>.data): they ship with it
            size = os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
            results[kind] = {"bytes": size, "latency_ms": r["latency_ms"],
                             "rmse": math.sqrt(float(np.mean((level - target) ** 2))), "peak_rss_mb": r["peak_rss_mb"]}
    print(f"\nCO2 forecaster, {len(xte)} test windows at batch 1, {args.threads} threads, "
          f"int8 kernels: {fastnn.build_info()['int8_cpu_isa']}")
    print(f"{'artifact':42s} {'size':>9s} {'latency':>10s} {'RMSE (ppm)':>11s} {'peak memory':>12s}")
    for kind, r in results.items():
        print(f"{ROWS[kind]:42s} {r['bytes'] / 1024:7.0f} KiB {r['latency_ms']:7.3f} ms {r['rmse']:11.4f} "
              f"{r['peak_rss_mb']:9.0f} MiB")
    return results


if __name__ == "__main__":
    main()

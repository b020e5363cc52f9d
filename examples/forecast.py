"""One-step-ahead forecasting with fastnn's LSTM, then transfer to a second series.

Data (shipped with statsmodels, no download): the weekly Mauna Loa CO2 record (2284 weeks) and
the yearly sunspot numbers (309 years). The model reads a 24-step window of the series'
differences and predicts the next difference:

    window [24, 1] -> fastnn.LSTM(128) -> fastnn.LSTM(64) -> Linear(1)

It is trained with fastnn.optim.Adam on the first 80% of CO2 and scored on the rest by the RMSE of
the forecast level (last value + predicted difference), against the naive forecast "next = last".
Then the recurrent layers are frozen and only the head is fine-tuned, with its own learning rate,
on the sunspot series, and scored the same way.

    python examples/forecast.py            # full run (a few minutes on 2 idle CPU cores)
    python examples/forecast.py --quick    # a few epochs, as the test suite runs it
    python examples/forecast.py --quantize # also: the CO2 model against its int8 version
                                           # (fastnn.quantize_dynamic): RMSE, size, latency
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

import fastnn

WINDOW = 24


def load_series(name: str) -> np.ndarray:
    import statsmodels.api as sm

    if name == "co2":
        s = sm.datasets.co2.load_pandas().data["co2"]
        return s.interpolate().bfill().to_numpy(dtype=np.float64)  # a few missing weeks
    if name == "sunspots":
        return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=np.float64)
    raise ValueError(f"unknown series {name!r}")


def windows(series: np.ndarray, split: float = 0.8):
    """Windows of standardised differences; returns train/test tensors and what scoring needs."""
    diff = np.diff(series)
    n_train = int(len(diff) * split)
    mu, sd = diff[:n_train].mean(), diff[:n_train].std()
    z = (diff - mu) / sd
    idx = np.arange(WINDOW, len(z))
    x = np.stack([z[i - WINDOW:i] for i in idx])[..., None]
    y = z[idx]
    last = series[idx]          # the level just before the forecast step (series[i] precedes diff[i])
    target = series[idx + 1]    # the level to forecast
    train = idx < n_train
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (as_t(x[train]), as_t(y[train]), as_t(x[~train]), as_t(y[~train]), last[~train], target[~train],
            (mu, sd))


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm1 = fastnn.LSTM(1, 128, batch_first=True)
        self.lstm2 = fastnn.LSTM(128, 64, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        y, _ = self.lstm1(x)
        y, _ = self.lstm2(y)
        return self.head(y[:, -1]).squeeze(-1)


def train(model, x, y, params, epochs: int, batch: int = 64, seed: int = 0):
    opt = params if isinstance(params, torch.optim.Optimizer) else fastnn.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            b = perm[i:i + batch]
            loss = nn.functional.mse_loss(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return opt


def rmse_levels(model, x, last, target, stats) -> tuple[float, float]:
    mu, sd = stats
    model.eval()
    with torch.no_grad():
        pred_diff = model(x).numpy() * sd + mu
    model_rmse = math.sqrt(np.mean((last + pred_diff - target) ** 2))
    naive_rmse = math.sqrt(np.mean((last - target) ** 2))
    return model_rmse, naive_rmse


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15, help="training epochs on the CO2 series (default: 15)")
    p.add_argument("--finetune-epochs", type=int, default=40,
                   help="epochs fine-tuning the head on the sunspot series (default: 40)")
    p.add_argument("--quick", action="store_true", help="3 + 5 epochs on the first 600 CO2 windows (smoke test)")
    p.add_argument("--quantize", action="store_true",
                   help="after training on CO2, compare the model with its int8 dynamic version "
                        "(fastnn.quantize_dynamic): test RMSE, state_dict bytes, latency of one window")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs = 3, 5
    torch.manual_seed(0)

    xtr, ytr, xte, yte, last, target, stats = windows(load_series("co2"))
    if args.quick:
        xtr, ytr = xtr[:600], ytr[:600]
    model = Forecaster()
    t0 = time.perf_counter()
    train(model, xtr, ytr, model.parameters(), args.epochs)
    co2 = rmse_levels(model, xte, last, target, stats)
    print(f"CO2 (weekly ppm, {len(xtr)} train / {len(xte)} test windows, {time.perf_counter() - t0:.1f} s): "
          f"LSTM RMSE {co2[0]:.3f} ppm, naive last-value RMSE {co2[1]:.3f} ppm")
    quantized = None
    if args.quantize:
        from fastnn.quantized.report import compare

        quantized = compare(model, lambda m: rmse_levels(m, xte, last, target, stats)[0], (xte[:1],),
                            metric="RMSE (ppm)", sample_name="one 24-week window (batch 1)")

    # Transfer: freeze the recurrent layers, fine-tune the head with its own learning rate.
    xtr, ytr, xte, yte, last, target, stats = windows(load_series("sunspots"))
    before = rmse_levels(model, xte, last, target, stats)
    for layer in (model.lstm1, model.lstm2):
        layer.requires_grad_(False)
    opt = fastnn.optim.Adam([{"params": model.head.parameters(), "lr": 3e-3}], lr=1e-3)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, xtr, ytr, opt, args.finetune_epochs, batch=32)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    sun = rmse_levels(model, xte, last, target, stats)
    print(f"sunspots (yearly, {len(xtr)} train / {len(xte)} test windows): transferred LSTM RMSE before "
          f"fine-tuning {before[0]:.2f}, after fine-tuning the head {sun[0]:.2f}, naive last-value RMSE {sun[1]:.2f}")
    res = {"co2_rmse": co2[0], "co2_naive": co2[1], "sun_before": before[0], "sun_rmse": sun[0],
           "sun_naive": sun[1]}
    if quantized:
        res.update(int8_rmse=quantized["int8"]["metric"], size_ratio=quantized["int8"]["bytes"] / quantized["fp32"]["bytes"])
    return res


if __name__ == "__main__":
    main()

"""Anomaly detection with a fastnn LSTM autoencoder on the Mauna Loa CO2 record.

Data (shipped with statsmodels, no download): 2284 weekly CO2 readings. The series' weekly
differences (trend removed, seasonality kept) are cut into 32-week windows. An LSTM autoencoder
learns to reconstruct the windows of the first 70% of the record (normal behaviour):

    window [32, 1] -> fastnn.LSTM(32) -> last hidden state -> repeated 32 times
                   -> fastnn.LSTM(32) -> Linear(1) -> reconstruction [32, 1]

Into half of the remaining windows we inject an anomaly (a spike, a level shift or six weeks of
sensor noise, in units of the series' own spread). A window is flagged when its
reconstruction error exceeds the 99th percentile of the errors on the training windows; the
script reports precision, recall and F1 of the flags against the injected truth.

    python examples/lstm_autoencoder.py            # full run (a few minutes on 2 idle CPU cores)
    python examples/lstm_autoencoder.py --quick    # a few epochs, as the test suite runs it
    python examples/lstm_autoencoder.py --quantize # also: the model against its int8 version
                                                   # (fastnn.quantize_dynamic): F1, size, latency
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import fastnn

WINDOW = 32


def load_windows():
    import statsmodels.api as sm

    s = sm.datasets.co2.load_pandas().data["co2"].interpolate().bfill().to_numpy(dtype=np.float64)
    d = np.diff(s)
    n_train = int(len(d) * 0.7)
    mu, sd = d[:n_train].mean(), d[:n_train].std()
    z = (d - mu) / sd
    starts = np.arange(0, len(z) - WINDOW + 1, 4)
    w = np.stack([z[i:i + WINDOW] for i in starts])
    train = starts + WINDOW <= n_train
    test = starts >= n_train
    return w[train], w[test]


def inject(windows: np.ndarray, seed: int = 0):
    """Anomalies into half the windows; returns the spoiled windows and the truth (1 = anomalous)."""
    rng = np.random.default_rng(seed)
    out = windows.copy()
    truth = np.zeros(len(out), dtype=int)
    for i in rng.choice(len(out), size=len(out) // 2, replace=False):
        kind = rng.integers(3)
        at = rng.integers(4, WINDOW - 6)
        if kind == 0:    # spike
            out[i, at] += rng.choice([-1, 1]) * rng.uniform(4, 6)
        elif kind == 1:  # level shift for the rest of the window
            out[i, at:] += rng.choice([-1, 1]) * rng.uniform(1.5, 2.5)
        else:            # a noisy sensor for six weeks
            out[i, at:at + 6] += rng.normal(0.0, 2.5, size=6)
        truth[i] = 1
    return out, truth


class Autoencoder(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.encoder = fastnn.LSTM(1, hidden, batch_first=True)
        self.decoder = fastnn.LSTM(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        _, (h, _) = self.encoder(x)
        code = h[-1].unsqueeze(1).expand(-1, x.shape[1], -1)
        y, _ = self.decoder(code)
        return self.out(y)


def errors(model, x):
    model.eval()
    with torch.no_grad():
        return ((model(x) - x) ** 2).mean(dim=(1, 2)).numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60,
                   help="training epochs of the autoencoder on the normal windows (default: 60)")
    p.add_argument("--quick", action="store_true", help="6 epochs (smoke test)")
    p.add_argument("--quantize", action="store_true",
                   help="after training, compare the model with its int8 dynamic version (fastnn.quantize_dynamic): "
                        "F1 (threshold recomputed from the int8 model's training errors), state_dict bytes, "
                        "latency of one window")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 6
    from sklearn.metrics import f1_score, precision_score, recall_score

    torch.manual_seed(0)
    train_w, test_w = load_windows()
    test_w, truth = inject(test_w)
    xtr = torch.tensor(train_w, dtype=torch.float32)[..., None]
    xte = torch.tensor(test_w, dtype=torch.float32)[..., None]

    model = Autoencoder()
    opt = fastnn.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 32):
            b = xtr[perm[i:i + 32]]
            loss = nn.functional.mse_loss(model(b), b)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def flag(m):
        threshold = np.percentile(errors(m, xtr), 99)
        return threshold, (errors(m, xte) > threshold).astype(int)

    threshold, flags = flag(model)
    res = {"precision": precision_score(truth, flags, zero_division=0), "recall": recall_score(truth, flags),
           "f1": f1_score(truth, flags)}
    print(f"CO2 autoencoder: {len(xtr)} training windows, {len(xte)} test windows ({truth.sum()} anomalous), "
          f"trained {args.epochs} epochs in {time.perf_counter() - t0:.1f} s")
    print(f"threshold (99th percentile of training error) {threshold:.3f}: precision {res['precision']:.3f}, "
          f"recall {res['recall']:.3f}, F1 {res['f1']:.3f}")
    if args.quantize:
        from fastnn.quantized.report import compare

        q = compare(model, lambda m: f1_score(truth, flag(m)[1]), (xte[:1],), metric="F1",
                    sample_name="one 32-week window (batch 1)")
        res.update(int8_f1=q["int8"]["metric"], size_ratio=q["int8"]["bytes"] / q["fp32"]["bytes"])
    return res


if __name__ == "__main__":
    main()

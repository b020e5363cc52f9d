"""examples/train_digits.py runs end to end: >= 95% test accuracy, loss curve equal to torch's, and a
training time that is not the first run's warm-up."""

import re
import time

import pytest

from ._examples import load_example, one_thread  # noqa: F401 (a fixture)

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data")


def test_train_digits(capsys, one_thread):
    assert load_example("train_digits").main(["--epochs", "30", "--device", "cpu", "--quantize"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    # --quantize: int8 dynamic test accuracy within 0.5 points of fp32 (main returns 1 otherwise)
    assert re.search(r"int8 test accuracy [\d.]+ vs fp32 [\d.]+: OK", out), out
    m = re.search(r"time per epoch.*: torch ([\d.]+) ms, fastnn ([\d.]+) ms", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0


def test_timing_warms_up_and_alternates():
    """The first training ever run pays one-off costs (here 0.3 s on its first epoch): they must
    land in the warm-up, and the timed runs must take turns."""
    module = load_example("train_digits")
    calls, made = [], []

    def make(name, epochs):
        first_ever = not made
        made.append(name)

        def run():
            for e in range(epochs):
                calls.append(name)
                if first_ever and e == 0:
                    time.sleep(0.3)
                yield float(e)
        return run()

    out = module.alternate(make, ["torch", "fastnn"], 4)
    assert made == ["torch", "fastnn", "torch", "fastnn"]  # one warm-up run each, then the timed runs
    assert calls[2:] == ["torch", "fastnn", "fastnn", "torch", "torch", "fastnn", "fastnn", "torch"]
    for name in ("torch", "fastnn"):
        curve, seconds = out[name]
        assert curve == [0.0, 1.0, 2.0, 3.0] and max(seconds) < 0.2

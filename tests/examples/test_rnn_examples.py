"""The two recurrent examples run end to end (quick mode) on the real series statsmodels ships."""

import importlib.util
import math

import pytest

from ._examples import load_example

needs = pytest.mark.skipif(importlib.util.find_spec("statsmodels") is None or importlib.util.find_spec("sklearn") is None,
                           reason="the examples need statsmodels (data) and scikit-learn (metrics); "
                                  "scripts/env.sh installs them")


@needs
def test_forecast_example_beats_naive_on_co2(capsys):
    res = load_example("forecast").main(["--quick", "--quantize"])
    assert all(math.isfinite(v) for v in res.values())
    # int8 dynamic: the CO2 RMSE within 2% (relative) of fp32, the weights in about a quarter of the bytes
    assert abs(res["int8_rmse"] - res["co2_rmse"]) <= 0.02 * res["co2_rmse"], res
    assert res["size_ratio"] < 0.28
    assert "fp32 against int8 dynamic" in capsys.readouterr().out
    # a few epochs already learn CO2's seasonal cycle: better than "next = last"
    assert res["co2_rmse"] < res["co2_naive"]
    # fine-tuning the head on the second series helps
    assert res["sun_rmse"] < res["sun_before"]


@needs
def test_autoencoder_example_flags_anomalies(capsys):
    res = load_example("lstm_autoencoder").main(["--quick", "--quantize"])
    # int8 dynamic flags the same windows: F1 within 0.02 of fp32's
    assert abs(res["int8_f1"] - res["f1"]) <= 0.02, res
    assert "fp32 against int8 dynamic" in capsys.readouterr().out
    assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0
    # far better than chance (half the windows are anomalous: flagging at random gives F1 ~ 0.5)
    assert res["f1"] > 0.6

"""examples/edge_deploy.py (quick mode): every artifact runs in a fresh process and forecasts as
the eager model it came from."""

import importlib.util

import pytest

from ._examples import load_example

pytestmark = [
    pytest.mark.slow,  # one AOTInductor compile and two ONNX exports
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("statsmodels", "onnxruntime", "onnxscript")),
                       reason="the example needs statsmodels (data), onnxscript (export) and onnxruntime; "
                              "scripts/env.sh installs them"),
]


def test_edge_deploy_artifacts_agree_with_eager(capsys):
    import fastnn

    if fastnn.library_path() is None:
        pytest.skip("the AOTInductor artifact needs fastnn's compiled library")
    res = load_example("edge_deploy").main(["--quick", "--threads", "1"])
    assert set(res) == {"torch", "fp32", "int8", "aoti", "onnx", "ort-int8"}
    # the same arithmetic gives the same forecasts, whatever runs it
    assert res["fp32"]["rmse"] == pytest.approx(res["torch"]["rmse"], rel=1e-4)
    assert res["aoti"]["rmse"] == pytest.approx(res["int8"]["rmse"], rel=1e-4)
    assert res["onnx"]["rmse"] == pytest.approx(res["int8"]["rmse"], rel=1e-4)
    # int8: within 2% of fp32's RMSE, about a quarter of the bytes
    assert abs(res["int8"]["rmse"] - res["fp32"]["rmse"]) <= 0.02 * res["fp32"]["rmse"]
    assert res["int8"]["bytes"] < 0.3 * res["fp32"]["bytes"]
    assert all(r["latency_ms"] > 0 and r["peak_rss_mb"] > 0 for r in res.values())
    assert "fastnn int8 AOTI" in capsys.readouterr().out

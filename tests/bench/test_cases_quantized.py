"""The quantized rows time every implementation they name, on the same weights."""

import importlib.util
import re

import pytest
import torch

from fastnn.bench import cli
from fastnn.bench.cases import cases_for


def test_quantized_row_times_fastnn_torch_and_onnxruntime():
    (c,) = cases_for("cpu", "quantized/gru_cell_step", quick=True)
    row = cli.run_case(c, torch.device("cpu"), rounds=1, budget_s=0.02)
    assert row["baseline"] == "fastnn fp32"
    want = {"torch fp32"}
    if importlib.util.find_spec("onnxruntime") is not None:
        want |= {"onnxruntime int8", "onnxruntime fp32"}
    assert set(row["others_ms"]) == want and all(v > 0 for v in row["others_ms"].values())
    assert row["max_rel_error"] < 0.05  # int8 against the fp32 layer on the same input
    size = float(re.search(r"\(([\d.]+)x\)", row["note"]).group(1))
    assert size <= 0.27, row["note"]


def test_a_case_without_onnxruntime_says_so(monkeypatch):
    import fastnn.bench.cases_quantized as q

    monkeypatch.setattr(q, "_onnxruntime", lambda *a, **k: None)
    (c,) = cases_for("cpu", "quantized/lstm_infer_T64_B1")
    run = c.make(torch.device("cpu"))
    assert run.baseline_name == "torch fp32" and not run.goal_applies
    assert "onnxruntime is not installed" in run.note


def test_without_onnxruntime_a_goal_against_it_is_not_applicable(monkeypatch):
    import fastnn.bench.cases_quantized as q

    monkeypatch.setattr(q, "_onnxruntime", lambda *a, **k: None)
    (c,) = cases_for("cpu", "quantized/gru_infer_T64_B1")
    assert c.also[0].against == "onnxruntime fp32"
    row = cli.run_case(c, torch.device("cpu"), rounds=1, budget_s=0.02)
    assert row["also"][0]["met"] is None

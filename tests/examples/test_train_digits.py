"""examples/train_digits.py runs end to end: >= 95% test accuracy, loss curve equal to torch's."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"


def test_train_digits(capsys):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--epochs", "30", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out

"""fastnn-bench runs the quick cases, prints the table and writes the JSON and the chart."""

import json

import pytest

from fastnn.bench import cli
from fastnn.bench.cases import all_cases, cases_for


def test_cases_are_well_formed():
    cases = all_cases()
    assert cases, "no benchmark cases registered"
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    for c in cases:
        assert set(c.devices) <= {"cpu", "cuda"} and c.shape and c.family
    assert cases_for("cpu", quick=True), "CI's smoke run needs at least one quick CPU case"


def test_quick_run_writes_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["--device", "cpu", "--quick", "-k", "optim", "--rounds", "1", "--budget", "0.05",
                   "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "optim/adamw-small-smoke" in out
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    row = data["rows"][0]
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"]
    assert row["baseline_ms"] > 0 and row["fastnn_ms"] > 0 and row["speedup"] > 0
    assert 0 <= row["max_rel_error"] < 1e-4
    # the saved file renders as a Markdown table (what the README's table is copied from)
    assert cli.main(["--markdown", str(json_file)]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| case | dtype |") and md[1].startswith("|---|")
    assert md[2].startswith("| optim/adamw-small-smoke | float32 |") and f"{row['speedup']:.2f}x" in md[2]
    assert list(tmp_path.glob("*.png")), "the chart was not written"


def test_unknown_filter_fails(capsys):
    assert cli.main(["--device", "cpu", "-k", "no-such-case", "--no-save"]) == 1

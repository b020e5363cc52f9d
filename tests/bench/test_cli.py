"""fastnn-bench runs the quick cases, prints the table and writes the JSON and the chart."""

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fastnn.bench import cases, cli, report
from fastnn.bench.cases import Case, Goal, Run, all_cases, cases_for
from fastnn.bench.timing import time_pair

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cases_are_well_formed():
    cases = all_cases()
    assert cases, "no benchmark cases registered"
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    for c in cases:
        assert set(c.devices) <= {"cpu", "cuda"} and c.shape and c.family
    assert cases_for("cpu", quick=True), "CI's smoke run needs at least one quick CPU case"


def test_every_goal_says_where_it_comes_from():
    goals = [c for c in all_cases() if c.goal is not None]
    assert goals
    for c in goals:
        assert isinstance(c.goal, Goal) and c.goal.speedup > 0, c.id
        assert len(c.goal.basis) > 20, f"{c.id}: the goal's basis is missing"


def test_no_citation_of_documents_outside_the_repository():
    files = [p for d in ("fastnn/bench", "bench", "examples") for p in (ROOT / d).rglob("*.py")]
    assert files
    for p in files:
        assert not re.search(r"TARGETS|DESIGN\.md|shared/anchors", p.read_text()), p


def test_shape_and_note_agree_on_the_parameter_count():
    (smoke,) = [c for c in all_cases() if c.id == "optim/adamw-small-smoke"]
    assert smoke.shape.startswith("0.2M params")  # 10 * 128 * 128 + 10 * 3001 = 193,850
    assert smoke.shape in smoke.make(torch.device("cpu")).note


def test_quick_run_writes_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["--device", "cpu", "--quick", "-k", "optim", "--rounds", "1", "--budget", "0.05",
                   "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "speedup" in out and "optim/adamw-small-smoke" in out
    assert f"results: {tmp_path}" in captured.err
    assert re.search(r"max rel err \d\.\de-\d\d", captured.err), "the progress line's error is not formatted"
    assert re.search(r"\b(AVX|NEON)|x86_64|aarch64", captured.err) and "threads" in captured.err
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    row = data["rows"][0]
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"] and data["meta"]["fastnn_version"]
    assert data["meta"]["isa"] and data["meta"]["threads"] >= 1
    assert row["baseline_ms"] > 0 and row["fastnn_ms"] > 0 and row["speedup"] > 0
    assert 0 <= row["max_rel_error"] < 1e-4
    for name in ("baseline", "fastnn"):
        t = row["timings_ms"][name]
        assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"] and t["samples"] >= 1
    assert row["timings_ms"]["fastnn"]["median"] == row["fastnn_ms"]
    lo, hi = row["speedup_range"]
    assert lo <= row["speedup"] <= hi
    # the saved file renders as a Markdown table (what the README's table is copied from)
    assert cli.main(["--markdown", str(json_file)]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| case | dtype |") and md[1].startswith("|---|")
    assert md[2].startswith("| optim/adamw-small-smoke | float32 |") and f"{row['speedup']:.2f}x" in md[2]
    assert list(tmp_path.glob("*.png")), "the chart was not written"


def test_unknown_filter_fails(capsys):
    assert cli.main(["--device", "cpu", "-k", "no-such-case", "--no-save"]) == 1


def _row(case, base, fast, **kw):
    row = {"case": case, "dtype": "float32", "shape": "s", "baseline": "torch", "baseline_ms": base,
           "fastnn_ms": fast, "speedup": base / fast, "goal": "", "goal_speedup": None, "goal_met": None,
           "max_rel_error": 5.692323532438873e-06, "others_ms": {"torch loop": 86.2}, "note": ""}
    row.update(kw)
    return row


def test_one_unit_per_column():
    rows = [_row("a", 0.176, 0.0956), _row("b", 86.25, 12.0, fastnn_GBps=1234.5)]
    table = report.format_table(rows)
    head, _, *lines = table.splitlines()
    assert "torch ms" in head and "fastnn ms" in head and "GB/s" in head
    body = "\n".join(lines[:2])
    assert not re.search(r"\d\s*(us|µs|ms|GB/s)\b", body), "a unit inside a cell: units belong in the header"
    assert "0.176" in body and "0.0956" in body and "86.2" in body and "12.0" in body
    assert "5.7e-06" in body and "5.692323532438873e-06" not in table
    assert "a: torch loop 86.2 ms" in table  # the footnote names its unit
    assert [report.fmt_num(v) for v in (0.12, 0.0956, 1.0, 12.0, 203.4)] == ["0.120", "0.0956", "1.00", "12.0", "203"]


def test_progress_line_formats_the_error():
    row = _row("a", 0.176, 0.0956)
    row["timings_ms"] = {"baseline": {"q1": 0.17, "q3": 0.18}, "fastnn": {"q1": 0.09, "q3": 0.1}}
    line = cli.progress_line(row)
    assert "max rel err 5.7e-06" in line and "5.692323532438873e-06" not in line
    assert "torch 0.176 ms [0.170-0.180]" in line and "fastnn 0.0956 ms [0.0900-0.100]" in line


def test_chart_colours_bars_by_the_goal():
    rows = [
        _row("faster-but-missed", 1.5, 1.0, goal=">= 2x", goal_speedup=2.0, goal_met=False),
        _row("slower-but-met", 0.8, 1.0, goal=">= 0.5x", goal_speedup=0.5, goal_met=True),
        _row("no-goal", 3.0, 1.0, speedup_range=[2.5, 3.5]),
        _row("goal-not-applicable", 3.0, 1.0, goal=">= 2x", goal_speedup=2.0, goal_met=None),
    ]
    bars = {b["case"]: b for b in report.chart_bars(rows)}
    assert bars["faster-but-missed"]["colour"] == report.GOAL_COLOURS[False]
    assert bars["slower-but-met"]["colour"] == report.GOAL_COLOURS[True]
    assert bars["no-goal"]["colour"] == bars["goal-not-applicable"]["colour"] == report.GOAL_COLOURS[None]
    assert bars["goal-not-applicable"]["goal"] is None and bars["faster-but-missed"]["goal"] == 2.0
    assert (bars["no-goal"]["low"], bars["no-goal"]["high"]) == (2.5, 3.5)
    assert "(missed)" in report.format_table(rows) and "(n/a here)" in report.format_table(rows)


def test_chart_log_axis_in_plain_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    assert [report._plain_number(v) for v in (0.5, 1.0, 2.0, 20.0)] == ["0.5x", "1x", "2x", "20x"]
    rows = [_row("a", 2.0, 1.0, speedup_range=[1.5, 2.5], goal=">= 1x", goal_speedup=1.0, goal_met=True)]
    assert report.write_chart(rows, "t", str(tmp_path / "c.png"))


def _fake_case(goal_applies):
    def make(device):
        x = torch.ones(64)
        return Run(baseline=lambda: x * 2, baseline_name="torch", fastnn=lambda: x + x, error=lambda: 0.0,
                   goal_applies=goal_applies)
    return Case("t", "fake", "n=64", torch.float32, ("cpu",), make, Goal(0.01, "a goal any run meets"))


@pytest.mark.parametrize("applies", [True, False])
def test_goal_is_met_only_where_it_applies(applies):
    row = cli.run_case(_fake_case(applies), torch.device("cpu"), rounds=2, budget_s=0.02)
    assert row["goal_met"] is (True if applies else None)
    assert row["goal_basis"] == "a goal any run meets" and row["goal"] == ">= 0.01x"
    assert row["timings_ms"]["baseline"]["samples"] >= 2  # one or more per round


def _case_with_further_goal(speedup):
    def make(device):
        x = torch.ones(64)
        return Run(baseline=lambda: x * 2, baseline_name="torch", fastnn=lambda: x + x, error=lambda: 0.0,
                   others={"fastnn fp32": lambda: x + x})
    return Case("t", "fake", "n=64", torch.float32, ("cpu",), make, Goal(0.01, "a goal any run meets"),
                also=(Goal(speedup, "a further goal", against="fastnn fp32"),))


@pytest.mark.parametrize("speedup, met", [(0.01, True), (1000.0, False)])
def test_a_further_goal_against_another_implementation_decides_the_row(speedup, met):
    row = cli.run_case(_case_with_further_goal(speedup), torch.device("cpu"), rounds=2, budget_s=0.02)
    (also,) = row["also"]
    assert also["against"] == "fastnn fp32" and also["met"] is met
    assert also["speedup"] == pytest.approx(row["others_ms"]["fastnn fp32"] / row["fastnn_ms"])
    assert row["goal_met"] is met  # the main goal is always met here
    assert ("(met)" if met else "(missed)") in report.format_table([row]).split("fastnn fp32")[1]


def test_a_further_goal_must_name_what_it_is_against():
    with pytest.raises(ValueError, match="names the implementation"):
        cases.case("t", "bad", shape="", dtype=torch.float32, devices=("cpu",), also=(Goal(2.0, "basis"),))


def test_default_out_is_absolute_and_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.default_out() == str(ROOT / "bench" / "results")  # this checkout, whatever the cwd
    monkeypatch.setattr(cli, "source_checkout", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    want = tmp_path / "cache" / "fastnn" / "bench-results"
    assert cli.default_out() == str(want)
    monkeypatch.setattr(cli, "run_cases", lambda *a, **k: [])
    assert cli.main(["--device", "cpu", "--quick", "-k", "optim"]) == 0
    assert f"results: {want}" in capsys.readouterr().err
    assert list(want.glob("*.json")) and not list(tmp_path.glob("bench"))


def test_commit_only_from_a_source_checkout(tmp_path, monkeypatch):
    assert cli.source_checkout() == str(ROOT)
    assert cli._git_commit(cli.source_checkout())  # this worktree is a git checkout
    wheel = tmp_path / "site-packages" / "fastnn"
    wheel.mkdir(parents=True)
    monkeypatch.setattr(cli, "_PACKAGE_DIR", str(wheel))
    assert cli.source_checkout() is None and cli._git_commit(None) is None


@pytest.mark.parametrize("flags, isa", [
    ({"avx", "avx2", "fma"}, "AVX2, FMA"),
    ({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}, "AVX-512 (VNNI, BF16), AMX"),
    ({"asimd"}, "NEON"),
])
def test_cpu_isa(flags, isa):
    assert cli.cpu_isa(flags) == isa


def test_list_shows_goals_with_their_basis(capsys):
    assert cli.main(["--device", "cpu", "--list"]) == 0
    out = capsys.readouterr().out
    assert "rnn/lstm_infer_T100_B32_H256" in out and ">= 1.5x" in out
    assert "goal from: 2-core CPU, 2 threads, lstm infer: torch.nn 94 ms; goal <= 63 ms" in out


def test_gpu_cases_can_be_listed_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--device", "cuda", "--list"]) == 0
    assert "moe/" in capsys.readouterr().out


def test_cpu_timing_keeps_the_spread_of_alternating_rounds():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    stats = time_pair(fns, torch.device("cpu"), rounds=3, budget_s=0.03)
    for s in stats.values():
        assert s["samples"] >= 3 and s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    # each round times a and then b: the calls switch between them at least 2 * rounds - 1 times
    switches = sum(x != y for x, y in zip(calls, calls[1:]))
    assert switches >= 5


@pytest.mark.gpu
def test_cuda_timing_keeps_every_sample():
    x = torch.randn(1 << 20, device="cuda")
    stats = time_pair({"a": lambda: x * 2, "b": lambda: x + x}, torch.device("cuda"), rounds=2, budget_s=0.1)
    for s in stats.values():
        assert s["samples"] > 2, "do_bench returned one number: the spread is lost"
        assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


def test_cpu_run_prints_no_cuda_home_warning():
    # A CUDA build of torch without a GPU logs about CUDA_HOME when torch.utils.benchmark loads;
    # fastnn-bench on the CPU keeps that out of its output.
    code = ("import torch, fastnn.bench.timing as t\n"
            "t.time_pair({'a': lambda: torch.ones(4) * 2}, torch.device('cpu'), rounds=1, budget_s=0.01)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_HOME" not in proc.stderr + proc.stdout

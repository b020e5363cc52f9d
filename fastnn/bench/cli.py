"""``fastnn-bench``: run every benchmark case available on a device, print a table, and write JSON
and a PNG chart (default: the checkout's ``bench/results/`` when fastnn runs from its source tree,
else ``~/.cache/fastnn/bench-results``; the folder is printed, ``--out`` chooses another).

Each row shows the torch baseline and fastnn measured in the same run, the speedup, the case's goal
(a speedup over that baseline; ``--list`` says where each goal comes from) and fastnn's max
relative error against the reference. Times are medians; the JSON also keeps their quartiles,
minimum and maximum, and the chart draws the quartiles as error bars.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import traceback
from typing import Any

import torch

from .. import __version__, _extension
from .cases import Case, cases_for
from .report import fmt_err, fmt_num, format_markdown, format_table, write_chart
from .timing import time_pair

__all__ = ["main", "run_cases", "device_description", "format_table", "format_markdown", "write_chart"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> str:
    """The widest vector instruction set the CPU offers, with the extensions that matter to
    fastnn's kernels: "AVX-512 (VNNI, BF16), AMX", "AVX2, FMA", "NEON" ..."""
    flags = _cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        ext = [n for f, n in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("avx512_fp16", "FP16")) if f in flags]
        isa = "AVX-512" + (f" ({', '.join(ext)})" if ext else "")
    elif "avx2" in flags:
        isa = "AVX2" + (", FMA" if "fma" in flags else "") + (", AVX-VNNI" if "avx_vnni" in flags else "")
    elif "asimd" in flags:
        isa = "NEON" + (", SVE" if "sve" in flags else "")
    else:
        isa = platform.machine() or "unknown"
    return isa + (", AMX" if "amx_tile" in flags else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_description(device: torch.device) -> dict[str, Any]:
    cpu = {"cpu_name": _cpu_name(), "isa": cpu_isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "name": props.name, "sms": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1), **cpu}
    return {"device": "cpu", "name": cpu["cpu_name"], **cpu}


def _slug(desc: dict[str, Any]) -> str:
    if desc["device"] == "cuda":
        m = re.search(r"(H100|H200|A100|L4|L40S?|B200|GH200|RTX \w+)", desc["name"])
        return (m.group(1) if m else "cuda").lower().replace(" ", "")
    return f"cpu-{desc['threads']}t"


def source_checkout() -> str | None:
    """The root of the source tree fastnn runs from (an editable install or a plain checkout), or
    None for an installed wheel, whose folder says nothing about any repository."""
    root = os.path.dirname(_PACKAGE_DIR)
    if os.path.exists(os.path.join(root, ".git")) and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return root
    return None


def _git_commit(root: str | None) -> str | None:
    """The checkout's commit, "+dirty" when tracked files differ from it; None outside a checkout."""
    if root is None:
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def default_out() -> str:
    root = source_checkout()
    if root is not None:
        return os.path.join(root, "bench", "results")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastnn", "bench-results")


def run_case(c: Case, device: torch.device, *, rounds: int, budget_s: float, clock: str = "wall") -> dict[str, Any]:
    row: dict[str, Any] = {"case": c.id, "device": device.type, "dtype": str(c.dtype).replace("torch.", ""),
                           "shape": c.shape, "goal": str(c.goal) if c.goal else "", "goal_speedup": c.goal_speedup,
                           "goal_basis": c.goal.basis if c.goal else ""}
    run = c.make(device)
    fns = {"baseline": run.baseline, "fastnn": run.fastnn, **run.others}
    stats = time_pair(fns, device, rounds=rounds, budget_s=budget_s, clock=clock)
    base, fast = stats["baseline"], stats["fastnn"]
    row.update(baseline=run.baseline_name, baseline_ms=base["median"], fastnn_ms=fast["median"],
               others_ms={k: stats[k]["median"] for k in run.others}, note=run.note,
               timings_ms={"baseline": base, "fastnn": fast, **{k: stats[k] for k in run.others}})
    row["speedup"] = base["median"] / fast["median"] if fast["median"] > 0 else None
    if row["speedup"] is not None and fast["q1"] > 0:
        row["speedup_range"] = [base["q1"] / fast["q3"], base["q3"] / fast["q1"]]
    row["max_rel_error"] = run.error() if run.error is not None else None
    if run.bytes:
        row["fastnn_GBps"] = run.bytes / (fast["median"] * 1e-3) / 1e9
    if run.flops:
        row["fastnn_TFLOPs"] = run.flops / (fast["median"] * 1e-3) / 1e12
    row["goal_met"] = None
    if c.goal_speedup is not None and row["speedup"] is not None and run.goal_applies:
        row["goal_met"] = row["speedup"] >= c.goal_speedup
    row["also"] = [_other_goal(g, stats, fast["median"], c.id, run.goal_applies) for g in c.also]
    if row["goal_met"] is not None and row["also"]:  # the row meets its goals when it meets all of them
        row["goal_met"] = row["goal_met"] and all(a["met"] is not False for a in row["also"])
    del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _other_goal(goal, stats: dict[str, Any], fastnn_ms: float, case_id: str, applies: bool) -> dict[str, Any]:
    """A further goal of a case: fastnn's speedup over one of the other timed implementations. A run
    whose goals do not apply (a fallback baseline) may lack that implementation: the goal is then
    neither met nor missed."""
    if goal.against not in stats:
        if applies:
            raise ValueError(f"{case_id}: a goal is against {goal.against!r}, which the case does not time")
        return {"against": goal.against, "speedup": None, "goal": str(goal), "goal_speedup": goal.speedup,
                "basis": goal.basis, "met": None}
    ratio = stats[goal.against]["median"] / fastnn_ms
    return {"against": goal.against, "speedup": ratio, "goal": str(goal), "goal_speedup": goal.speedup,
            "basis": goal.basis, "met": ratio >= goal.speedup}


def progress_line(row: dict[str, Any]) -> str:
    t = row.get("timings_ms", {})

    def timing(name: str, key: str) -> str:
        q = t.get(key)
        iqr = f" [{fmt_num(q['q1'])}-{fmt_num(q['q3'])}]" if q else ""
        return f"{name} {fmt_num(row[key + '_ms'])} ms{iqr}"

    speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
    return (f"      {timing('torch', 'baseline')}  {timing('fastnn', 'fastnn')}  speedup {speed}  "
            f"max rel err {fmt_err(row['max_rel_error'])}")


def run_cases(cases: list[Case], device: torch.device, *, rounds: int = 3, budget_s: float = 0.6,
              progress: bool = True, clock: str = "wall") -> list[dict[str, Any]]:
    rows = []
    for i, c in enumerate(cases, 1):
        if progress:
            print(f"[{i}/{len(cases)}] {c.id} ({c.shape}, {str(c.dtype).replace('torch.', '')}) ...",
                  file=sys.stderr, flush=True)
        try:
            row = run_case(c, device, rounds=rounds, budget_s=budget_s, clock=clock)
        except Exception as exc:  # a broken case is reported, the others still run
            traceback.print_exc(file=sys.stderr)
            row = {"case": c.id, "dtype": str(c.dtype).replace("torch.", ""), "shape": c.shape,
                   "failed": f"{type(exc).__name__}: {exc}"}
        if progress and "failed" not in row:
            print(progress_line(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def header(desc: dict[str, Any], ext: dict[str, Any], commit: str | None) -> str:
    """What ran where: the device, the CPU and its instruction set, threads, torch and fastnn."""
    cpu = (f"{desc['cpu_name']} ({desc['isa']}; torch's CPU kernels: {desc['torch_cpu_capability']}"
           f"{'; fastnn kernels: ' + str(ext['cpu_isa']) if ext.get('cpu_isa') else ''})")
    where = f"{desc['name']}, host CPU {cpu}" if desc["device"] == "cuda" else cpu
    kernels = "yes" if ext["extension"] else f"no ({ext['extension_error']})"
    return (f"{where}, {desc['threads']} threads, torch {torch.__version__}, fastnn {__version__}"
            f"{f' (commit {commit})' if commit else ''}; compiled kernels: {kernels}"
            f"{', CUDA kernels' if ext['cuda_kernels'] else ''}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastnn-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: cuda when a GPU is present, else cpu)")
    p.add_argument("-k", "--filter", default=None, help="only cases whose id matches this regex")
    p.add_argument("--quick", action="store_true", help="only the smallest cases (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per case")
    p.add_argument("--budget", type=float, default=0.6, help="seconds of timing per implementation and case")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="CPU timing: wall time (what a user sees) or process CPU time (steadier on a shared "
                        "machine; use with --threads 1)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the JSON and PNG (default: the checkout's bench/results, or "
                        "~/.cache/fastnn/bench-results for an installed fastnn; printed before the run)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--list", action="store_true", help="list the cases with their goals and exit")
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print the table of a saved result file in Markdown and exit (runs nothing)")
    return p


def _list(cases: list[Case]) -> None:
    for c in cases:
        print(f"{c.id:50s} {c.shape:40s} {c.goal or 'no goal'}")
        if c.goal:
            print(f"{'':50s} goal from: {c.goal.basis}")
        for g in c.also:
            print(f"{'':50s} also {g} against {g.against}: {g.basis}")


def _save(rows: list[dict[str, Any]], meta: dict[str, Any], title: str, stem: str) -> None:
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    chart = write_chart(rows, title, stem + ".png")
    print(f"\nwrote {stem}.json" + (f" and {stem}.png" if chart else ""))


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            saved = json.load(f)
        print(format_markdown(saved["rows"]))
        return 0

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.list:  # listing runs nothing: the GPU cases can be listed on a machine without a GPU
        _list(cases_for(dev, args.filter, quick=args.quick))
        return 0
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device(dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and dev != "cpu":
        p.error("--clock process times CPU work; GPU timings use CUDA events")
    cases = cases_for(dev, args.filter, quick=args.quick)
    if not cases:
        print(f"fastnn-bench: no cases match on {dev}", file=sys.stderr)
        return 1

    desc = device_description(device)
    ext = _extension.info()
    commit = _git_commit(source_checkout())
    out = os.path.abspath(args.out or default_out())
    print(f"fastnn-bench on {header(desc, ext, commit)}; {len(cases)} case{'s' * (len(cases) != 1)}", file=sys.stderr)
    print("results: " + ("not saved (--no-save)" if args.no_save else out), file=sys.stderr, flush=True)
    rows = run_cases(cases, device, rounds=args.rounds, budget_s=args.budget, clock=args.clock)
    title = f"fastnn on {desc['name']}" + (f" ({desc['isa']}), {desc['threads']} threads" if dev == "cpu" else "") + (
        ", CPU time" if args.clock == "process" else "") + f", torch {torch.__version__}"
    print()
    print(title)
    print(format_table(rows))

    if not args.no_save:
        date = _dt.date.today().isoformat()
        stem = os.path.join(out, f"{date}-{_slug(desc)}" + ("-quick" if args.quick else "")
                            + ("-cputime" if args.clock == "process" else "")
                            + ("-" + re.sub(r"\W+", "_", args.filter) if args.filter else ""))
        meta = {"date": date, **desc, "clock": args.clock, "torch": torch.__version__, "fastnn_version": __version__,
                "fastnn_commit": commit, "extension": ext,
                # Switches that change which path runs (FASTNN_BACKEND, FASTNN_RNN_PERSISTENT, ...).
                "fastnn_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTNN_")},
                "command": "fastnn-bench " + " ".join(argv if argv is not None else sys.argv[1:])}
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        _save(rows, meta, title, stem)
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

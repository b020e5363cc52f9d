"""``fastnn-bench``: run every benchmark case available on a device, print a table, and write JSON
and a PNG chart under ``bench/results/``.

Each row shows the torch baseline and fastnn measured in the same run, the speedup, the goal from
TARGETS.md and fastnn's max relative error against the reference.
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

from .. import _extension
from .cases import Case, cases_for
from .timing import time_pair

__all__ = ["main", "run_cases", "device_description"]


def device_description(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "name": props.name, "sms": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1)}
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"device": "cpu", "name": name, "threads": torch.get_num_threads()}


def _slug(desc: dict[str, Any]) -> str:
    if desc["device"] == "cuda":
        m = re.search(r"(H100|H200|A100|L4|L40S?|B200|GH200|RTX \w+)", desc["name"])
        return (m.group(1) if m else "cuda").lower().replace(" ", "")
    return f"cpu-{desc['threads']}t"


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.1f} us" if v < 0.1 else f"{v:.3f} ms"


def run_case(c: Case, device: torch.device, *, rounds: int, budget_s: float, clock: str = "wall") -> dict[str, Any]:
    row: dict[str, Any] = {"case": c.id, "device": device.type, "dtype": str(c.dtype).replace("torch.", ""),
                           "shape": c.shape, "goal": c.goal, "goal_speedup": c.goal_speedup}
    run = c.make(device)
    fns = {"baseline": run.baseline, "fastnn": run.fastnn, **run.others}
    times = time_pair(fns, device, rounds=rounds, budget_s=budget_s, clock=clock)
    row.update(baseline=run.baseline_name, baseline_ms=times["baseline"], fastnn_ms=times["fastnn"],
               others_ms={k: times[k] for k in run.others}, note=run.note)
    row["speedup"] = times["baseline"] / times["fastnn"] if times["fastnn"] > 0 else None
    row["max_rel_error"] = run.error() if run.error is not None else None
    if run.bytes:
        row["fastnn_GBps"] = run.bytes / (times["fastnn"] * 1e-3) / 1e9
    if run.flops:
        row["fastnn_TFLOPs"] = run.flops / (times["fastnn"] * 1e-3) / 1e12
    if c.goal_speedup is not None and row["speedup"] is not None:
        row["goal_met"] = row["speedup"] >= c.goal_speedup
    del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table's header and one row of cells per result."""
    head = ["case", "dtype", "shape", "torch baseline", "torch ms", "fastnn ms", "speedup", "goal", "max rel err",
            "throughput"]
    lines = []
    for r in rows:
        if "failed" in r:
            lines.append([r["case"], r.get("dtype", ""), r.get("shape", ""), "FAILED: " + r["failed"][:60],
                          "", "", "", "", "", ""])
            continue
        thr = ""
        if "fastnn_TFLOPs" in r:
            tf = r["fastnn_TFLOPs"]
            thr = f"{tf:.0f} TFLOP/s" if tf >= 10 else f"{tf * 1e3:.0f} GFLOP/s"
        elif "fastnn_GBps" in r:
            thr = f"{r['fastnn_GBps']:.0f} GB/s"
        err = r["max_rel_error"]
        met = {True: " (met)", False: " (missed)"}.get(r.get("goal_met"), "")
        lines.append([r["case"], r["dtype"], r["shape"], r["baseline"], _fmt_ms(r["baseline_ms"]),
                      _fmt_ms(r["fastnn_ms"]), f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                      (r["goal"] or "") + met, "-" if err is None else f"{err:.1e}", thr])
    return head, lines


def _footnotes(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        for k, v in (r.get("others_ms") or {}).items():
            out.append(f"{r['case']}: {k} {_fmt_ms(v)}")
        if r.get("note"):
            out.append(f"{r['case']}: {r['note']}")
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head, lines = _cells(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out += ["  " + n for n in _footnotes(rows)]
    return "\n".join(out)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The same table in Markdown (for the README)."""
    head, lines = _cells(rows)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
    notes = _footnotes(rows)
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out)


def write_chart(rows: list[dict[str, Any]], title: str, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastnn-bench: matplotlib is not installed; no chart written", file=sys.stderr)
        return False
    ok = [r for r in rows if r.get("speedup")]
    if not ok:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ok) + 1.5))
    names = [r["case"] for r in ok]
    speed = [r["speedup"] for r in ok]
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speed]
    ax.barh(range(len(ok)), speed, color=colors)
    for i, r in enumerate(ok):
        if r.get("goal_speedup"):
            ax.plot([r["goal_speedup"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        ax.text(speed[i], i, f" {speed[i]:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(ok)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the torch baseline of the same run (black tick: goal)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
            print(f"      torch {_fmt_ms(row['baseline_ms'])}  fastnn {_fmt_ms(row['fastnn_ms'])}  "
                  f"speedup {row['speedup']:.2f}x  err {row['max_rel_error']}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the JSON and PNG")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print the table of a saved result file in Markdown and exit (runs nothing)")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            saved = json.load(f)
        print(format_markdown(saved["rows"]))
        return 0

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device(dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and dev != "cpu":
        p.error("--clock process times CPU work; GPU timings use CUDA events")
    cases = cases_for(dev, args.filter, quick=args.quick)
    if args.list:
        for c in cases:
            print(f"{c.id:50s} {c.shape:40s} {c.goal}")
        return 0
    if not cases:
        print(f"fastnn-bench: no cases match on {dev}", file=sys.stderr)
        return 1

    desc = device_description(device)
    ext = _extension.info()
    print(f"fastnn-bench on {desc['name']} ({dev}), torch {torch.__version__}, "
          f"compiled kernels: {'yes' if ext['extension'] else 'no (' + str(ext['extension_error']) + ')'}"
          f"{', CUDA kernels' if ext['cuda_kernels'] else ''}; {len(cases)} cases", file=sys.stderr, flush=True)
    rows = run_cases(cases, device, rounds=args.rounds, budget_s=args.budget, clock=args.clock)
    title = f"fastnn on {desc['name']}" + (f", {desc['threads']} threads" if dev == "cpu" else "") + (
        ", CPU time" if args.clock == "process" else "")
    print()
    print(title)
    print(format_table(rows))

    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        date = _dt.date.today().isoformat()
        stem = os.path.join(args.out, f"{date}-{_slug(desc)}" + ("-quick" if args.quick else "")
                            + ("-cputime" if args.clock == "process" else "")
                            + ("-" + re.sub(r"\W+", "_", args.filter) if args.filter else ""))
        meta = {"date": date, **desc, "clock": args.clock, "torch": torch.__version__, "fastnn_commit": _git_commit(),
                "extension": ext, "command": "fastnn-bench " + " ".join(argv if argv is not None else sys.argv[1:])}
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        chart = write_chart(rows, title, stem + ".png")
        print(f"\nwrote {stem}.json" + (f" and {stem}.png" if chart else ""))
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

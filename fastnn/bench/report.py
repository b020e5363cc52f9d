"""How ``fastnn-bench`` shows results: the text table, the Markdown table and the PNG chart.

Every column holds one unit, named in its header (times in ms, throughput in GB/s or TFLOP/s),
so that the numbers of a column compare at a glance.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["fmt_num", "fmt_err", "format_table", "format_markdown", "chart_bars", "write_chart", "GOAL_COLOURS"]

# Bar colour by the case's goal: met, missed, or no goal (none set, or not applicable in this run).
GOAL_COLOURS = {True: "tab:green", False: "tab:red", None: "tab:gray"}
_GOAL_LABELS = {True: "goal met", False: "goal missed", None: "no goal"}


def fmt_num(v: float | None) -> str:
    """Three significant digits, never in exponent form for the magnitudes a benchmark shows."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1e-3:
        return f"{v:#.3g}" if v < 1 else f"{v:.{2 - int(v >= 10)}f}"
    return f"{v:.2e}"


def fmt_err(v: float | None) -> str:
    """A relative error: one decimal of mantissa (5.7e-06), or "-" when the case has none."""
    return "-" if v is None else f"{v:.1e}"


def _goal_cell(r: dict[str, Any]) -> str:
    if not r.get("goal"):
        return ""
    met = r.get("goal_met")
    if met is None:  # a goal in words only, or one whose baseline this run did not have
        return r["goal"] + (" (n/a here)" if r.get("goal_speedup") is not None else "")
    return r["goal"] + (" (met)" if met else " (missed)")


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], set[int]]:
    """The table's header, one row of cells per result, and the indices of right-aligned columns."""
    gbps = any("fastnn_GBps" in r for r in rows)
    tflops = any("fastnn_TFLOPs" in r for r in rows)
    head = ["case", "dtype", "shape", "torch baseline", "torch ms", "fastnn ms", "speedup", "goal", "max rel err"]
    head += ["GB/s"] * gbps + ["TFLOP/s"] * tflops
    lines = []
    for r in rows:
        if "failed" in r:
            line = [r["case"], r.get("dtype", ""), r.get("shape", ""), "FAILED: " + r["failed"][:60]]
            lines.append(line + [""] * (len(head) - len(line)))
            continue
        line = [r["case"], r["dtype"], r["shape"], r["baseline"], fmt_num(r["baseline_ms"]), fmt_num(r["fastnn_ms"]),
                f"{r['speedup']:.2f}x" if r["speedup"] else "-", _goal_cell(r), fmt_err(r["max_rel_error"])]
        line += [fmt_num(r.get("fastnn_GBps"))] * gbps + [fmt_num(r.get("fastnn_TFLOPs"))] * tflops
        lines.append(line)
    right = {4, 5, 6, 8} | set(range(9, len(head)))
    return head, lines, right


def _footnotes(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        also = {a["against"]: a for a in r.get("also") or ()}
        for k, v in (r.get("others_ms") or {}).items():
            line = f"{r['case']}: {k} {fmt_num(v)} ms"
            if k in also:
                a = also[k]
                line += (f"; fastnn's speedup over it {a['speedup']:.2f}x, goal {a['goal']} "
                         f"({'met' if a['met'] else 'missed'}): {a['basis']}")
            out.append(line)
        if r.get("note"):
            out.append(f"{r['case']}: {r['note']}")
        if r.get("goal_basis"):
            out.append(f"{r['case']}: goal {r['goal']}: {r['goal_basis']}")
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head, lines, right = _cells(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out += ["  " + n for n in _footnotes(rows)]
    return "\n".join(out)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The same table in Markdown (for the README)."""
    head, lines, right = _cells(rows)
    out = ["| " + " | ".join(head) + " |", "|" + "".join("--:|" if i in right else "---|" for i in range(len(head)))]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
    notes = _footnotes(rows)
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out)


def chart_bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the chart draws for each measured row: the speedup, its spread (from the quartiles of
    both timings: the slowest baseline quartile over the fastest fastnn one and vice versa), the
    goal's tick and the bar's colour, which says whether the goal was met."""
    bars = []
    for r in rows:
        if not r.get("speedup"):
            continue
        lo, hi = r.get("speedup_range") or (r["speedup"], r["speedup"])
        met = r.get("goal_met")
        bars.append({"case": r["case"], "speedup": r["speedup"], "low": min(lo, r["speedup"]),
                     "high": max(hi, r["speedup"]), "goal": r.get("goal_speedup") if met is not None else None,
                     "colour": GOAL_COLOURS[met], "label": _GOAL_LABELS[met]})
    return bars


def _plain_number(v: float, _pos: Any = None) -> str:
    return f"{v:g}x"


def write_chart(rows: list[dict[str, Any]], title: str, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        print("fastnn-bench: matplotlib is not installed; no chart written", file=sys.stderr)
        return False
    bars = chart_bars(rows)
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.8))
    ys = range(len(bars))
    speed = [b["speedup"] for b in bars]
    err = [[s - b["low"] for s, b in zip(speed, bars)], [b["high"] - s for s, b in zip(speed, bars)]]
    ax.barh(ys, speed, color=[b["colour"] for b in bars], xerr=err, ecolor="black", capsize=2,
            error_kw={"lw": 0.8})
    for i, b in enumerate(bars):
        if b["goal"]:
            ax.plot([b["goal"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        ax.text(b["high"], i, f"  {b['speedup']:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_yticks(list(ys), [b["case"] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(b["high"] for b in bars) * 1.8)  # room for the value labels
    # Plain numbers on the log axis (0.5x 1x 2x 5x ...), not powers of ten.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("speedup over the torch baseline of the same run (error bar: quartiles; black tick: goal)")
    labels = dict.fromkeys(b["label"] for b in bars)
    colour = {b["label"]: b["colour"] for b in bars}
    ax.legend(handles=[Patch(color=colour[k], label=k) for k in labels], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

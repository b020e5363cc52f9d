"""Benchmark cases, defined once and used by both ``fastnn-bench`` and the pytest-benchmark suites
in ``bench/``.

A family registers its cases in ``fastnn/bench/cases_<family>.py`` with :func:`case`; this module
imports every such file. A case builds a :class:`Run` on a device: the torch baseline, the fastnn
implementation, how to compute fastnn's error against the reference, and the work done (bytes,
FLOPs) for bandwidth and throughput columns.

A case's :class:`Goal` is a speedup over the case's torch baseline **measured in the same run**:
absolute times drift from machine to machine and run to run, ratios much less. Each goal says
what it was derived from (``Goal.basis``): the baseline's time on the reference machine and the
absolute goal there. Reference machines: GPU cases, one H100 80GB (PyTorch 2.11, CUDA 13.0,
``triton.testing.do_bench`` medians); CPU cases, a 2-core AVX2 machine at 2 threads (PyTorch 2.13).
``fastnn-bench --list`` prints every goal with its basis; the results table shows whether each
was met.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["Case", "Goal", "Run", "case", "all_cases", "cases_for"]


@dataclass(frozen=True)
class Goal:
    """fastnn must be at least ``speedup`` times as fast as the case's baseline in the same run."""

    speedup: float
    basis: str  # where the ratio comes from, e.g. "H100: torch fused 1.34 ms; goal <= 1.20 ms"
    # What the ratio is against: "" is the case's baseline; otherwise the name of one of the Run's
    # `others` (a case's further goals, e.g. int8 against fastnn's own fp32 layer).
    against: str = ""

    def __str__(self) -> str:
        return f">= {self.speedup:.3g}x"


@dataclass
class Run:
    """A case prepared on a device. Every callable is timed as is (no arguments)."""

    baseline: Callable[[], Any]
    baseline_name: str
    fastnn: Callable[[], Any]
    # Max relative error of fastnn against the reference on the same inputs (untimed; may run
    # fastnn and the reference on copies). None when the case has no numeric output.
    error: Callable[[], float] | None = None
    # Other torch implementations shown beside the baseline, e.g. {"torch foreach": fn}.
    others: dict[str, Callable[[], Any]] = field(default_factory=dict)
    bytes: int | None = None  # fewest bytes the op must move: gives GB/s
    flops: int | None = None  # floating-point operations: gives TFLOP/s
    note: str = ""  # shown under the table, e.g. how the inputs rotate
    # False when this run's baseline is not the one the case's goal is a ratio against (e.g. a
    # fallback baseline on a torch without the preferred op): the goal is then neither met nor missed.
    goal_applies: bool = True


@dataclass
class Case:
    family: str
    name: str
    shape: str
    dtype: torch.dtype
    devices: tuple[str, ...]
    make: Callable[[torch.device], Run]
    goal: Goal | None = None
    # Smallest cases, run by the smoke test and --quick.
    quick: bool = False
    # Further goals, each against one of the Run's `others` (Goal.against names it).
    also: tuple[Goal, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    @property
    def goal_speedup(self) -> float | None:
        return self.goal.speedup if self.goal else None


_CASES: dict[str, Case] = {}
_LOADED = False


def case(family: str, name: str, *, shape: str, dtype: torch.dtype, devices: tuple[str, ...],
         goal: Goal | None = None, quick: bool = False, also: tuple[Goal, ...] = ()) -> Callable:
    """Decorator registering ``make(device) -> Run`` as a benchmark case."""
    if goal is not None and goal.against:
        raise ValueError(f"{family}/{name}: the main goal is against the baseline; put others in `also`")
    if any(not g.against for g in also):
        raise ValueError(f"{family}/{name}: every goal in `also` names the implementation it is against")

    def deco(make: Callable[[torch.device], Run]) -> Callable[[torch.device], Run]:
        c = Case(family, name, shape, dtype, tuple(devices), make, goal, quick, tuple(also))
        if c.id in _CASES:
            raise ValueError(f"benchmark case {c.id} defined twice")
        _CASES[c.id] = c
        return make

    return deco


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    import fastnn.bench as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        if mod.startswith("cases_"):
            importlib.import_module(f"fastnn.bench.{mod}")
    _LOADED = True


def best_device() -> torch.device:
    """The device the benchmarks run on by default: a GPU when one is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_cases() -> list[Case]:
    _load()
    return list(_CASES.values())


def cases_for(device: str, pattern: str | None = None, quick: bool = False) -> list[Case]:
    """Cases that run on ``device`` ("cpu" or "cuda"), optionally filtered by a substring or regex."""
    import re

    out = []
    for c in all_cases():
        if device not in c.devices:
            continue
        if quick and not c.quick:
            continue
        if pattern and not re.search(pattern, c.id):
            continue
        out.append(c)
    return out

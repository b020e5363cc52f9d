"""Benchmark cases, defined once and used by both ``fastnn-bench`` and the pytest-benchmark suites
in ``bench/``.

A family registers its cases in ``fastnn/bench/cases_<family>.py`` with :func:`case`; this module
imports every such file. A case builds a :class:`Run` on a device: the torch baseline, the fastnn
implementation, how to compute fastnn's error against the reference, and the work done (bytes,
FLOPs) for bandwidth and throughput columns.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["Case", "Run", "case", "all_cases", "cases_for"]


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


@dataclass
class Case:
    family: str
    name: str
    shape: str
    dtype: torch.dtype
    devices: tuple[str, ...]
    make: Callable[[torch.device], Run]
    goal: str = ""  # the TARGETS.md goal, in words
    goal_speedup: float | None = None  # the goal as a ratio over the baseline, when it is one
    # Smallest cases, run by the smoke test and --quick.
    quick: bool = False

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


_CASES: dict[str, Case] = {}
_LOADED = False


def case(family: str, name: str, *, shape: str, dtype: torch.dtype, devices: tuple[str, ...],
         goal: str = "", goal_speedup: float | None = None, quick: bool = False) -> Callable:
    """Decorator registering ``make(device) -> Run`` as a benchmark case."""

    def deco(make: Callable[[torch.device], Run]) -> Callable[[torch.device], Run]:
        c = Case(family, name, shape, dtype, tuple(devices), make, goal, goal_speedup, quick)
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

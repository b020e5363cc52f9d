"""How fastnn times things (DESIGN.md: Benchmarks).

* CUDA: ``triton.testing.do_bench`` median (CUDA events, L2 flushed before each call), after
  warm-up; CUDA events directly when Triton is missing.
* CPU: host clock around each call, median, after warm-up. ``clock="process"`` times CPU time
  instead of wall time: on a machine shared with other work, time slicing then does not swing
  the numbers (cache contention still does); use it with one thread.

The baseline and fastnn are timed in alternating rounds, so that drift of the machine (another
process, clock changes) hits both alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["time_ms", "time_pair"]


def _cuda_events_ms(fn: Callable[[], Any], reps: int) -> list[float]:
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        cache.zero_()  # flush L2 so that inputs are read from device memory
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 20,
            budget_s: float = 1.0, clock: str = "wall") -> list[float]:
    """Milliseconds per call of ``fn``: a list of samples (take the median)."""
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        try:
            import triton.testing

            # do_bench's warmup/rep are milliseconds of running time.
            return [float(triton.testing.do_bench(fn, warmup=25, rep=max(25, int(budget_s * 100)),
                                                  return_mode="median"))]
        except ImportError:
            return _cuda_events_ms(fn, reps)
    for _ in range(warmup):
        fn()
    now = CLOCKS[clock]
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < reps or (time.perf_counter() < deadline and len(samples) < 10 * reps):
        t0 = now()
        fn()
        samples.append((now() - t0) * 1e3)
        if len(samples) >= reps and time.perf_counter() >= deadline:
            break
    return samples


def time_pair(fns: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int = 3,
              reps: int = 10, budget_s: float = 0.5, clock: str = "wall") -> dict[str, float]:
    """Median ms of each function, timed in ``rounds`` alternating rounds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += time_ms(fn, device, reps=reps, budget_s=budget_s / rounds, clock=clock)
    return {k: statistics.median(v) for k, v in samples.items()}

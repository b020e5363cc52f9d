"""How fastnn times things.

* CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call) after warm-up,
  keeping every sample; CUDA events directly when Triton is missing.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange``. It runs with the thread count the user
  set (``num_threads``), chooses how many calls one sample times so that the clock's overhead is
  negligible even for microsecond ops, and warms up while doing so. ``clock="process"`` times CPU
  time instead of wall time: on a machine shared with other work, time slicing then does not
  swing the numbers (cache contention still does); use it with one thread.

The baseline, fastnn and the other candidates of a case are timed in alternating rounds of one
run (A B C, A B C, ...), never one after the other: drift of a shared machine (another process,
clock changes, thermal state) then hits every candidate alike, where timing A fully and then B
would charge the drift to whichever ran during it. ``Timer`` measures one candidate at a time, so
each round calls it once per candidate with that round's share of the budget. On the CPU each
candidate's round starts after a pause of ``SETTLE_S`` (at most the round's budget): runtimes keep their threads spinning for a
while after a call (onnxruntime's pool for tens of milliseconds, OpenMP's for less), and those
threads would take the cores of the candidate timed next (onnxruntime's made fastnn's next few
batch-1 LSTM calls up to twenty times slower).

Every function returns milliseconds per call. :func:`summarize` reduces samples to the median and
the spread (quartiles, min and max) that ``fastnn-bench`` stores and draws as error bars.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["time_ms", "time_pair", "summarize"]

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
SETTLE_S = 0.2  # CPU: the pause before each candidate's round (see the module docstring)


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


def _cuda_ms(fn: Callable[[], Any], *, warmup: int, reps: int, budget_s: float) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    try:
        import triton.testing
    except ImportError:
        return _cuda_events_ms(fn, reps)
    # do_bench's warmup/rep are milliseconds of running time; "all" returns every sample.
    out = triton.testing.do_bench(fn, warmup=25, rep=max(25, int(budget_s * 1000)), return_mode="all")
    return [float(v) for v in out] if isinstance(out, (list, tuple)) else [float(out)]


def _cpu_ms(fn: Callable[[], Any], *, budget_s: float, clock: str) -> list[float]:
    from .._extension import quiet_cpp_extension_import

    with quiet_cpp_extension_import():
        from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, timer=CLOCKS[clock], num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=budget_s)
    return [t * 1e3 for t in m.times]  # seconds per call, one value per block of calls


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 20,
            budget_s: float = 1.0, clock: str = "wall") -> list[float]:
    """Samples of milliseconds per call of ``fn`` (at least one).

    On the CPU each sample is the mean of one block of calls (``Timer`` sizes the block); ``reps``
    and ``warmup`` apply to CUDA only."""
    if device.type == "cuda":
        return _cuda_ms(fn, warmup=warmup, reps=reps, budget_s=budget_s)
    if clock not in CLOCKS:
        raise ValueError(f"fastnn-bench: clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    return _cpu_ms(fn, budget_s=budget_s, clock=clock)


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of samples in ms, and how many samples there were."""
    s = sorted(samples)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median": statistics.median(s), "q1": q1, "q3": q3, "min": s[0], "max": s[-1], "samples": len(s)}


def time_pair(fns: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int = 3,
              reps: int = 10, budget_s: float = 0.5, clock: str = "wall") -> dict[str, dict[str, float]]:
    """:func:`summarize` of each function's samples, timed in ``rounds`` alternating rounds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            if device.type == "cpu":  # (no longer than the round itself: quick runs stay quick)
                time.sleep(min(SETTLE_S, budget_s / max(1, rounds)))
            samples[name] += time_ms(fn, device, reps=reps, budget_s=budget_s / max(1, rounds), clock=clock)
    return {k: summarize(v) for k, v in samples.items()}

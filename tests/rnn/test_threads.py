"""The CPU's packed recurrence with more threads than cores: its tasks meet at a barrier after
every step, so it must never run more of them than the cores it has (torch.set_num_threads(8) on
a 2-core machine made a batch-1 LSTM ten times slower)."""

import os
import time

import pytest
import torch

from fastnn import backends, ops, testing

from .test_ops import make_args, ref_fn


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _lstm_args(T, B, H):
    args = make_args("lstm", T, B, H, H, dtype=torch.float32)
    args[3], args[4] = args[3] / H ** 0.5, args[4] / H ** 0.5  # torch's weight scale: no saturation
    return args


def _timed(args, threads, repeats):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.force("cpu"):
            ops.lstm_seq(*args)  # warm-up: the thread team of this size
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                out = ops.lstm_seq(*args)
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    return best, out


@pytest.mark.parametrize("B", [1, 5])
def test_more_threads_than_cores_is_correct(B):
    args = _lstm_args(40, B, 128)
    testing.backend_or_skip(ops.lstm_seq, "cpu", *args)
    _, got = _timed(args, 4 * _cores(), 1)
    for a, e in zip(got, ref_fn("lstm")(*args)):
        testing.assert_close(a, e, dtype=torch.float32)


def test_more_threads_than_cores_is_not_much_slower():
    """Batch 1, 200 steps, H = 256 (the packed path, split over threads). The best of several runs
    with 4x as many threads as cores against the best with one thread per core (at most 2),
    alternated so that a load from elsewhere falls on both. Without the cap the ratio is ~10; with
    it ~1. The bound (4x) leaves room for a noisy machine."""
    args = _lstm_args(200, 1, 256)
    testing.backend_or_skip(ops.lstm_seq, "cpu", *args)
    base_threads = min(2, _cores())
    base, over = float("inf"), float("inf")
    for _ in range(3):
        base = min(base, _timed(args, base_threads, 3)[0])
        over = min(over, _timed(args, 4 * _cores(), 3)[0])
    assert over < 4 * base, f"{4 * _cores()} threads: {over * 1e3:.1f} ms; {base_threads}: {base * 1e3:.1f} ms"

"""pytest-benchmark suite of the MoE cases (defined once in fastnn/bench/cases_moe.py).

    pytest bench/test_moe.py --benchmark-only            # the cases of the best device present

Each case is benchmarked twice, fastnn and its torch baseline, so that pytest-benchmark's table
shows both from the same run.
"""

import pytest
import torch

from fastnn.bench.cases import cases_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases_for(DEVICE, r"^moe/")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("which", ["fastnn", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moe(benchmark, case, which):
    run = case.make(torch.device(DEVICE))
    fn = run.fastnn if which == "fastnn" else run.baseline

    def timed():
        fn()
        _sync()

    benchmark.group = case.id
    benchmark.extra_info.update(shape=case.shape, dtype=str(case.dtype), baseline=run.baseline_name)
    benchmark(timed)

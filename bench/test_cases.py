"""Every benchmark case of fastnn/bench available on this device, as pytest-benchmark tests."""

import pytest
import torch

from fastnn.bench.cases import best_device, cases_for

DEVICE = best_device()

CASES = cases_for(DEVICE.type)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def prepared(request):
    return request.param, request.param.make(DEVICE)


def _synchronised(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", ["torch", "fastnn"])
def test_case(benchmark, prepared, impl):
    case, run = prepared
    fn = run.baseline if impl == "torch" else run.fastnn
    benchmark.group = f"{case.id} ({case.shape}, {str(case.dtype).replace('torch.', '')}, {DEVICE.type})"
    benchmark.extra_info.update(case=case.id, impl=run.baseline_name if impl == "torch" else "fastnn",
                                shape=case.shape, dtype=str(case.dtype), device=DEVICE.type,
                                goal=str(case.goal or ""))
    benchmark.pedantic(_synchronised(fn), warmup_rounds=3, rounds=20, iterations=1)
    if impl == "fastnn" and run.error is not None:
        err = run.error()
        benchmark.extra_info["max_rel_error"] = err
        assert err < 1e-2, f"{case.id}: fastnn's error against the reference is {err:.2e}"

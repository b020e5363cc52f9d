"""Shared test setup.

* Without a CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tensors),
  so they are tested on every machine. This must be set before triton is imported.
* ``backend`` parametrises a test over every backend; a backend that cannot run here skips with
  the reason (fastnn.testing.backend_or_skip).
* Tests marked ``gpu`` need a CUDA device and skip without one.
* Property-based fuzz tests (marked ``fuzz``) draw their inputs with hypothesis under a bounded
  budget: the ``ci`` profile by default (a few minutes for the whole suite), the ``long`` one with
  ``FASTNN_FUZZ_PROFILE=long`` (e.g. ``make test PYTEST_ARGS="-m fuzz" FASTNN_FUZZ_PROFILE=long``).
  Inputs are drawn from a fixed seed in ``ci`` (a failure reproduces on every machine), at random
  in ``long``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("reference", "cpu", "cuda", "triton")

try:
    from hypothesis import HealthCheck, settings

    _QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=_QUIET)
    settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=_QUIET)
    settings.load_profile(os.environ.get("FASTNN_FUZZ_PROFILE", "ci"))
except ImportError:  # the fuzz tests skip themselves (pytest.importorskip) without hypothesis
    pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none is visible on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device_for(backend):
    """The device a backend's tests run on: CUDA for cuda (and triton when a GPU is present)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            pytest.skip(f"{backend} backend: no CUDA device on this machine")
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

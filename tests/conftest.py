"""Shared test setup.

* Without a CUDA device, Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tensors),
  so they are tested on every machine. This must be set before triton is imported.
* ``backend`` parametrises a test over every backend; a backend that cannot run here skips with
  the reason (fastnn.testing.backend_or_skip).
* Tests marked ``gpu`` need a CUDA device and skip without one.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("reference", "cpu", "cuda", "triton")


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

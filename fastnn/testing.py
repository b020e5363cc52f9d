"""Test helpers shared by fastnn's test suite and benchmarks.

This module is the one place for tolerances. Two rules:

* float64 and float32 results are compared elementwise with :func:`assert_close`, at the
  tolerance of the result's dtype (:data:`TOLERANCES`).
* bf16/fp16 results are compared with :func:`assert_error_bounded`: their error against a float64
  reference must be at most ``LOW_PRECISION_FACTOR`` times the error of the same computation done
  by PyTorch in that precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from . import backends as _backends

__all__ = [
    "TOLERANCES", "LOW_PRECISION_FACTOR", "Tolerance", "tolerance", "assert_close", "max_rel_error",
    "assert_error_bounded", "opcheck", "backend_or_skip", "run_isolated",
]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# Per dtype: how far a fused kernel may sit from the reference evaluated in the same dtype.
# float32 allows for a different summation order (fused GEMM epilogues, tree reductions) over
# the sizes the tests use; float64 is for gradcheck-style comparisons.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-9),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-2),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-3),
}

# bf16/fp16: allowed error against float64, as a multiple of PyTorch's own error in that dtype.
LOW_PRECISION_FACTOR = 2.0


def tolerance(dtype: torch.dtype) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"fastnn.testing: no tolerance defined for {dtype}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """Elementwise comparison at the tolerance of ``dtype`` (default: ``actual``'s dtype).

    Shapes and dtypes must match; NaN never equals anything but NaN in the same place.
    """
    tol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=True,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (normwise; robust to elements near zero).

    Both are compared in float64. NaN or inf where the other is finite gives inf.
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"max_rel_error: shapes differ, {tuple(a.shape)} vs {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    nonfinite = ~torch.isfinite(a) | ~torch.isfinite(e)
    if bool(nonfinite.any()):
        same = (a == e) | (a.isnan() & e.isnan())
        if not bool(same[nonfinite].all()):
            return float("inf")
        a, e = a[~nonfinite], e[~nonfinite]
        if a.numel() == 0:
            return 0.0
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_error_bounded(actual: torch.Tensor, reference64: torch.Tensor, torch_same_precision: torch.Tensor,
                         *, factor: float = LOW_PRECISION_FACTOR, floor: float = 0.0, msg: str = "") -> None:
    """Low-precision rule: err(actual) <= factor * err(torch in that precision) (+ floor).

    Errors are :func:`max_rel_error` against ``reference64`` (the computation in float64).
    ``floor`` admits results where PyTorch happens to be exact (its error is 0).
    """
    err = max_rel_error(actual, reference64)
    base = max_rel_error(torch_same_precision, reference64)
    bound = factor * base + floor
    assert err <= bound, (f"{msg}: error {err:.3e} against float64 exceeds {factor} x PyTorch's "
                          f"{base:.3e} in {torch_same_precision.dtype} (+ floor {floor:.1e})")


def opcheck(op: Any, args: tuple, kwargs: dict | None = None, **options: Any) -> dict:
    """``torch.library.opcheck`` on ``op``, raising on failure.

    Under the Triton interpreter (CPU tensors), the AOT-dispatch tests cannot run a Triton kernel
    (the interpreter needs real storage), so only the schema, autograd-registration and fake-tensor
    tests run there; on a GPU everything runs.
    """
    test_utils = options.pop("test_utils", None)
    if test_utils is None:
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_cpu = all(t.device.type == "cpu" for t in tensors)
        name = str(getattr(op, "_name", op))
        if "triton" in name and on_cpu:
            test_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if test_utils is not None:
        options["test_utils"] = test_utils
    result = torch.library.opcheck(op, args, kwargs, **options)
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, f"opcheck({op}) failed: {failed}"
    return result


def backend_or_skip(op: _backends.Op, backend: str, *args: Any, **kwargs: Any) -> None:
    """pytest.skip with the reason when ``backend`` cannot serve these inputs on this machine."""
    import pytest

    why = op.reason(backend, *args, **kwargs)
    if why is not None:
        pytest.skip(f"{op.name} on {backend}: {why}")


def run_isolated(code: str, *, timeout: float = 120.0, env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    """Run a Python snippet in a fresh interpreter and return its completed process.

    For probes that could crash the interpreter (a segfault, an abort, a heap error): a crash then
    fails the test that ran it, as a non-zero (negative: the signal) return code, instead of killing
    the whole test session. The snippet imports what it needs; TRITON_INTERPRET is inherited.
    """
    import subprocess
    import sys

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=full_env)

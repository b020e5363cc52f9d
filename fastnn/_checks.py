"""Argument checks shared by every op family: one wording for every error a user can get.

Each public op validates its arguments in Python before any backend runs (so the reference, CPU,
CUDA and Triton paths raise the same error for the same input). The messages have one form::

    fastnn: argument '<op>: <arg>': expected <what was expected>, got <what was received>

Which side owns which check:

* Python (here and in each family's ``fastnn/ops/<family>.py``) owns the user-facing checks:
  types, shapes, dtypes, devices and value ranges of every argument.
* The compiled C++/CUDA ops keep only the checks their memory safety depends on (``TORCH_CHECK``
  of shapes and index ranges before a kernel reads them), because ``torch.ops.fastnn.*`` can be
  called directly and AOTInductor packages run them without Python.

None of these checks reads tensor data, so they cost no host synchronisation.
"""

from __future__ import annotations

from typing import Iterable, NoReturn, Optional

import torch

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "describe", "dtype_names", "fail", "check_tensor", "check_like",
           "check_range"]

Tensor = torch.Tensor

# Dtypes every family accepts for floating-point data (math is done in float32 or wider).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64,)


def describe(t: object) -> str:
    """What the user passed, for the "got ..." part of an error."""
    if isinstance(t, Tensor):
        layout = "" if t.layout == torch.strided else f", layout {t.layout}"
        return f"tensor of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}{layout}"
    if t is None:
        return "None"
    if isinstance(t, (bool, int, float, str)):
        return repr(t)
    return f"an object of type {type(t).__name__}"


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """``(torch.float32, torch.float16)`` -> ``"float32 or float16"``."""
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def fail(arg: str, expected: str, got: object, *, op: Optional[str] = None,
         error: type[Exception] = ValueError) -> NoReturn:
    """Raise the one error form. ``got`` is described (a tensor by shape, dtype and device); pass a
    string to say it in your own words."""
    where = f"{op}: {arg}" if op else arg
    got_text = got if isinstance(got, str) else describe(got)
    raise error(f"fastnn: argument '{where}': expected {expected}, got {got_text}")


def check_tensor(t: object, arg: str, *, dim: Optional[int] = None, dtypes: Optional[tuple] = None,
                 device: Optional[torch.device] = None, op: Optional[str] = None) -> None:
    """``t`` is a dense tensor of ``dim`` dimensions, one of ``dtypes``, on ``device``."""
    if not isinstance(t, Tensor):
        fail(arg, "a tensor", t, op=op, error=TypeError)
    if t.layout != torch.strided:
        fail(arg, "a dense (strided) tensor", t, op=op)
    if dim is not None and t.dim() != dim:
        fail(arg, f"a {dim}-d tensor", t, op=op)
    if dtypes is not None and t.dtype not in dtypes:
        fail(arg, f"a tensor of dtype {dtype_names(dtypes)}", t, op=op)
    if device is not None and t.device != torch.device(device):
        fail(arg, f"a tensor on {device}", t, op=op)


def check_like(t: object, arg: str, like: Tensor, like_name: str, *, shape: Optional[tuple] = None,
               op: Optional[str] = None) -> None:
    """``t`` has ``like``'s dtype and device (and ``shape``, default ``like``'s shape)."""
    check_tensor(t, arg, op=op)
    want = tuple(like.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != want:
        fail(arg, f"a tensor of shape {list(want)}", t, op=op)
    if t.dtype != like.dtype or t.device != like.device:
        fail(arg, f"the dtype and device of '{like_name}' ({like.dtype}, {like.device})", t, op=op)


def check_range(arg: str, value: object, lo: float, hi: Optional[float] = None, *, hi_inclusive: bool = False,
                op: Optional[str] = None) -> None:
    """``lo <= value < hi`` (or ``<= hi``); NaN is never in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(arg, "a number", value, op=op, error=TypeError)
    ok = value >= lo and (hi is None or (value <= hi if hi_inclusive else value < hi))
    if not ok:
        close = "]" if hi_inclusive else ")"
        want = f"a value in [{lo}, {hi}{close}" if hi is not None else f"a value >= {lo}"
        fail(arg, want, value, op=op)

"""Optimizer ops: one Adam/AdamW or SGD step over lists of tensors, and the global gradient norm.

Public functional API (each a :class:`fastnn.backends.Op`; the backend is chosen per call):

* ``adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
  weight_decay, amsgrad, maximize, decoupled, lr_tensor=None, grad_scale=None, found_inf=None,
  clip_coef=None)``: updates every tensor in place and increments ``steps`` (float32 scalars).
* ``sgd_step_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
  maximize, is_first_step, lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None)``.
* ``grad_norm_clip_coef(grads, max_norm, norm_type=2.0, grad_scale=None) -> (norm, clip_coef)``.

Semantics shared by all backends: a nonzero ``found_inf`` skips the step entirely; ``grad_scale``
divides the gradients, which are written back unscaled (as torch's fused optimizers do);
``clip_coef`` multiplies the gradients for the update only. Backends: ``cpu`` and ``cuda`` run the
compiled ``fastnn::adam_step_``/``sgd_step_``/``grad_norm_clip_coef``; ``triton`` runs
``fastnn::triton_adam_step_``/``triton_sgd_step_``; ``reference`` is fastnn.reference.optim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _extension
from ..backends import Op
from ..reference import optim as ref

__all__ = ["adam_step_", "sgd_step_", "grad_norm_clip_coef", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument checks for the Python backends (the compiled ops check the same in C++).

def _describe(t: Tensor) -> str:
    return f"tensor of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_list_lengths(n: int, **lists: list) -> None:
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"fastnn: argument '{name}': expected {n} tensors (one per parameter), got {len(lst)}")


def _check_like(t: Tensor, p: Tensor, name: str, i: int) -> None:
    if t.is_sparse:
        raise ValueError(f"fastnn: argument '{name}[{i}]': expected a dense tensor (sparse gradients are not "
                         "supported; use torch.optim.SparseAdam), got a sparse tensor")
    if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
        raise ValueError(f"fastnn: argument '{name}[{i}]': expected the shape, dtype and device of params[{i}] "
                         f"({_describe(p)}), got {_describe(t)}")


def _check_params(params: list[Tensor]) -> None:
    for i, p in enumerate(params):
        if p.is_complex():
            raise ValueError(f"fastnn: argument 'params[{i}]': expected a real floating-point tensor (complex "
                             f"parameters are not supported; view them with torch.view_as_real), got {_describe(p)}")
        if p.dtype not in FLOAT_DTYPES or p.is_sparse:
            raise ValueError(f"fastnn: argument 'params[{i}]': expected a dense float32, float64, bfloat16 or "
                             f"float16 tensor, got {_describe(p)}")
        if p.device != params[0].device:
            raise ValueError(f"fastnn: argument 'params[{i}]': expected every parameter on one device "
                             f"({params[0].device}), got {_describe(p)}")


def _check_scalars(device: torch.device, **scalars: Optional[Tensor]) -> None:
    for name, t in scalars.items():
        if t is None:
            continue
        if t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"fastnn: argument '{name}': expected a float32 tensor with one element, got {_describe(t)}")
        if t.device.type != "cpu" and t.device != device:
            raise ValueError(f"fastnn: argument '{name}': expected a tensor on the CPU or on {device}, "
                             f"got {_describe(t)}")


def _check_range(name: str, value: float, lo: float, hi: float | None = None) -> None:
    ok = value >= lo and (hi is None or value < hi)
    if not ok:
        want = f"a value in [{lo}, {hi})" if hi is not None else f"a value >= {lo}"
        raise ValueError(f"fastnn: argument '{name}': expected {want}, got {value}")


def validate_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                  weight_decay, amsgrad, lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None,
                  **_: object) -> None:
    n = len(params)
    _check_list_lengths(n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    if amsgrad:
        _check_list_lengths(n, max_exp_avg_sqs=max_exp_avg_sqs)
    elif max_exp_avg_sqs:
        raise ValueError("fastnn: argument 'max_exp_avg_sqs': expected an empty list unless amsgrad, "
                         f"got {len(max_exp_avg_sqs)} tensors")
    _check_range("lr", lr, 0.0)
    _check_range("beta1", beta1, 0.0, 1.0)
    _check_range("beta2", beta2, 0.0, 1.0)
    _check_range("eps", eps, 0.0)
    _check_range("weight_decay", weight_decay, 0.0)
    _check_params(params)
    for i, p in enumerate(params):
        _check_like(grads[i], p, "grads", i)
        _check_like(exp_avgs[i], p, "exp_avgs", i)
        _check_like(exp_avg_sqs[i], p, "exp_avg_sqs", i)
        if amsgrad:
            _check_like(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i)
        s = steps[i]
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
            raise ValueError(f"fastnn: argument 'steps[{i}]': expected a float32 tensor with one element on "
                             f"{p.device}, got {_describe(s)}")
    if params:
        _check_scalars(params[0].device, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)


def validate_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                 lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None, **_: object) -> None:
    n = len(params)
    _check_list_lengths(n, grads=grads)
    if momentum != 0:
        _check_list_lengths(n, momentum_buffers=momentum_buffers)
    elif momentum_buffers:
        raise ValueError("fastnn: argument 'momentum_buffers': expected an empty list when momentum == 0, "
                         f"got {len(momentum_buffers)} tensors")
    _check_range("lr", lr, 0.0)
    _check_range("momentum", momentum, 0.0)
    _check_range("weight_decay", weight_decay, 0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("fastnn: argument 'nesterov': expected momentum > 0 and dampening == 0 with Nesterov "
                         f"momentum, got momentum {momentum}, dampening {dampening}")
    _check_params(params)
    for i, p in enumerate(params):
        _check_like(grads[i], p, "grads", i)
        if momentum != 0:
            _check_like(momentum_buffers[i], p, "momentum_buffers", i)
    if params:
        _check_scalars(params[0].device, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)


def validate_grad_norm(grads, max_norm, norm_type=2.0, grad_scale=None) -> None:
    _check_range("max_norm", max_norm, 0.0)
    if not (norm_type == 2.0 or math.isinf(norm_type)):
        raise ValueError(f"fastnn: argument 'norm_type': expected 2.0 or inf (other norms: "
                         f"torch.nn.utils.clip_grad_norm_), got {norm_type}")
    for i, g in enumerate(grads):
        if g.dtype not in FLOAT_DTYPES or g.is_sparse:
            raise ValueError(f"fastnn: argument 'grads[{i}]': expected a dense float32, float64, bfloat16 or "
                             f"float16 tensor, got {_describe(g)}")
        if g.device != grads[0].device:
            raise ValueError(f"fastnn: argument 'grads[{i}]': expected every gradient on one device "
                             f"({grads[0].device}), got {_describe(g)}")


# ---------------------------------------------------------------------------------------------
# Triton ops: opaque custom ops around the launchers in fastnn.kernels.optim.

def _dense_rows(rows: list[list[Optional[Tensor]]]) -> tuple[list[list[Optional[Tensor]]], list[tuple[Tensor, Tensor]]]:
    """Rows (one per parameter) whose tensors are all contiguous; other tensors are replaced by
    contiguous copies, returned as (original, copy) pairs to write back after the kernel."""
    out, writeback = [], []
    for row in rows:
        ok = all(t is None or t.is_contiguous() for t in row)
        if ok:
            out.append(row)
            continue
        new_row = []
        for t in row:
            if t is None:
                new_row.append(t)
            else:
                c = t.contiguous()
                if c is not t:
                    writeback.append((t, c))
                new_row.append(c)
        out.append(new_row)
    return out, writeback


@torch.library.custom_op("fastnn::triton_adam_step_",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def triton_adam_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool,
                      lr_tensor: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                      found_inf: Optional[Tensor] = None, clip_coef: Optional[Tensor] = None) -> None:
    from ..kernels import optim as kernels

    rows = [[params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None]
            for i in range(len(params))]
    rows, writeback = _dense_rows(rows)
    kernels.adam_step_([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                       [r[4] for r in rows] if amsgrad else [], steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled,
                       lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
    for orig, copy in writeback:
        orig.copy_(copy)


@torch.library.custom_op("fastnn::triton_sgd_step_", mutates_args=("params", "grads", "momentum_buffers"))
def triton_sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr: float,
                     momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
                     is_first_step: bool, lr_tensor: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
                     found_inf: Optional[Tensor] = None, clip_coef: Optional[Tensor] = None) -> None:
    from ..kernels import optim as kernels

    rows = [[params[i], grads[i], momentum_buffers[i] if momentum != 0 else None] for i in range(len(params))]
    rows, writeback = _dense_rows(rows)
    kernels.sgd_step_([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows] if momentum != 0 else [],
                      lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                      maximize=maximize, is_first_step=is_first_step, lr_tensor=lr_tensor, grad_scale=grad_scale,
                      found_inf=found_inf, clip_coef=clip_coef)
    for orig, copy in writeback:
        orig.copy_(copy)


# Fake (meta) kernels: the step ops return nothing; the norm op two float32 scalars.
@triton_adam_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


@triton_sgd_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


@_extension.on_load
def _register_native_fakes(_module) -> None:
    @torch.library.register_fake("fastnn::adam_step_")
    def _(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("fastnn::sgd_step_")
    def _(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("fastnn::grad_norm_clip_coef")
    def _(grads, max_norm, norm_type=2.0, grad_scale=None):
        device = grads[0].device if grads else torch.device("cpu")
        return torch.empty((), device=device), torch.empty((), device=device)


# ---------------------------------------------------------------------------------------------
# The public ops.

def _params_device(params, *args, **kwargs) -> torch.device:
    return params[0].device if len(params) else torch.device("cpu")


def _dtypes_in(allowed: tuple[torch.dtype, ...], what: str):
    def supports(params, grads=(), *args, **kwargs) -> str | None:
        for i, p in enumerate(params):
            if p.dtype not in allowed:
                return (f"argument 'params[{i}]' is {p.dtype}; {what} covers "
                        f"{', '.join(str(d) for d in allowed)}")
        for i, g in enumerate(grads):
            if g.layout != torch.strided:
                return f"argument 'grads[{i}]' is a {g.layout} tensor; sparse gradients are not supported"
        return None
    return supports


adam_step_ = Op("adam_step", device=_params_device)
sgd_step_ = Op("sgd_step", device=_params_device)
grad_norm_clip_coef = Op("grad_norm_clip_coef", device=lambda grads, *a, **k: grads[0].device if len(grads)
                         else torch.device("cpu"))


@adam_step_.register("reference")
def _adam_reference(*args, **kwargs):
    validate_adam(*args, **kwargs)
    return ref.adam_step_(*args, **kwargs)


@adam_step_.register("cpu", native="adam_step_", supports=_dtypes_in(FLOAT_DTYPES, "the compiled kernel"))
@adam_step_.register("cuda", native="adam_step_", supports=_dtypes_in(FLOAT_DTYPES, "the compiled kernel"))
def _adam_native(*args, **kwargs):
    return torch.ops.fastnn.adam_step_(*args, **kwargs)


@adam_step_.register("triton", supports=_dtypes_in(TRITON_DTYPES, "the Triton kernel"))
def _adam_triton(*args, **kwargs):
    validate_adam(*args, **kwargs)
    return torch.ops.fastnn.triton_adam_step_(*args, **kwargs)


@sgd_step_.register("reference")
def _sgd_reference(*args, **kwargs):
    validate_sgd(*args, **kwargs)
    return ref.sgd_step_(*args, **kwargs)


@sgd_step_.register("cpu", native="sgd_step_", supports=_dtypes_in(FLOAT_DTYPES, "the compiled kernel"))
@sgd_step_.register("cuda", native="sgd_step_", supports=_dtypes_in(FLOAT_DTYPES, "the compiled kernel"))
def _sgd_native(*args, **kwargs):
    return torch.ops.fastnn.sgd_step_(*args, **kwargs)


@sgd_step_.register("triton", supports=_dtypes_in(TRITON_DTYPES, "the Triton kernel"))
def _sgd_triton(*args, **kwargs):
    validate_sgd(*args, **kwargs)
    return torch.ops.fastnn.triton_sgd_step_(*args, **kwargs)


@grad_norm_clip_coef.register("reference")
def _norm_reference(grads, max_norm, norm_type=2.0, grad_scale=None):
    validate_grad_norm(grads, max_norm, norm_type, grad_scale)
    return ref.grad_norm_clip_coef(grads, max_norm, norm_type, grad_scale)


@grad_norm_clip_coef.register("cpu", native="grad_norm_clip_coef")
@grad_norm_clip_coef.register("cuda", native="grad_norm_clip_coef")
def _norm_native(grads, max_norm, norm_type=2.0, grad_scale=None):
    return torch.ops.fastnn.grad_norm_clip_coef(grads, max_norm, norm_type, grad_scale)

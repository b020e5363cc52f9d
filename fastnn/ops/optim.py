"""Optimizer ops: one Adam/AdamW or SGD step over lists of tensors, and the global gradient norm.

Public functional API (each a :class:`fastnn.backends.Op` whose signature and docstring are those
of its reference in :mod:`fastnn.reference.optim`; the backend is chosen per call):

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
``fastnn::triton_adam_step_``/``triton_sgd_step_``/``triton_grad_norm_clip_coef`` (kernels and
launchers in ``fastnn.kernels.optim``); ``reference`` is :mod:`fastnn.reference.optim`.

Every argument is checked here, once per call, before any backend runs (the compiled ops check
the same again in C++, since ``torch.ops.fastnn.*`` can be called directly).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _extension
from .._checks import FLOAT_DTYPES, check_tensor, describe, fail
from ..backends import Args, Op
from ..reference import optim as ref

__all__ = ["adam_step_", "sgd_step_", "grad_norm_clip_coef", "validate_adam", "validate_sgd",
           "validate_grad_norm"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument checks (every backend).

def _check_lengths(op: str, n: int, **lists: list) -> None:
    for name, lst in lists.items():
        if not isinstance(lst, (list, tuple)):
            fail(name, "a list of tensors", lst, op=op, error=TypeError)
        if len(lst) != n:
            fail(name, f"{n} tensors (one per parameter)", f"{len(lst)}", op=op)


def _overlaps(t: Tensor) -> bool:
    return torch._debug_has_internal_overlap(t) == 1  # 1: some elements share memory


def _check_like(op: str, t: object, p: Tensor, name: str, i: int, *, written: bool) -> None:
    arg = f"{name}[{i}]"
    check_tensor(t, arg, op=op)
    if t.layout != torch.strided:
        fail(arg, "a dense tensor (sparse gradients are not supported; use torch.optim.SparseAdam)", t, op=op)
    if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
        fail(arg, f"the shape, dtype and device of params[{i}] ({describe(p)})", t, op=op)
    if written and _overlaps(t):
        fail(arg, "a tensor whose elements do not share memory (the step writes it; an expanded tensor "
             "cannot be written)", f"{describe(t)} with strides {list(t.stride())}", op=op)


def _check_params(op: str, params: list) -> None:
    for i, p in enumerate(params):
        check_tensor(p, f"params[{i}]", op=op)
        if p.is_complex():
            fail(f"params[{i}]", "a real floating-point tensor (complex parameters are not supported; view "
                 "them with torch.view_as_real)", p, op=op)
        if p.dtype not in FLOAT_DTYPES:
            fail(f"params[{i}]", "a dense float32, float64, bfloat16 or float16 tensor", p, op=op)
        if p.device != params[0].device:
            fail(f"params[{i}]", f"every parameter on one device ({params[0].device})", p, op=op)
        if _overlaps(p):
            fail(f"params[{i}]", "a tensor whose elements do not share memory (the step writes it)",
                 f"{describe(p)} with strides {list(p.stride())}", op=op)


def _check_scalars(op: str, device: torch.device, a: Args) -> None:
    """grad_scale/found_inf/clip_coef: float32 with one element; lr_tensor: floating with one
    element. Each on the CPU (read on the host) or on the parameters' device."""
    for name in ("lr_tensor", "grad_scale", "found_inf", "clip_coef"):
        t = a[name]
        if t is None:
            continue
        check_tensor(t, name, op=op)
        ok_dtype = t.is_floating_point() if name == "lr_tensor" else t.dtype == torch.float32
        if t.numel() != 1 or not ok_dtype:
            what = "a floating-point tensor" if name == "lr_tensor" else "a float32 tensor"
            fail(name, f"{what} with one element", t, op=op)
        if t.device.type != "cpu" and t.device != device:
            fail(name, f"a tensor on the CPU or on {device}", t, op=op)


def _check_number(op: str, name: str, value: object, ok: bool, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, "a number", value, op=op, error=TypeError)
    if not ok:
        fail(name, expected, value, op=op)


def validate_adam(a: Args) -> None:
    """The checks of adam_step_. lr and weight_decay take any value, as torch.optim's step does."""
    op = "adam_step"
    n = len(a.params)
    _check_lengths(op, n, grads=a.grads, exp_avgs=a.exp_avgs, exp_avg_sqs=a.exp_avg_sqs, steps=a.steps)
    if a.amsgrad:
        _check_lengths(op, n, max_exp_avg_sqs=a.max_exp_avg_sqs)
    elif len(a.max_exp_avg_sqs):
        fail("max_exp_avg_sqs", "an empty list unless amsgrad", f"{len(a.max_exp_avg_sqs)} tensors", op=op)
    _check_number(op, "lr", a.lr, True, "")
    _check_number(op, "weight_decay", a.weight_decay, True, "")
    _check_number(op, "beta1", a.beta1, 0.0 <= a.beta1 < 1.0, "a value in [0, 1)")
    _check_number(op, "beta2", a.beta2, 0.0 <= a.beta2 < 1.0, "a value in [0, 1)")
    _check_number(op, "eps", a.eps, a.eps >= 0.0, "a value >= 0")
    _check_params(op, a.params)
    unscale = a.grad_scale is not None
    for i, p in enumerate(a.params):
        _check_like(op, a.grads[i], p, "grads", i, written=unscale)
        _check_like(op, a.exp_avgs[i], p, "exp_avgs", i, written=True)
        _check_like(op, a.exp_avg_sqs[i], p, "exp_avg_sqs", i, written=True)
        if a.amsgrad:
            _check_like(op, a.max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i, written=True)
        s = a.steps[i]
        check_tensor(s, f"steps[{i}]", op=op)
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
            fail(f"steps[{i}]", f"a float32 tensor with one element on {p.device}", s, op=op)
    if n:
        _check_scalars(op, a.params[0].device, a)


def validate_sgd(a: Args) -> None:
    """The checks of sgd_step_. lr and weight_decay take any value, as torch.optim's step does."""
    op = "sgd_step"
    n = len(a.params)
    _check_lengths(op, n, grads=a.grads)
    _check_number(op, "lr", a.lr, True, "")
    _check_number(op, "weight_decay", a.weight_decay, True, "")
    _check_number(op, "momentum", a.momentum, a.momentum >= 0.0, "a value >= 0")
    if a.momentum != 0:
        _check_lengths(op, n, momentum_buffers=a.momentum_buffers)
    elif len(a.momentum_buffers):
        fail("momentum_buffers", "an empty list when momentum == 0", f"{len(a.momentum_buffers)} tensors", op=op)
    if a.nesterov and (a.momentum <= 0 or a.dampening != 0):
        fail("nesterov", "momentum > 0 and dampening == 0 with Nesterov momentum",
             f"momentum {a.momentum}, dampening {a.dampening}", op=op)
    _check_params(op, a.params)
    unscale = a.grad_scale is not None
    for i, p in enumerate(a.params):
        _check_like(op, a.grads[i], p, "grads", i, written=unscale)
        if a.momentum != 0:
            _check_like(op, a.momentum_buffers[i], p, "momentum_buffers", i, written=True)
    if n:
        _check_scalars(op, a.params[0].device, a)


def validate_grad_norm(a: Args) -> None:
    op = "grad_norm_clip_coef"
    _check_number(op, "max_norm", a.max_norm, a.max_norm >= 0.0, "a value >= 0")
    if not (a.norm_type == 2.0 or math.isinf(a.norm_type)):
        fail("norm_type", "2.0 or inf (other norms: torch.nn.utils.clip_grad_norm_)", a.norm_type, op=op)
    if not isinstance(a.grads, (list, tuple)):
        fail("grads", "a list of tensors", a.grads, op=op, error=TypeError)
    for i, g in enumerate(a.grads):
        check_tensor(g, f"grads[{i}]", op=op)
        if g.dtype not in FLOAT_DTYPES:
            fail(f"grads[{i}]", "a dense float32, float64, bfloat16 or float16 tensor", g, op=op)
        if g.device != a.grads[0].device:
            fail(f"grads[{i}]", f"every gradient on one device ({a.grads[0].device})", g, op=op)
    if a.grad_scale is not None and len(a.grads):
        t = a.grad_scale
        check_tensor(t, "grad_scale", op=op)
        if t.numel() != 1 or t.dtype != torch.float32 or (t.device.type != "cpu" and t.device != a.grads[0].device):
            fail("grad_scale", f"a float32 tensor with one element on the CPU or on {a.grads[0].device}", t, op=op)


# ---------------------------------------------------------------------------------------------
# Triton ops: opaque custom ops around the launchers in fastnn.kernels.optim (they take raw
# addresses, which the compiler cannot trace through, and an optimizer step has nothing to fuse
# with).

def _dense_rows(rows: list[list[Optional[Tensor]]], written: tuple[bool, ...]):
    """Rows (one per parameter) whose tensors are all contiguous; other tensors are replaced by
    contiguous copies. Returns the rows and the (original, copy) pairs of the tensors the step
    writes (``written[k]`` for column k), to copy back after the kernel."""
    out, writeback = [], []
    for row in rows:
        if all(t is None or t.is_contiguous() for t in row):
            out.append(row)
            continue
        new_row = []
        for k, t in enumerate(row):
            c = None if t is None else t.contiguous()
            if c is not None and c is not t and written[k]:
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
    rows, writeback = _dense_rows(rows, (True, grad_scale is not None, True, True, True))
    cols = list(zip(*rows)) if rows else [()] * 5
    kernels.adam_step_(list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]),
                       list(cols[4]) if amsgrad else [], steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
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
    rows, writeback = _dense_rows(rows, (True, grad_scale is not None, True))
    cols = list(zip(*rows)) if rows else [()] * 3
    kernels.sgd_step_(list(cols[0]), list(cols[1]), list(cols[2]) if momentum != 0 else [],
                      lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                      maximize=maximize, is_first_step=is_first_step, lr_tensor=lr_tensor, grad_scale=grad_scale,
                      found_inf=found_inf, clip_coef=clip_coef)
    for orig, copy in writeback:
        orig.copy_(copy)


@torch.library.custom_op("fastnn::triton_grad_norm_clip_coef", mutates_args=())
def triton_grad_norm_clip_coef(grads: list[Tensor], max_norm: float, norm_type: float = 2.0,
                               grad_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    from ..kernels import optim as kernels

    return kernels.grad_norm_clip_coef([g.contiguous() for g in grads], max_norm, norm_type, grad_scale)


# Fake (meta) kernels: the step ops return nothing; the norm ops two float32 scalars.
@triton_adam_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


@triton_sgd_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


def _fake_norm(grads, max_norm, norm_type=2.0, grad_scale=None):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), device=device), torch.empty((), device=device)


triton_grad_norm_clip_coef.register_fake(_fake_norm)


@_extension.on_load
def _register_native_fakes(_module) -> None:
    @torch.library.register_fake("fastnn::adam_step_")
    def _(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("fastnn::sgd_step_")
    def _(*args, **kwargs) -> None:
        return None

    torch.library.register_fake("fastnn::grad_norm_clip_coef")(_fake_norm)


# ---------------------------------------------------------------------------------------------
# The public ops.

def _params_device(a: Args) -> torch.device:
    return a.params[0].device if len(a.params) else torch.device("cpu")


def _triton_dtypes(tensors: list) -> str | None:
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and t.dtype not in TRITON_DTYPES:
            return f"tensor {i} is {t.dtype}; the Triton kernels cover float32, bfloat16 and float16"
    return None


adam_step_ = Op("adam_step", signature=ref.adam_step_, validate=validate_adam, device=_params_device)
sgd_step_ = Op("sgd_step", signature=ref.sgd_step_, validate=validate_sgd, device=_params_device)
grad_norm_clip_coef = Op("grad_norm_clip_coef", signature=ref.grad_norm_clip_coef, validate=validate_grad_norm,
                         device=lambda a: a.grads[0].device if len(a.grads) else torch.device("cpu"))



def _register(op: Op, reference, native: str, triton: str, tensors: str) -> None:
    """The reference, the compiled op ``fastnn::<native>`` (cpu and cuda) and the Triton op
    ``fastnn::<triton>`` (for the dtypes its kernels cover in the argument ``tensors``)."""
    op.register("reference")(reference)

    def run_native(**a):
        return getattr(torch.ops.fastnn, native)(**a)

    def run_triton(**a):
        return getattr(torch.ops.fastnn, triton)(**a)

    def has_tensors(a: Args) -> str | None:  # the dispatcher finds the kernel from a tensor
        return None if len(a[tensors]) else f"argument '{tensors}' is empty: no device to dispatch on"

    op.register("cpu", native=native, supports=has_tensors)(run_native)
    op.register("cuda", native=native, supports=has_tensors)(run_native)
    op.register("triton", supports=lambda a: _triton_dtypes(a[tensors]))(run_triton)


_register(adam_step_, ref.adam_step_, "adam_step_", "triton_adam_step_", "params")
_register(sgd_step_, ref.sgd_step_, "sgd_step_", "triton_sgd_step_", "params")
_register(grad_norm_clip_coef, ref.grad_norm_clip_coef, "grad_norm_clip_coef", "triton_grad_norm_clip_coef", "grads")

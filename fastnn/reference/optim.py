"""Pure-PyTorch optimizer steps with the exact signatures of the ``fastnn::*_step_`` ops.

They are the test oracle and the fallback of last resort. Math is done in float32 (float64 for
float64 parameters) and written back in the parameters' dtype, as the fused kernels do, following
``torch.optim``'s single-tensor implementations step for step.
"""

from __future__ import annotations

import math

import torch

__all__ = ["adam_step_", "sgd_step_", "grad_norm_clip_coef"]


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _lr(lr: float, lr_tensor: torch.Tensor | None) -> float | torch.Tensor:
    return lr if lr_tensor is None else lr_tensor


def _skip(found_inf: torch.Tensor | None) -> bool:
    # The reference may synchronise: it is the oracle, not a hot path.
    return found_inf is not None and bool(found_inf.item() != 0)


def _prepare_grad(g: torch.Tensor, grad_scale: torch.Tensor | None, clip_coef: torch.Tensor | None,
                  maximize: bool) -> torch.Tensor:
    """Unscale (writing the unscaled gradient back, as torch's fused optimizers do), clip, negate."""
    grad = _opmath(g)
    if grad_scale is not None:
        grad = grad / grad_scale.to(grad.device, grad.dtype)
        g.copy_(grad)
    if clip_coef is not None:
        grad = grad * clip_coef.to(grad.device, grad.dtype)
    return -grad if maximize else grad


def adam_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
               *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
               maximize: bool, decoupled: bool, lr_tensor: torch.Tensor | None = None,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
               clip_coef: torch.Tensor | None = None) -> None:
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step over every tensor, in place.

    Args:
        params: the parameters, float32/float64/bfloat16/float16, any shape, on one device.
        grads, exp_avgs, exp_avg_sqs: one per parameter, with its shape, dtype and device.
        max_exp_avg_sqs: one per parameter when ``amsgrad``, else empty.
        steps: one float32 scalar per parameter, on its device; incremented first.
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``
            (lr and weight_decay may take any value, as torch.optim's step accepts).
        lr_tensor: a one-element tensor used instead of ``lr`` (CPU, or the parameters' device).
        grad_scale, found_inf, clip_coef: optional float32 scalars (CPU, or the parameters'
            device). A nonzero ``found_inf`` skips the whole step (nothing changes); ``grad_scale``
            divides the gradients (written back unscaled); ``clip_coef`` multiplies them (not
            written back).

    Math is float32 (float64 for float64 tensors); bias corrections in float64, as torch.
    """
    if _skip(found_inf):
        return
    lr_v = _lr(lr, lr_tensor)
    for i, p in enumerate(params):
        steps[i].add_(1)
        step = float(steps[i].item())
        grad = _prepare_grad(grads[i], grad_scale, clip_coef, maximize)
        param = _opmath(p)
        m = _opmath(exp_avgs[i])
        v = _opmath(exp_avg_sqs[i])
        lr_i = lr_v.to(param.device, param.dtype) if isinstance(lr_v, torch.Tensor) else lr_v
        if weight_decay != 0:
            if decoupled:
                param = param * (1 - lr_i * weight_decay)
            else:
                grad = grad + weight_decay * param
        m = m.lerp(grad, 1 - beta1)
        v = v * beta2 + (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        step_size = lr_i / bias_correction1
        if amsgrad:
            vmax = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(vmax)
            denom = vmax.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        param = param - step_size * m / denom
        p.copy_(param)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def sgd_step_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
              *, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
              is_first_step: bool, lr_tensor: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
              found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None) -> None:
    """One SGD step over every tensor, in place.

    Args:
        params, grads: as in :func:`adam_step_`.
        momentum_buffers: one per parameter when ``momentum != 0`` (else empty); with
            ``is_first_step`` each buffer is set to the gradient, as ``torch.optim.SGD`` does.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``.
        lr_tensor, grad_scale, found_inf, clip_coef: as in :func:`adam_step_`.
    """
    if _skip(found_inf):
        return
    lr_v = _lr(lr, lr_tensor)
    for i, p in enumerate(params):
        grad = _prepare_grad(grads[i], grad_scale, clip_coef, maximize)
        param = _opmath(p)
        if weight_decay != 0:
            grad = grad + weight_decay * param
        if momentum != 0:
            if is_first_step:
                buf = grad.clone()
            else:
                buf = _opmath(momentum_buffers[i]) * momentum + (1 - dampening) * grad
            momentum_buffers[i].copy_(buf)
            grad = grad + momentum * buf if nesterov else buf
        lr_i = lr_v.to(param.device, param.dtype) if isinstance(lr_v, torch.Tensor) else lr_v
        p.copy_(param - lr_i * grad)


def grad_norm_clip_coef(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                        grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global gradient norm (of the unscaled gradients when ``grad_scale`` is given) and the
    clipping factor ``min(1, max_norm / (norm + 1e-6))`` of ``torch.nn.utils.clip_grad_norm_``.

    Both are float32 scalars on the gradients' device (the first gradient's, for several devices).
    """
    device = grads[0].device if grads else torch.device("cpu")
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        zero = torch.zeros((), device=device)
        return zero, torch.ones((), device=device)
    if math.isinf(norm_type):
        per = [g.detach().abs().max().double().to(device) for g in grads]
        total = torch.stack(per).max()
    else:
        per = [g.detach().double().norm(norm_type).to(device) for g in grads]
        total = torch.stack(per).norm(norm_type)
    if grad_scale is not None:
        total = total / grad_scale.double().to(device)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total.float(), coef.float()

"""``fastnn.optim.Adam`` and ``AdamW``: drop-in for ``torch.optim.Adam``/``AdamW`` (they are
subclasses of them), stepped by fastnn's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops as _ops
from ._fused import FusedOptimizerMixin, as_float, lr_args

__all__ = ["Adam", "AdamW"]

Tensor = torch.Tensor


class _AdamFamily(FusedOptimizerMixin):
    _kind = "adam"
    _op = _ops.adam_step_
    _decoupled: bool

    def _is_decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", self._decoupled))

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        # torch's layout and key order; 'step' lives on the parameter's device, as in torch's
        # fused Adam, so that the kernels read it without a host sync.
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        state = self.state.get(p)
        if not state:
            return False
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            # amsgrad switched on after the state was made: torch starts the max from zero too.
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return True

    def _set_plan_state(self, plan: Any, i: int, p: Tensor, group: dict[str, Any]) -> None:
        s = self.state[p]
        plan.set_adam_state(i, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq") if group["amsgrad"] else None,
                            s["step"])

    def _group_args(self, group: dict[str, Any]) -> tuple:
        lr, lr_tensor = lr_args(group["lr"])
        beta1, beta2 = group["betas"]
        return (lr, lr_tensor, as_float(beta1), as_float(beta2), float(group["eps"]), float(group["weight_decay"]),
                bool(group["amsgrad"]), bool(group["maximize"]), self._is_decoupled(group), 0.0, 0.0, False)

    def _run_lists(self, backend: str, group: dict[str, Any], params: list[Tensor], scaling: dict) -> None:
        states = [self.state[p] for p in params]
        lr, lr_tensor = lr_args(group["lr"])
        beta1, beta2 = group["betas"]
        self._op.call(
            backend, params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states], lr=lr, beta1=as_float(beta1), beta2=as_float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]), decoupled=self._is_decoupled(group), lr_tensor=lr_tensor, **scaling)


class Adam(_AdamFamily, torch.optim.Adam):
    """``torch.optim.Adam`` with a fused step: the same constructor, parameter groups, state and
    ``state_dict`` format. Extra keyword: ``max_grad_norm`` clips the global gradient norm inside
    the step (``last_grad_norm`` holds the norm), like ``clip_grad_norm_`` before ``step`` except
    that the gradients themselves are left unclipped. ``foreach``/``fused``/``capturable`` are
    accepted and ignored: the step is always fused, never synchronises, and can be captured in a
    CUDA graph."""

    _decoupled = False

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, max_grad_norm: Optional[float] = None,
                 **kwargs: Any):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)
        self._fastnn_init(max_grad_norm)


class AdamW(_AdamFamily, torch.optim.AdamW):
    """``torch.optim.AdamW`` with a fused step (decoupled weight decay); see :class:`Adam`."""

    _decoupled = True

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, max_grad_norm: Optional[float] = None,
                 **kwargs: Any):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)
        self._fastnn_init(max_grad_norm)

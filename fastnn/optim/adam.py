"""``fastnn.optim.Adam`` and ``AdamW``: drop-in for ``torch.optim.Adam``/``AdamW`` (they are
subclasses of them), stepped by fastnn's fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops as _ops
from ..ops import optim as _optim_ops
from ._fused import FusedOptimizerMixin, as_float, local, local_grad, lr_args

__all__ = ["Adam", "AdamW"]

Tensor = torch.Tensor


class _AdamFamily(FusedOptimizerMixin):
    _kind = "adam"
    _op = _ops.adam_step_
    _validate = staticmethod(_optim_ops.validate_adam)
    _decoupled: bool

    def _is_decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", self._decoupled))

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        # torch's layout and key order; 'step' lives on the parameter's device, as in torch's
        # fused Adam, so that the kernels read it without a host sync. Entries that exist are kept:
        # amsgrad switched on after the state was made starts its max from zero.
        state = self.state[p]
        if state.get("step") is None:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if state.get(key) is None:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        state = self.state.get(p)
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        return state is not None and all(state.get(k) is not None for k in keys)

    def _settings(self, group: dict[str, Any], device: torch.device) -> dict[str, Any]:
        lr, lr_tensor = lr_args(group["lr"], device)
        beta1, beta2 = group["betas"]
        return dict(lr=lr, lr_tensor=lr_tensor, beta1=as_float(beta1), beta2=as_float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
                    maximize=bool(group["maximize"]), decoupled=self._is_decoupled(group))

    def _bind_lists(self, group: dict[str, Any], params: list[Tensor], first_step: bool, scaling: dict):
        states = [self.state[p] for p in params]
        settings = self._settings(group, params[0].device)
        def entries(key: str) -> list[Tensor]:
            return [local(s[key]) for s in states]

        return self._op.bind(
            [local(p) for p in params], [local_grad(p) for p in params], entries("exp_avg"), entries("exp_avg_sq"),
            entries("max_exp_avg_sq") if group["amsgrad"] else [], entries("step"), **settings, **scaling)

    def _choose(self, device: torch.device, params: list[Tensor]) -> str:
        return self._op.choose(params, [], [], [], [], [], lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)


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

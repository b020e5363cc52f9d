"""``fastnn.optim.SGD``: drop-in for ``torch.optim.SGD`` (a subclass of it), stepped by fastnn's
fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops as _ops
from ..ops import optim as _optim_ops
from ._fused import FusedOptimizerMixin, local, local_grad, lr_args

__all__ = ["SGD"]

Tensor = torch.Tensor


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) with a fused
    step; the same constructor, state and ``state_dict``. ``max_grad_norm`` as in
    :class:`fastnn.optim.Adam`."""

    _kind = "sgd"
    _op = _ops.sgd_step_
    _validate = staticmethod(_optim_ops.validate_sgd)

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, max_grad_norm: Optional[float] = None,
                 **kwargs: Any):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)
        self._fastnn_init(max_grad_norm)

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        # Without momentum SGD keeps no state (as torch); with it, the momentum buffer (absent or
        # None until a step fills it from the gradient, also when momentum is switched on later).
        return group["momentum"] == 0 or self.state.get(p, {}).get("momentum_buffer") is not None

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            # Set to the gradient by this step (torch: buf = grad.clone()); zeros, never
            # uninitialised memory, whatever happens to the step.
            self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _after_first_step(self, params: list[Tensor], scaling: dict) -> None:
        # A skipped step (GradScaler found an inf/NaN gradient) filled nothing: the buffers go
        # again, so that the state is torch's after a skipped step and the next step fills them.
        # Reading found_inf synchronises, in this rare call only (new buffers under a GradScaler).
        found_inf = scaling.get("found_inf")
        if found_inf is not None and bool(found_inf.item() != 0):
            for p in params:
                self.state[p].pop("momentum_buffer", None)
                if not self.state[p]:
                    del self.state[p]

    def _settings(self, group: dict[str, Any], device: torch.device) -> dict[str, Any]:
        lr, lr_tensor = lr_args(group["lr"], device)
        return dict(lr=lr, lr_tensor=lr_tensor, weight_decay=float(group["weight_decay"]),
                    maximize=bool(group["maximize"]), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]))

    def _bind_lists(self, group: dict[str, Any], params: list[Tensor], first_step: bool, scaling: dict):
        settings = self._settings(group, params[0].device)
        bufs = [local(self.state[p]["momentum_buffer"]) for p in params] if settings["momentum"] != 0 else []
        return self._op.bind([local(p) for p in params], [local_grad(p) for p in params], bufs, is_first_step=first_step, **settings,
                             **scaling)

    def _choose(self, device: torch.device, params: list[Tensor]) -> str:
        return self._op.choose(params, [], [], lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
                               nesterov=False, maximize=False, is_first_step=False)

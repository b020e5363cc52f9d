"""``fastnn.optim.SGD``: drop-in for ``torch.optim.SGD`` (a subclass of it), stepped by fastnn's
fused multi-tensor kernels."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops as _ops
from ._fused import FusedOptimizerMixin, lr_args

__all__ = ["SGD"]

Tensor = torch.Tensor


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) with a fused
    step; the same constructor, state and ``state_dict``. ``max_grad_norm`` as in
    :class:`fastnn.optim.Adam`."""

    _kind = "sgd"
    _op = _ops.sgd_step_

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, max_grad_norm: Optional[float] = None,
                 **kwargs: Any):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)
        # Parameters whose momentum buffer was made but not yet filled from a gradient.
        self._unfilled: set[int] = set()
        self._fastnn_init(max_grad_norm)

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        # Without momentum SGD keeps no state (as torch); with it, the momentum buffer.
        return group["momentum"] == 0 or self.state.get(p, {}).get("momentum_buffer") is not None

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            # Filled with the gradient by the first step (torch: buf = grad.clone()).
            self.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            self._unfilled.add(id(p))

    def _set_plan_state(self, plan: Any, i: int, p: Tensor, group: dict[str, Any]) -> None:
        if group["momentum"] == 0:
            plan.set_sgd_state(i, None, False)
        else:
            plan.set_sgd_state(i, self.state[p]["momentum_buffer"], id(p) in self._unfilled)
            self._unfilled.discard(id(p))  # the plan tracks it from here

    def _build_plans(self):
        plans = super()._build_plans()
        # Parameters without momentum need no state: register them with the plan up front.
        for plan in plans:
            if plan.native is None:
                continue
            for i, (p, gi) in enumerate(zip(plan.params, plan.groups)):
                if self.param_groups[gi]["momentum"] == 0:
                    plan.native.set_sgd_state(i, None, False)
        return plans

    def _group_args(self, group: dict[str, Any]) -> tuple:
        lr, lr_tensor = lr_args(group["lr"])
        return (lr, lr_tensor, 0.0, 0.0, 0.0, float(group["weight_decay"]), False, bool(group["maximize"]), False,
                float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"]))

    def _run_lists(self, backend: str, group: dict[str, Any], params: list[Tensor], scaling: dict) -> None:
        lr, lr_tensor = lr_args(group["lr"])
        momentum = float(group["momentum"])
        kw = dict(lr=lr, momentum=momentum, dampening=float(group["dampening"]),
                  weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                  maximize=bool(group["maximize"]), lr_tensor=lr_tensor, **scaling)
        if momentum == 0:
            self._op.call(backend, params, [p.grad for p in params], [], is_first_step=False, **kw)
            return
        # Buffers filled from the gradient on their first step, and the others, in two calls.
        unfilled = [p for p in params if id(p) in self._unfilled]
        filled = [p for p in params if id(p) not in self._unfilled]
        for first, part in ((True, unfilled), (False, filled)):
            if not part:
                continue
            self._op.call(backend, part, [p.grad for p in part], [self.state[p]["momentum_buffer"] for p in part],
                          is_first_step=first, **kw)
            if first and not _skipped(scaling["found_inf"]):
                self._unfilled.difference_update(id(p) for p in part)


def _skipped(found_inf: Optional[Tensor]) -> bool:
    # Only read (a sync) in the rare call that fills new momentum buffers under a GradScaler.
    return found_inf is not None and bool(found_inf.item() != 0)

"""What fastnn's optimizers share: state initialisation in torch's format, the step plans, the
Python path for the reference and Triton backends, GradScaler and fused clipping.

Each optimizer subclasses its torch counterpart (``fastnn.optim.AdamW`` is a
``torch.optim.AdamW``), so construction, validation, parameter groups, ``add_param_group``,
``zero_grad``, hooks, ``state_dict`` and ``load_state_dict`` are torch's own; only ``step`` is
replaced. The step runs, per device:

* with the compiled library (``cpu``/``cuda`` backends): a ``fastnn._C.StepPlan`` that holds the
  parameters and their state and reads every ``.grad`` in C++, so a step has no per-parameter
  Python work and (on CUDA) reuses its device tables: one kernel launch for the whole model;
* otherwise (``triton``/``reference``): the lists of parameters with gradients are gathered in
  Python and passed to ``fastnn.ops.adam_step_``/``sgd_step_``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import _extension, backends
from .. import ops as _ops

Tensor = torch.Tensor


class _Plan:
    """The parameters of one device, how they are stepped, and the C++ plan when there is one."""

    def __init__(self, device: torch.device, params: list[Tensor], groups: list[int], backend: str,
                 native: Any | None):
        self.device = device
        self.params = params
        self.groups = groups
        self.backend = backend
        self.native = native  # fastnn._C.StepPlan or None


class FusedOptimizerMixin:
    """Mixed into a torch optimizer class before it (``class AdamW(FusedOptimizerMixin, torch.optim.AdamW)``)."""

    _kind: str  # "adam" or "sgd"
    _op: backends.Op
    # GradScaler hands this optimizer grad_scale/found_inf instead of unscaling the gradients
    # itself; the kernels unscale and skip steps with inf/NaN gradients on the device.
    _step_supports_amp_scaling = True

    def _fastnn_init(self, max_grad_norm: Optional[float]) -> None:
        name = type(self).__name__
        for group in self.param_groups:
            if group.get("differentiable", False):
                raise ValueError(f"fastnn.optim.{name} does not support differentiable=True; use torch.optim.{name}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"fastnn.optim.{name}: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        # Global gradient norm of the last step when max_grad_norm is set (a device tensor: reading
        # it synchronises, so the step itself never does).
        self.last_grad_norm: Optional[Tensor] = None
        self._plans: Optional[list[_Plan]] = None
        self._planned_for: Any = None
        self.register_load_state_dict_post_hook(type(self)._after_load_state_dict)
        self._check_params(self.param_groups)

    # -- torch.optim.Optimizer hooks -----------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (Tensor, list, type(None))):
            # A generator would be used up by the check below: torch takes a list as well.
            param_group = dict(param_group, params=list(param_group["params"]))
        self._check_params([param_group])
        super().add_param_group(param_group)  # type: ignore[misc]
        self._plans = None

    def _check_params(self, groups: list[dict[str, Any]]) -> None:
        for gi, group in enumerate(groups):
            params = group.get("params", [])
            params = [params] if isinstance(params, Tensor) else params
            for pi, p in enumerate(params):
                if isinstance(p, Tensor) and p.is_complex():
                    raise ValueError(f"fastnn.optim.{type(self).__name__}: complex parameters are not supported "
                                     f"(parameter {pi} of group {gi} is {p.dtype}); view them with "
                                     "torch.view_as_real or use torch.optim")

    @staticmethod
    def _after_load_state_dict(self: "FusedOptimizerMixin") -> None:
        # torch keeps a loaded Adam 'step' where it was saved (on the CPU, from a non-fused torch
        # optimizer); fastnn's kernels read it on the parameter's device, as float32.
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and isinstance(st.get("step"), Tensor):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        self._plans = None

    # -- state -----------------------------------------------------------------------------------

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _group_args(self, group: dict[str, Any]) -> tuple:
        """The 12-tuple the C++ plan reads (see csrc/optim/plan.cpp)."""
        raise NotImplementedError

    def _run_lists(self, backend: str, group: dict[str, Any], params: list[Tensor], scaling: dict) -> None:
        """Python path: one op call over the parameters of one group that have gradients."""
        raise NotImplementedError

    def _set_plan_state(self, plan: Any, i: int, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- plans -----------------------------------------------------------------------------------

    def _plan_key(self) -> tuple:
        # Rebuild when the groups' parameter lists or the forced backend change. O(groups), not
        # O(parameters): a step must cost no per-parameter Python work. (add_param_group and
        # load_state_dict drop the plans themselves.)
        return (tuple((id(g["params"]), len(g["params"])) for g in self.param_groups), backends.forced(self._op.name))

    def _build_plans(self) -> list[_Plan]:
        by_device: dict[torch.device, tuple[list[Tensor], list[int]]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                params, groups = by_device.setdefault(p.device, ([], []))
                params.append(p)
                groups.append(gi)
        plans = []
        for device, (params, groups) in by_device.items():
            backend = self._op.choose(params)
            native = None
            if backend in ("cpu", "cuda"):
                module = _extension.load()
                native = module.StepPlan(self._kind, params, groups)
                for i, (p, gi) in enumerate(zip(params, groups)):
                    if self._has_state(p, self.param_groups[gi]):
                        self._set_plan_state(native, i, p, self.param_groups[gi])
            plans.append(_Plan(device, params, groups, backend, native))
        return plans

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        return bool(self.state.get(p))

    def _current_plans(self) -> list[_Plan]:
        key = self._plan_key()
        if self._plans is None or key != self._planned_for:
            self._plans = self._build_plans()
            self._planned_for = key
        return self._plans

    # -- the step --------------------------------------------------------------------------------

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimizer step (see the class docstring). Returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = self._current_plans()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        clip = self._clip_coefs(plans, grad_scale) if self.max_grad_norm is not None else {}
        for plan in plans:
            scaling = {
                "grad_scale": _on(grad_scale, plan.device),
                "found_inf": _on(found_inf, plan.device),
                "clip_coef": clip.get(plan.device),
            }
            if plan.native is not None:
                self._step_native(plan, scaling)
            else:
                self._step_lists(plan, scaling)
        return loss

    def _step_native(self, plan: _Plan, scaling: dict) -> None:
        native = plan.native
        missing = native.missing_state()
        for i in missing:
            p, group = plan.params[i], self.param_groups[plan.groups[i]]
            self._init_state(p, group)
            self._set_plan_state(native, i, p, group)
        native.step([self._group_args(g) for g in self.param_groups], scaling["grad_scale"], scaling["found_inf"],
                    scaling["clip_coef"])

    def _step_lists(self, plan: _Plan, scaling: dict) -> None:
        by_group: dict[int, list[Tensor]] = {}
        for p, gi in zip(plan.params, plan.groups):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"fastnn.optim.{type(self).__name__} does not support sparse gradients; "
                                   "consider torch.optim.SparseAdam")
            by_group.setdefault(gi, []).append(p)
        for gi, params in by_group.items():
            group = self.param_groups[gi]
            for p in params:
                if not self._has_state(p, group):
                    self._init_state(p, group)
            self._run_lists(plan.backend, group, params, scaling)

    def _clip_coefs(self, plans: list[_Plan], grad_scale: Optional[Tensor]) -> dict[torch.device, Tensor]:
        """The global norm over every device's gradients, and the clip factor on each device."""
        norms = []
        for plan in plans:
            scale = _on(grad_scale, plan.device)
            if plan.native is not None:
                norm, coef = plan.native.grad_norm(float(self.max_grad_norm), 2.0, scale)
            else:
                grads = [p.grad for p in plan.params if p.grad is not None]
                norm, coef = _ops.grad_norm_clip_coef.call(
                    "reference" if plan.backend == "triton" else plan.backend, grads, float(self.max_grad_norm),
                    2.0, scale) if grads else (torch.zeros((), device=plan.device), torch.ones((), device=plan.device))
            norms.append((plan.device, norm, coef))
        if len(norms) == 1:
            device, norm, coef = norms[0]
            self.last_grad_norm = norm
            return {device: coef}
        first = norms[0][0]
        total = torch.stack([n.to(first, torch.float64) for _, n, _ in norms]).norm()
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0).float()
        self.last_grad_norm = total.float()
        return {device: coef.to(device, non_blocking=True) for device, _, _ in norms}


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if t.device == device:
        return t
    return t.to(device, non_blocking=True)


def lr_args(lr: Any) -> tuple[float, Optional[Tensor]]:
    """(lr as a float, lr tensor or None): a tensor lr is read on its device, never on the host."""
    if isinstance(lr, Tensor):
        return 0.0, lr
    return float(lr), None


def as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)

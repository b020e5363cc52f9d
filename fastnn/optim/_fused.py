"""What fastnn's optimizers share: state initialisation in torch's format, the step plans, the
Python path for the reference and Triton backends, GradScaler and fused clipping.

Nothing about the parameters or their state is cached between steps: each step reads
``param_groups`` and ``state`` as they are then, so a state cleared or replaced, a parameter
swapped or resized, or a hyperparameter switched is followed as torch.optim follows it. What is
kept per device (the backend, and on CUDA the device tables, keyed on their whole content) never
changes a result.

Each optimizer subclasses its torch counterpart (``fastnn.optim.AdamW`` is a
``torch.optim.AdamW``), so construction, validation, parameter groups, ``add_param_group``,
``zero_grad``, hooks, ``state_dict`` and ``load_state_dict`` are torch's own; only ``step`` is
replaced. The step runs, per device:

* with the compiled library (``cpu``/``cuda`` backends): a ``fastnn._C.StepPlan`` that reads the
  parameter groups, every ``.grad`` and the state in C++ at each step, so a step has no
  per-parameter Python work and (on CUDA) reuses its device tables: one kernel launch for the
  whole model;
* otherwise (``triton``/``reference``): the lists of parameters with gradients are gathered in
  Python and passed to ``fastnn.ops.adam_step_``/``sgd_step_``.

DTensor parameters (FSDP2's ``fully_shard``, tensor-parallel placements) are stepped through
their local shards, in the same fused step as the plain parameters of their device: a DTensor
is a wrapper without storage, and the update is elementwise, so stepping each rank's shard of
the parameter, its gradient and its state steps the DTensor. The state itself is kept as torch
keeps it: ``exp_avg``, ``exp_avg_sq`` and ``momentum_buffer`` are DTensors with the parameter's
placements (so ``torch.distributed.checkpoint`` reshards them), ``step`` a plain tensor.
``max_grad_norm`` clips by the norm of the whole model, as ``clip_grad_norm_`` computes it on
DTensor gradients: the squared norms of sharded gradients are summed over the mesh dimensions
they are sharded on (one all-reduce per distinct set of process groups, usually one), replicated
and plain ones are counted once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import _extension, backends
from .. import ops as _ops

Tensor = torch.Tensor


class _Plan:
    """How the parameters of one device are stepped: the backend, the C++ plan when there is one,
    and how many parameters the device held when the plan was made (a different count means a
    parameter moved in or out of it: the plans are made again)."""

    def __init__(self, device: torch.device, n_params: int, backend: str, native: Any | None,
                 classes: list[int], reductions: list[tuple]):
        self.device = device
        self.n_params = n_params
        self.backend = backend
        self.native = native  # fastnn._C.StepPlan or None
        # Clipping: the norm class of each of the device's parameters (in param_groups' order),
        # and per class the process groups its squared norm is summed over (class 0: none).
        self.classes = classes
        self.reductions = reductions


class _Stale(Exception):
    """A plan no longer matches the parameters of its device."""


class FusedOptimizerMixin:
    """Mixed into a torch optimizer class before it (``class AdamW(FusedOptimizerMixin, torch.optim.AdamW)``)."""

    _kind: str  # "adam" or "sgd"
    _op: backends.Op
    _validate: Callable[[backends.Args], None]  # the op's argument checks
    # GradScaler hands this optimizer grad_scale/found_inf instead of unscaling the gradients
    # itself; the kernels unscale and skip steps with inf/NaN gradients on the device.
    _step_supports_amp_scaling = True

    def _fastnn_init(self, max_grad_norm: Optional[float]) -> None:
        name = type(self).__name__
        for group in self.param_groups:
            if group.get("differentiable", False):
                raise ValueError(f"fastnn.optim.{name} does not support differentiable=True; use torch.optim.{name}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool)
                                          or not isinstance(max_grad_norm, (int, float, Tensor))):
            raise TypeError(f"fastnn.optim.{name}: max_grad_norm must be a number or None, got "
                            f"{type(max_grad_norm).__name__} {max_grad_norm!r}")
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
        """Make the state entries of ``p`` that its group needs and it lacks (torch's format)."""
        raise NotImplementedError

    def _settings(self, group: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The group's settings as the step kernels on ``device`` read them (fastnn._C.OptimGroup's
        fields)."""
        raise NotImplementedError

    def _bind_lists(self, group: dict[str, Any], params: list[Tensor], first_step: bool,
                    scaling: dict) -> backends.Args:
        """Python path: the op call over ``params`` (of one group, all with a gradient)."""
        raise NotImplementedError

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` has every state entry its group needs."""
        raise NotImplementedError

    def _choose(self, device: torch.device, params: list[Tensor]) -> str:
        """The backend that steps ``params`` (all on ``device``): the op's chooser decides."""
        raise NotImplementedError

    def _after_first_step(self, params: list[Tensor], scaling: dict) -> None:
        """After a step that made new state for ``params``: SGD undoes it when the step was skipped."""

    # -- plans -----------------------------------------------------------------------------------

    def _plan_key(self) -> tuple:
        # Rebuild when the groups' parameter lists or the forced backend change: O(groups), not
        # O(parameters). A parameter replaced in a list, or moved to another device, is seen by
        # the count of each device's parameters, which every step checks.
        return (tuple((id(g["params"]), len(g["params"])) for g in self.param_groups), backends.forced(self._op.name))

    def _build_plans(self) -> list[_Plan]:
        by_device: dict[torch.device, list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                by_device.setdefault(p.device, []).append(p)
        plans = []
        for device, params in by_device.items():
            backend = self._choose(device, [local(p) for p in params])
            native = _extension.load().StepPlan(self._kind, device) if backend in ("cpu", "cuda") else None
            reductions: list[tuple] = [()]
            classes = []
            for p in params:
                groups = _norm_reduction(p)
                if groups not in reductions:
                    reductions.append(groups)
                classes.append(reductions.index(groups))
            plans.append(_Plan(device, len(params), backend, native, classes, reductions))
        return plans

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
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        done: set[torch.device] = set()
        for attempt in range(2):
            plans = self._current_plans()
            try:
                clip = self._clip_coefs(plans, grad_scale) if self.max_grad_norm is not None else {}
                for plan in plans:
                    if plan.device in done:
                        continue
                    scaling = {
                        "grad_scale": _on(grad_scale, plan.device),
                        "found_inf": _on(found_inf, plan.device),
                        "clip_coef": clip.get(plan.device),
                    }
                    if plan.native is not None:
                        self._step_native(plan, scaling)
                    else:
                        self._step_lists(plan, scaling)
                    done.add(plan.device)
                return loss
            except _Stale:
                if attempt:
                    raise RuntimeError("fastnn.optim: the parameters changed devices during the step") from None
                self._plans = None
        return loss

    def _step_native(self, plan: _Plan, scaling: dict) -> None:
        group_cls = _extension.load().OptimGroup
        settings = [group_cls(**self._settings(g, plan.device)) for g in self.param_groups]
        stepped, on_device, missing = plan.native.step(self.param_groups, self.state, settings, **scaling)
        if on_device != plan.n_params:
            raise _Stale
        if not missing:
            return
        params = [self.param_groups[gi]["params"][pi] for gi, pi in missing]
        for (gi, _), p in zip(missing, params):
            self._init_state(p, self.param_groups[gi])
        _, _, still = plan.native.step(self.param_groups, self.state, settings, first_step=missing, **scaling)
        if still:  # _init_state made what the plan reads: this cannot happen
            raise RuntimeError(f"fastnn.optim: no state for parameters {still} after initialising it")
        self._after_first_step(params, scaling)

    def _step_lists(self, plan: _Plan, scaling: dict) -> None:
        calls: list[backends.Args] = []
        first: list[Tensor] = []
        on_device = 0
        for group in self.param_groups:
            ready, fresh = [], []
            for p in group["params"]:
                if p.device != plan.device:
                    continue
                on_device += 1
                if p.grad is None:
                    continue
                local_grad(p)  # checks the placements of a DTensor gradient
                if p.grad.is_sparse:
                    raise RuntimeError(f"fastnn.optim.{type(self).__name__} does not support sparse gradients; "
                                       "consider torch.optim.SparseAdam")
                (ready if self._has_state(p, group) else fresh).append(p)
            for p in fresh:
                self._init_state(p, group)
            first += fresh
            for params, is_first in ((ready, False), (fresh, True)):
                if params:
                    calls.append(self._bind_lists(group, params, is_first, scaling))
        if on_device != plan.n_params:
            raise _Stale
        # Every call is checked before the first one runs: a bad tensor changes nothing.
        for a in calls:
            self._validate(a)
        for a in calls:
            self._op.call(plan.backend, **a)
        if first:
            self._after_first_step(first, scaling)

    def _clip_coefs(self, plans: list[_Plan], grad_scale: Optional[Tensor]) -> dict[torch.device, Tensor]:
        """The global norm over every device's gradients, and the clip factor on each device."""
        norms = []
        for plan in plans:
            scale = _on(grad_scale, plan.device)
            if len(plan.reductions) > 1:  # DTensor gradients sharded over a mesh
                norm = self._reduced_norm(plan, scale)
                coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            elif plan.native is not None:
                norm, coef = plan.native.grad_norm(self.param_groups, float(self.max_grad_norm), 2.0, scale)
            else:
                grads = [local_grad(p) for g in self.param_groups for p in g["params"]
                         if p.grad is not None and p.device == plan.device]
                norm, coef = _ops.grad_norm_clip_coef(grads, float(self.max_grad_norm), 2.0, scale) if grads \
                    else (torch.zeros((), device=plan.device), torch.ones((), device=plan.device))
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

    def _reduced_norm(self, plan: _Plan, scale: Optional[Tensor]) -> Tensor:
        """The norm of the gradients of one device's parameters over every rank that shares them:
        per class, the squared norm of the local shards, summed over the class's process groups
        (as the Partial norm of a sharded DTensor gradient reduces in ``clip_grad_norm_``)."""
        n = len(plan.reductions)
        if plan.native is not None:
            norms, on_device = plan.native.grad_norms(self.param_groups, plan.classes, n, scale)
            if on_device != plan.n_params:
                raise _Stale
        else:
            params = [p for g in self.param_groups for p in g["params"] if p.device == plan.device]
            if len(params) != plan.n_params:
                raise _Stale
            per_class: list[list[Tensor]] = [[] for _ in range(n)]
            for p, c in zip(params, plan.classes):
                if p.grad is not None:
                    per_class[c].append(local_grad(p))
            norms = torch.stack([
                _ops.grad_norm_clip_coef(grads, 1.0, 2.0, scale)[0] if grads
                else torch.zeros((), device=plan.device) for grads in per_class])
        squares = norms.double().square()
        for c in range(1, n):
            for group in plan.reductions[c]:
                dist.all_reduce(squares[c:c + 1], group=group)
        return squares.sum().sqrt().float()


def local(t: Tensor) -> Tensor:
    """The tensor a kernel steps for ``t``: its local shard when ``t`` is a DTensor, else ``t``."""
    return getattr(t, "_local_tensor", t)


def local_grad(p: Tensor) -> Optional[Tensor]:
    """The local gradient of ``p``; a DTensor gradient must have ``p``'s placements (a Partial
    gradient of a Replicate parameter holds partial sums: stepping it would be wrong)."""
    g = p.grad
    spec, gspec = getattr(p, "_spec", None), getattr(g, "_spec", None)
    if spec is not None and gspec is not None and spec.placements != gspec.placements:
        raise ValueError(f"fastnn: argument 'grad': expected a DTensor with the parameter's placements "
                         f"{spec.placements}, got {gspec.placements} (redistribute the gradient before step())")
    return None if g is None else local(g)


def _norm_reduction(p: Tensor) -> tuple:
    """The process groups over which the squared gradient norm of ``p`` is summed: the mesh
    dimensions a DTensor is sharded on; the group a plain parameter names when each rank holds a
    different part of it (``_fastnn_norm_group``: ExpertParallelMoE's experts); none for a plain or
    replicated parameter."""
    group = getattr(p, "_fastnn_norm_group", None)
    if group is not None:
        return (group,)
    spec = getattr(p, "_spec", None)
    if spec is None:
        return ()
    return tuple(spec.mesh.get_group(d) for d, pl in enumerate(spec.placements) if pl.is_shard() or pl.is_partial())


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if t.device == device:
        return t
    return t.to(device, non_blocking=True)


def lr_args(lr: Any, device: torch.device) -> tuple[float, Optional[Tensor]]:
    """(lr as a float, lr tensor or None) for a step on ``device``: a tensor lr is read by the
    kernels where it lives, never synchronised: a CPU one on the host, a device one on the device
    (moved to ``device`` when it is on another accelerator)."""
    if isinstance(lr, Tensor):
        return 0.0, lr if lr.device.type == "cpu" else _on(lr, device)
    return float(lr), None


def as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)

"""``fastnn.quantized.MoE``: the int8 counterpart of :class:`fastnn.MoE` (and of the Hugging Face MoE
blocks that ``fastnn.convert`` turns into one), for CPU inference.

What is quantized:

* the routed experts: ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] become
  int8 buffers ``experts.gate_up_proj_q`` / ``experts.down_proj_q`` with one fp32 scale per output
  channel per expert (``*_scale`` [E, 2I] and [E, H]); they run in
  :func:`fastnn.ops.quantized.int8_moe_mlp` (activations int8 per row, or fp32 with ``weight_only``);
* the shared expert's three projections (Qwen2-MoE): :class:`fastnn.quantized.Linear`.

What stays fp32: the router ``gate.weight`` [E, H] and ``shared_expert_gate.weight`` [1, H] (a
fraction of a percent of the bytes, and rounding them would move routing decisions, which are
discrete: a token sent to another expert is a large error, not a small one), the selection bias,
and the routing arithmetic. Their parameters are kept but do not require grad: the layer is for
inference. A forward whose input requires grad while autograd is recording raises an error.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..nn import moe as fmoe
from ..ops import quantized as qops
from ..reference.quantized import quantize_weight
from .modules import Linear, _Quantized, _back, _to_fp32

__all__ = ["MoE", "Experts"]

Tensor = torch.Tensor
_SHARED = ("gate_proj", "up_proj", "down_proj")


class Experts(_Quantized):
    """E gated MLPs with int8 weights (:func:`fastnn.ops.quantized.int8_moe_mlp`)."""

    _weights = ("gate_up_proj", "down_proj")

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, activation: str = "silu",
                 weight_only: bool = False) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, ffn_hidden_size
        self.activation = fmoe._activation_name(activation)
        self.weight_only = bool(weight_only)
        E, H, I = num_experts, hidden_size, ffn_hidden_size
        self._set_weight("gate_up_proj", torch.zeros((E, 2 * I, H), dtype=torch.int8), torch.ones(E, 2 * I))
        self._set_weight("down_proj", torch.zeros((E, H, I), dtype=torch.int8), torch.ones(E, H))

    @classmethod
    def from_float(cls, mod: fmoe.Experts, weight_only: bool = False) -> "Experts":
        q = cls(mod.hidden_dim, mod.intermediate_dim, mod.num_experts, mod.activation, weight_only)
        for name in cls._weights:  # no biases: the experts of fastnn.MoE have none
            q._set_weight(name, *quantize_weight(getattr(mod, name)))
        return q

    def to_float(self) -> fmoe.Experts:
        m = fmoe.Experts(self.hidden_dim, self.intermediate_dim, self.num_experts, self.activation, device="meta")
        m.gate_up_proj = nn.Parameter(self._dequantized("gate_up_proj"))
        m.down_proj = nn.Parameter(self._dequantized("down_proj"))
        return m

    def forward(self, x: Tensor, gating: Any, top_k: int) -> Tensor:
        return qops.int8_moe_mlp(x, gating.sorted_slots, gating.tokens_per_expert, gating.slot_positions,
                                 gating.weights, self.gate_up_proj_q, self.gate_up_proj_scale, self.down_proj_q,
                                 self.down_proj_scale, self.activation, self.weight_only)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_dim}, "
                f"ffn_hidden_size={self.intermediate_dim}, activation={self.activation!r}, gate_up_proj and "
                f"down_proj: {self._mode().replace('per-channel', 'per output channel per expert')}")


def _config(mod: fmoe.MoE) -> dict:
    """The constructor arguments of a float fastnn.MoE (or of a converted Hugging Face block)."""
    shared = mod.shared_expert
    return dict(hidden_size=mod.hidden_size, ffn_hidden_size=mod.ffn_hidden_size, num_experts=mod.num_experts,
                top_k=mod.top_k, activation=mod.experts.activation, **mod.routing,
                selection_bias=mod.e_score_correction_bias is not None, noise_std=mod.noise_std,
                noise_seed=mod.noise_seed, shared_expert_size=shared.down_proj.in_features if shared else 0,
                shared_expert_gate=mod.shared_expert_gate is not None, aux_loss_coef=mod.aux_loss_coef,
                z_loss_coef=mod.z_loss_coef)


def _frozen(mod: nn.Module) -> nn.Module:
    for p in mod.parameters():
        p.requires_grad_(False)
    return mod


class MoE(_Quantized):
    """int8 :class:`fastnn.MoE`: fp32 routing, int8 experts (see the module docstring).

    Built by :func:`fastnn.quantize_dynamic` (``from_float``) or, with zero weights for
    ``load_state_dict``, from the float layer's constructor arguments plus ``weight_only``. Forward,
    ``route``, ``aux_loss``, ``router_logits`` and ``router_stats`` are those of fastnn.MoE.
    """

    # The float layer's routing and bookkeeping, unchanged (they read only the attributes set below).
    route = fmoe.MoE.route
    _noisy = fmoe.MoE._noisy
    _record = fmoe.MoE._record
    update_selection_bias = fmoe.MoE.update_selection_bias

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int, *,
                 weight_only: bool = False, **kwargs: Any) -> None:
        super().__init__()
        # Validates every argument as the float layer does, and gives the float layout (on meta: free).
        ref = fmoe.MoE(hidden_size, ffn_hidden_size, num_experts, top_k, device="meta", **kwargs)
        self._float_kwargs = {k: v for k, v in _config(ref).items() if k not in ("hidden_size", "ffn_hidden_size",
                                                                               "num_experts", "top_k")}
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "routing", "noise_std",
                     "noise_seed", "aux_loss_coef", "z_loss_coef"):
            setattr(self, name, copy.copy(getattr(ref, name)))
        self.weight_only = bool(weight_only)
        self._noise_gen = None
        self.gate = _frozen(fmoe.Router(hidden_size, num_experts))
        self.experts = Experts(hidden_size, ffn_hidden_size, num_experts, ref.experts.activation, weight_only)
        self.shared_expert = None
        if ref.shared_expert is not None:  # the float layer's (on meta), its projections replaced
            self.shared_expert = ref.shared_expert
            for name in _SHARED:
                lin = getattr(self.shared_expert, name)
                setattr(self.shared_expert, name, Linear(lin.in_features, lin.out_features, False, weight_only))
        self.shared_expert_gate = _frozen(nn.Linear(hidden_size, 1, bias=False)) \
            if ref.shared_expert_gate is not None else None
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts)
                             if ref.e_score_correction_bias is not None else None)
        self.aux_loss = self.router_logits = None
        self.router_stats: dict[str, Tensor] = {}

    @classmethod
    def from_float(cls, mod: fmoe.MoE, weight_only: bool = False) -> "MoE":
        cfg = _config(mod)
        q = cls(**cfg, weight_only=weight_only)
        q._float_dtype = mod.experts.gate_up_proj.dtype  # what fastnn.dequantize gives back
        # The router module itself (a copy): a converted Hugging Face block's router is also an
        # instance of the block's router class, whose output-capture hooks keep working.
        q.gate = _frozen(copy.deepcopy(mod.gate)).float()
        q.experts = Experts.from_float(mod.experts, weight_only)
        if mod.shared_expert is not None:
            for name in _SHARED:
                setattr(q.shared_expert, name, Linear.from_float(getattr(mod.shared_expert, name), weight_only))
        if mod.shared_expert_gate is not None:
            q.shared_expert_gate = _frozen(copy.deepcopy(mod.shared_expert_gate)).float()
        if mod.e_score_correction_bias is not None:
            q.e_score_correction_bias = mod.e_score_correction_bias.detach().float().clone()
        return q

    def to_float(self) -> fmoe.MoE:
        """A float fastnn.MoE with the dequantized weights (the router module is this one's, copied)."""
        m = fmoe.MoE(self.hidden_size, self.ffn_hidden_size, self.num_experts, self.top_k, device="meta",
                     **self._float_kwargs)
        m.gate = copy.deepcopy(self.gate).requires_grad_(True)
        m.experts = self.experts.to_float()
        if self.shared_expert is not None:
            m.shared_expert = copy.deepcopy(self.shared_expert)
            for name in _SHARED:
                setattr(m.shared_expert, name, getattr(self.shared_expert, name).to_float())
        if self.shared_expert_gate is not None:
            m.shared_expert_gate = copy.deepcopy(self.shared_expert_gate).requires_grad_(True)
        if self.e_score_correction_bias is not None:
            m.e_score_correction_bias = self.e_score_correction_bias.clone()
        return m.to(getattr(self, "_float_dtype", torch.float32)).train(self.training)

    def _apply(self, fn, recurse=True):
        # .double() / .half() / .to(dtype) would convert the fp32 router and correction bias, which
        # routing reads in fp32 (the experts' scales stay fp32 through _Quantized); device moves apply.
        super()._apply(fn, recurse)
        for router in (self.gate, self.shared_expert_gate):
            if router is not None and any(p.is_floating_point() and p.dtype != torch.float32
                                          for p in router.parameters()):
                router.float()
        b = self.e_score_correction_bias
        if b is not None and b.dtype != torch.float32:
            self.e_score_correction_bias = b.float()
        return self

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.routing.items())
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, {opts}, experts and shared expert int8 "
                f"({'weight-only' if self.weight_only else 'dynamic'}), router fp32")

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() < 1 or \
                hidden_states.shape[-1] != self.hidden_size or not hidden_states.is_floating_point():
            got = f"tensor of shape {list(hidden_states.shape)}, dtype {hidden_states.dtype}" \
                if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
            raise ValueError(f"fastnn.quantized.MoE: argument 'hidden_states': expected a floating-point tensor of "
                             f"shape [..., {self.hidden_size}], got {got}")
        # fp32 arithmetic whatever the input's dtype; the output comes back in it, as the other
        # quantized modules do
        x = _to_fp32(hidden_states).reshape(-1, self.hidden_size)
        logits, gating = self.route(x)
        out = self.experts(x, gating, self.top_k)
        if self.shared_expert is not None:
            scale = torch.sigmoid(self.shared_expert_gate(x)) if self.shared_expert_gate is not None else 1.0
            out = out + scale * self.shared_expert(x)
        self._record(logits, gating)
        return _back(out.reshape(hidden_states.shape), hidden_states.dtype)

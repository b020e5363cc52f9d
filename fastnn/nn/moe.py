"""``fastnn.MoE``: a sparse Mixture-of-Experts feed-forward layer in the Hugging Face experts layout.

Parameters (names and shapes of the Hugging Face Mixtral / Qwen-MoE / OLMoE blocks, so that a
``state_dict`` moves between them without surgery):

* ``gate.weight`` [E, H]: the router;
* ``experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and ``experts.down_proj`` [E, H, I];
* optionally ``shared_expert.{gate,up,down}_proj.weight`` and ``shared_expert_gate.weight`` [1, H]
  (Qwen2-MoE), and the buffer ``e_score_correction_bias`` [E] (DeepSeek-V3 selection bias).

The forward pass is gating (:func:`fastnn.ops.topk_gating`), permutation, two grouped GEMMs with the
gated activation between them, and the weighted combine; each op picks its backend per call.
After each forward, ``aux_loss`` holds ``aux_loss_coef * load_balancing + z_loss_coef * z_loss``
(add it to the training loss) and ``router_stats`` the routing statistics of that call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import moe as moe_ops
from ..reference.moe import ACTIVATIONS

__all__ = ["MoE", "Router", "Experts", "SharedExpert", "HF_ACTIVATIONS"]

Tensor = torch.Tensor

# Hugging Face activation names (config.hidden_act) -> fastnn's.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu"}


def _activation_name(activation: str) -> str:
    name = HF_ACTIVATIONS.get(activation, activation)
    if name not in ACTIVATIONS:
        known = sorted(set(HF_ACTIVATIONS) | set(ACTIVATIONS))
        raise ValueError(f"fastnn.MoE: argument 'activation': expected one of {known}, "
                         f"got {activation!r}")
    return name


class Router(nn.Module):
    """The router: logits = x @ weight.T, weight [E, H] (no bias, as in every HF MoE block)."""

    def __init__(self, hidden_size: int, num_experts: int, *, device=None, dtype=None) -> None:
        # nn.Module.__init__ directly: integrations mix this class with a Hugging Face router class
        # (so that HF's router-logit hooks still fire) whose __init__ must not run.
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        bound = 1 / math.sqrt(hidden_size) if hidden_size else 0.0
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """E gated MLPs stored as two 3-d tensors, computed with grouped GEMMs."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, activation: str = "silu", *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = ffn_hidden_size
        self.activation = _activation_name(activation)
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size, **kw))
        # nn.Linear's default initialisation, per expert.
        for w, fan_in in ((self.gate_up_proj, hidden_size), (self.down_proj, ffn_hidden_size)):
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: Tensor, gating: moe_ops.GatingOutput, top_k: int) -> Tensor:
        # fastnn.ops.moe_mlp's backend runs its fused inference kernel, or its differentiable ops
        # when a gradient is needed.
        return moe_ops.moe_mlp(x, gating.sorted_slots, gating.tokens_per_expert, gating.slot_positions,
                               gating.weights, self.gate_up_proj, self.down_proj, self.activation)


class SharedExpert(nn.Module):
    """A dense gated MLP every token goes through (Qwen2-MoE's ``shared_expert``)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "silu", *, device=None,
                 dtype=None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, **kw)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, **kw)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, **kw)
        self.activation = _activation_name(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sparse MoE feed-forward layer: ``y = sum_j w_j * Expert_{e_j}(x) (+ shared expert)``.

    Args:
        hidden_size, ffn_hidden_size: H and each expert's intermediate size I.
        num_experts, top_k: E and the experts per token k.
        activation: the gated activation of the experts: "silu" (SwiGLU), "gelu" (GeGLU),
            "gelu_tanh", "relu" (Hugging Face names such as "gelu_pytorch_tanh" are accepted).
        score_func, renormalize, num_groups, topk_groups, group_score, routed_scaling_factor,
            capacity_factor, drop_policy: the router options of :func:`fastnn.ops.topk_gating`.
            Switch top-1 is ``top_k=1, renormalize=False``.
        selection_bias: keep a per-expert bias buffer ``e_score_correction_bias`` that steers selection
            only (DeepSeek-V3's aux-loss-free balancing; see :meth:`update_selection_bias`).
        noise_std, noise_seed: noisy top-k: Gaussian noise of this std added to the router logits in
            training only, drawn from a generator seeded with ``noise_seed`` (reproducible run to run).
        shared_expert_size: intermediate size of a shared expert (0: none); ``shared_expert_gate``
            scales it by sigmoid(x @ w) as Qwen2-MoE does.
        aux_loss_coef, z_loss_coef: coefficients of the load-balancing and router z-losses summed
            into ``aux_loss`` after each forward.

    Input ``[..., H]``, output the same shape and dtype. ``router_stats`` after a forward holds
    ``tokens_per_expert`` [E], ``dropped_fraction`` and ``routing_entropy`` (device tensors; reading
    them is the only host synchronisation, and it is the caller's choice).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int, *,
                 activation: str = "silu", score_func: str = "softmax", renormalize: bool = True,
                 selection_bias: bool = False, num_groups: int = 1, topk_groups: int = 1, group_score: str = "max",
                 routed_scaling_factor: float = 1.0, capacity_factor: float = 0.0, drop_policy: str = "drop",
                 noise_std: float = 0.0, noise_seed: Optional[int] = None, shared_expert_size: int = 0,
                 shared_expert_gate: bool = False, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                        ("num_experts", num_experts)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"fastnn.MoE: argument '{name}': expected a positive integer, got {v!r}")
        if noise_std < 0:
            raise ValueError(f"fastnn.MoE: argument 'noise_std': expected a value >= 0, got {noise_std}")
        if shared_expert_gate and not shared_expert_size:
            raise ValueError("fastnn.MoE: argument 'shared_expert_gate': expected shared_expert_size > 0 with a "
                             "shared expert gate, got shared_expert_size=0")
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k = num_experts, top_k
        self.routing = dict(score_func=score_func, renormalize=renormalize, num_groups=num_groups,
                            topk_groups=topk_groups, group_score=group_score,
                            routed_scaling_factor=float(routed_scaling_factor),
                            capacity_factor=float(capacity_factor), drop_policy=drop_policy)
        # Check the router options now rather than at the first forward.
        moe_ops.validate_gating(torch.empty(0, num_experts), top_k, **self.routing)
        self.noise_std, self.noise_seed = float(noise_std), noise_seed
        self._noise_gen: Optional[torch.Generator] = None
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        kw = dict(device=device, dtype=dtype)
        self.gate = Router(hidden_size, num_experts, **kw)
        self.experts = Experts(hidden_size, ffn_hidden_size, num_experts, activation, **kw)
        self.shared_expert = SharedExpert(hidden_size, shared_expert_size, activation, **kw) \
            if shared_expert_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **kw) if shared_expert_gate else None
        if selection_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device,
                                                                        dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.aux_loss: Optional[Tensor] = None
        self.router_logits: Optional[Tensor] = None
        self.router_stats: dict[str, Tensor] = {}

    def __getstate__(self):
        # aux_loss and router_logits belong to the last forward's autograd graph: non-leaf tensors,
        # which copy.deepcopy (quantize_dynamic, the exporters) and pickle refuse. A copy starts
        # without them, as after __init__.
        state = dict(super().__getstate__())
        state["aux_loss"] = state["router_logits"] = None
        return state

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.routing.items())
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.experts.activation!r}, {opts}")

    # -- routing ------------------------------------------------------------------------------

    def _noisy(self, logits: Tensor) -> Tensor:
        if not (self.training and self.noise_std > 0):
            return logits
        if self._noise_gen is None or self._noise_gen.device != logits.device:
            self._noise_gen = torch.Generator(device=logits.device)
            self._noise_gen.manual_seed(self.noise_seed if self.noise_seed is not None else torch.initial_seed())
        noise = torch.randn(logits.shape, generator=self._noise_gen, device=logits.device, dtype=torch.float32)
        return logits.float() + self.noise_std * noise

    def route(self, x: Tensor) -> tuple[Tensor, moe_ops.GatingOutput]:
        """Router logits [T, E] and the routing of tokens ``x`` [T, H]."""
        logits = self.gate(x)
        gating = ops.topk_gating(self._noisy(logits), self.top_k, selection_bias=self.e_score_correction_bias,
                                 **self.routing)
        return logits, gating

    @torch.no_grad()
    def update_selection_bias(self, rate: float = 1e-3) -> None:
        """DeepSeek-V3's aux-loss-free balancing: raise the bias of under-loaded experts and lower it
        for over-loaded ones by ``rate``, from the last forward's ``tokens_per_expert``."""
        if self.e_score_correction_bias is None:
            raise RuntimeError("fastnn.MoE.update_selection_bias: the layer has no selection bias "
                               "(construct it with selection_bias=True)")
        load = self.router_stats.get("tokens_per_expert")
        if load is None:
            raise RuntimeError("fastnn.MoE.update_selection_bias: call it after a forward pass")
        load = load.float()
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() < 1 or \
                hidden_states.shape[-1] != self.hidden_size:
            got = f"tensor of shape {list(hidden_states.shape)}" if isinstance(hidden_states, Tensor) \
                else type(hidden_states).__name__
            raise ValueError(f"fastnn.MoE: argument 'hidden_states': expected a tensor of shape [..., "
                             f"{self.hidden_size}], got {got}")
        w = self.experts.gate_up_proj
        if hidden_states.dtype != w.dtype or hidden_states.device != w.device:
            raise ValueError(f"fastnn.MoE: argument 'hidden_states': expected dtype {w.dtype} on {w.device} (the "
                             f"layer's parameters), got dtype {hidden_states.dtype} on {hidden_states.device}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        logits, gating = self.route(x)
        out = self.experts(x, gating, self.top_k)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        self._record(logits, gating)
        return out.reshape(shape)

    def _record(self, logits: Tensor, gating: moe_ops.GatingOutput) -> None:
        is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
        if is_exporting():  # an exported program has no use for per-call statistics
            return
        score_func = self.routing["score_func"]
        aux = logits.new_zeros((), dtype=torch.float32)
        if self.aux_loss_coef:
            aux = aux + self.aux_loss_coef * ops.load_balancing_loss(logits, gating.tokens_per_expert, score_func)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * ops.router_z_loss(logits)
        self.aux_loss = aux
        self.router_logits = logits
        slots = max(logits.shape[0] * self.top_k, 1)
        kept = gating.tokens_per_expert.sum()
        self.router_stats = {
            "tokens_per_expert": gating.tokens_per_expert.detach(),
            "dropped_fraction": (1.0 - kept.float() / slots) if logits.shape[0] else kept.float() * 0,
            "routing_entropy": ops.routing_entropy(logits, score_func),
        }

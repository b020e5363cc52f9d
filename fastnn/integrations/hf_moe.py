"""``fastnn.convert`` for the sparse MoE blocks of Hugging Face ``transformers``.

Supported: ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock`` (with its shared expert),
``Qwen3MoeSparseMoeBlock`` and ``OlmoeSparseMoeBlock``, in the fused experts layout of transformers
>= 5 (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]), with an activation
fastnn fuses. Other blocks (older releases, whose experts are an ``nn.ModuleList``; other
activations) are left unconverted, and ``fastnn.convert`` warns, naming them and the reason.

The converted layer is a :class:`fastnn.MoE` that *shares* the block's ``nn.Parameter`` objects
(an optimizer built before the conversion keeps updating the same tensors) and keeps the
block's parameter names, so state_dicts move both ways. Its router is an instance of the
block's own router class as well as of :class:`fastnn.nn.moe.Router`, and shares the hook tables
of the block's router, so Hugging Face's ``output_router_logits`` capture hooks (and the model's aux
loss) keep working whether they were installed before the conversion (transformers installs them on
the first forward that asks for an output) or after it.

``fastnn.revert`` gives back the original block object, pointed at the current parameters.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from ..convert_registry import Conversion, register, share_hooks
from ..nn.moe import MoE, Router
from ..reference.moe import ACTIVATIONS

__all__ = ["HuggingFaceMoE", "FAMILIES"]

# family name -> (module, block class)
FAMILIES = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
}


def _block_class(family: str) -> Optional[type]:
    # A model holding such a block has imported its module already: never import transformers here
    # (converting a model without any transformers block must not pay for it).
    mod, name = FAMILIES[family]
    return getattr(sys.modules.get(mod), name, None)


def _activation_of(act_fn: nn.Module) -> Optional[str]:
    """fastnn's name for a Hugging Face activation module, found by evaluating it (the block keeps
    the module, not the config's name); None when fastnn fuses no such activation."""
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    with torch.no_grad():
        y = act_fn(x)
        for name, fn in ACTIVATIONS.items():
            if torch.allclose(y, fn(x), rtol=1e-6, atol=1e-7):
                return name
    return None


_ROUTER_CLASSES: dict[type, type] = {}


def _router_class(hf_router_cls: type) -> type:
    """A class that is both fastnn's Router and the block's router class (for HF's output hooks).
    Defined at module level under a stable name so that pickling a converted model works."""
    cls = _ROUTER_CLASSES.get(hf_router_cls)
    if cls is None:
        name = f"Fastnn{hf_router_cls.__name__}"
        cls = type(name, (Router, hf_router_cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _ROUTER_CLASSES[hf_router_cls] = cls
    return cls


def _unsupported(block: nn.Module) -> Optional[str]:
    """Why fastnn leaves this block (of a supported class) alone, or None when it converts it."""
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return ("block of an older transformers: a ModuleList of experts, not converted (fastnn converts "
                "the fused experts of transformers >= 5)")
    if not (isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
            and isinstance(getattr(getattr(block, "gate", None), "weight", None), torch.Tensor)):
        return "experts not in the fused layout (experts.gate_up_proj, experts.down_proj, gate.weight), not converted"
    shared = getattr(block, "shared_expert", None)
    for what, owner in (("experts'", experts), ("shared expert's", shared)):
        if owner is None:
            continue
        act_fn = getattr(owner, "act_fn", None)
        if not isinstance(act_fn, nn.Module) or _activation_of(act_fn) is None:
            return (f"the {what} activation {type(act_fn).__name__} is not one fastnn fuses "
                    f"({sorted(ACTIVATIONS)}), not converted")
    return None


class HuggingFaceMoE(MoE):
    """A :class:`fastnn.MoE` converted from a Hugging Face sparse MoE block (see the module doc)."""

    family = ""

    def __init__(self, block: nn.Module) -> None:
        reason = _unsupported(block)
        if reason:
            raise ValueError(f"fastnn: argument '{type(self).__name__}: block': {reason}")
        gate, experts = block.gate, block.experts
        E, two_i, H = experts.gate_up_proj.shape
        shared = getattr(block, "shared_expert", None)
        shared_gate = getattr(block, "shared_expert_gate", None)
        # Built on the meta device: every parameter is then replaced by the block's own.
        super().__init__(H, two_i // 2, E, int(gate.top_k), activation=_activation_of(experts.act_fn),
                         renormalize=bool(getattr(gate, "norm_topk_prob", True)),
                         shared_expert_size=shared.down_proj.in_features if shared is not None else 0,
                         shared_expert_gate=shared_gate is not None, device="meta",
                         dtype=experts.gate_up_proj.dtype)
        router = _router_class(type(gate))(H, E, device="meta")
        router.top_k = self.top_k
        router.weight = gate.weight
        share_hooks(gate, router)
        self.gate = router
        self.experts.gate_up_proj = experts.gate_up_proj
        self.experts.down_proj = experts.down_proj
        if shared is not None:
            self.shared_expert.activation = _activation_of(shared.act_fn)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self.shared_expert, name).weight = getattr(shared, name).weight
        if shared_gate is not None:
            self.shared_expert_gate.weight = shared_gate.weight
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        # Kept outside the module tree (not a submodule: no duplicate parameters) for revert.
        object.__setattr__(self, "_hf_block", block)
        self.train(block.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            # Mixtral's router jitter; HF multiplies the input in place, fastnn leaves it untouched.
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return super().forward(hidden_states)

    def to_hf(self) -> nn.Module:
        block = self._hf_block
        block.gate.weight = self.gate.weight
        block.experts.gate_up_proj = self.experts.gate_up_proj
        block.experts.down_proj = self.experts.down_proj
        if self.shared_expert is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.shared_expert, name).weight = getattr(self.shared_expert, name).weight
        if self.shared_expert_gate is not None:
            block.shared_expert_gate.weight = self.shared_expert_gate.weight
        block.train(self.training)
        return block


def _register(family: str) -> None:
    name = f"hf_{family}"  # fastnn.convert(model, only=["hf_mixtral"]) etc.
    cls = type(f"HuggingFace{family.title().replace('_', '')}MoE", (HuggingFaceMoE,),
               {"family": family, "__module__": __name__})
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls

    def candidate(m: nn.Module) -> bool:
        block_cls = _block_class(family)
        return block_cls is not None and isinstance(m, block_cls)

    register(Conversion(name=name, matches=lambda m: candidate(m) and _unsupported(m) is None, to_fastnn=cls,
                        fastnn_type=cls, to_original=lambda m: m.to_hf(),
                        explain=lambda m: _unsupported(m) if candidate(m) else None))


for _family in FAMILIES:
    _register(_family)

"""Mixture-of-Experts ops: top-k gating with permutation metadata, token permutation, grouped GEMM.

Public functional API (each a :class:`fastnn.backends.Op` whose signature and docstring are those of
the reference function in :mod:`fastnn.reference.moe`; the backend is chosen per call):

* ``topk_gating(logits, top_k, ...) -> GatingOutput(weights, expert_ids, tokens_per_expert,
  sorted_slots, slot_positions)``; ``weights`` is differentiable.
* ``permute_tokens(x, sorted_slots, top_k)``: token rows in expert order, [T*k, H].
* ``unpermute_tokens(y, slot_positions, weights)``: the weighted combine back to token order.
* ``grouped_mm(a, b, offsets, trans_b=False)``: per-expert GEMM over contiguous row groups.
* ``moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
  activation)``: the routed experts' whole forward. Each backend's implementation is its fused
  inference kernel (cpu, triton) when no gradient is needed, else the composition of that
  backend's differentiable ops (permute, grouped GEMM, activation, grouped GEMM, combine).
* ``load_balancing_loss``, ``router_z_loss``, ``routing_entropy``: differentiable torch compositions.

Conventions (slots, layouts, dropped slots, NaN, dtypes) are those of :mod:`fastnn.reference.moe`.
This module holds the wrappers only; argument checks are in ``_checks``, every torch.library
registration (fakes, autograd, Triton ops) in ``_library``, the torch._grouped_mm CUDA path in
``_grouped_torch``, and the Triton kernels with their launchers in ``fastnn.kernels.moe`` /
``fastnn.kernels.moe_gemm``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...backends import Args, Op
from ...reference import moe as ref
from ...reference.moe import (  # noqa: F401  (re-exported)
    DROP_POLICIES, GROUP_SCORES, SCORE_FUNCS, GatingOutput, expert_capacity, load_balancing_loss, router_z_loss,
    routing_entropy,
)
from . import _grouped_torch
from ._checks import validate_gating, validate_grouped_mm, validate_mlp, validate_permute, validate_unpermute
from ._library import STATE

__all__ = [
    "topk_gating", "permute_tokens", "unpermute_tokens", "grouped_mm", "moe_mlp", "GatingOutput", "expert_capacity",
    "load_balancing_loss", "router_z_loss", "routing_entropy", "validate_gating",
]

Tensor = torch.Tensor
_TRITON_FIRST = {"cuda": ("triton", "cuda", "reference")}  # Triton is the fast path on CUDA

topk_gating = Op("topk_gating", signature=ref.topk_gating, validate=lambda a: validate_gating(**a),
                 preference=_TRITON_FIRST)
permute_tokens = Op("permute_tokens", signature=ref.permute_tokens, validate=lambda a: validate_permute(**a),
                    preference=_TRITON_FIRST)
unpermute_tokens = Op("unpermute_tokens", signature=ref.unpermute_tokens, validate=lambda a: validate_unpermute(**a),
                      preference=_TRITON_FIRST)
grouped_mm = Op("grouped_mm", signature=ref.grouped_mm, validate=lambda a: validate_grouped_mm(**a),
                preference=_TRITON_FIRST)
moe_mlp = Op("moe_mlp", signature=ref.moe_mlp, validate=lambda a: validate_mlp(**a), preference=_TRITON_FIRST)


def _native(a: Args) -> Optional[str]:
    return None if STATE["native"] else "the compiled library has no MoE ops (rebuild fastnn)"


def _triton(a: Args) -> Optional[str]:
    return None if STATE["triton"] else "this torch has no torch.library.triton_op"


def _binding_capacity(a: Args) -> bool:
    return expert_capacity(a.logits.shape[0], a.logits.shape[1], a.top_k, a.capacity_factor) > 0


# ---------------------------------------------------------------------------------------------
# topk_gating

@topk_gating.register("reference")
def _gating_reference(**a) -> GatingOutput:
    return ref.topk_gating(**a)


def _gating_cuda_supports(a: Args) -> Optional[str]:
    if _binding_capacity(a):
        return "the CUDA gating kernel has no capacity limit (capacity routing runs on the reference path)"
    if a.top_k > 32 or a.num_groups > 32:
        return "the CUDA gating kernel takes top_k <= 32 and num_groups <= 32 (one warp lane each)"
    if a.logits.shape[1] > (512 if a.logits.dtype == torch.float64 else 1024):
        return "the CUDA gating kernel keeps a token's scores in shared memory (E <= 1024; 512 in float64)"
    return _native(a)


@topk_gating.register("cpu", native="topk_gating", supports=_native)
@topk_gating.register("cuda", native="topk_gating", supports=_gating_cuda_supports)
def _gating_native(**a) -> GatingOutput:
    return GatingOutput(*torch.ops.fastnn.topk_gating(**a))


def _gating_triton_supports(a: Args) -> Optional[str]:
    E = a.logits.shape[1]
    if _binding_capacity(a):
        return "the Triton gating kernel has no capacity limit (capacity routing runs on cpu, cuda or reference)"
    if E > 1024:
        return f"the Triton gating kernel holds a token's experts in registers (E <= 1024), got E = {E}"
    if a.num_groups > 1 and E & (E - 1):
        return f"grouped routing in Triton needs a power-of-two number of experts, got E = {E}"
    if a.logits.dtype == torch.float64:
        return "the Triton gating kernel computes in float32; float64 logits use cpu/cuda/reference"
    return _triton(a)


@topk_gating.register("triton", supports=_gating_triton_supports)
def _gating_triton(**a) -> GatingOutput:
    return GatingOutput(*torch.ops.fastnn.triton_topk_gating(**a))


# ---------------------------------------------------------------------------------------------
# permute_tokens / unpermute_tokens

permute_tokens.register("reference")(ref.permute_tokens)


@permute_tokens.register("cpu", native="permute_tokens", supports=_native)
@permute_tokens.register("cuda", native="permute_tokens", supports=_native)
def _permute_native(x, sorted_slots, top_k):
    return torch.ops.fastnn.permute_tokens(x, sorted_slots, top_k)


@permute_tokens.register("triton", supports=_triton)
def _permute_triton(x, sorted_slots, top_k):
    return torch.ops.fastnn.triton_permute_tokens(x, sorted_slots, top_k)


def _float32_accumulation(arg: str):
    def supports(a: Args) -> Optional[str]:
        if a[arg].dtype == torch.float64:
            return "the Triton kernels accumulate in float32; float64 uses cpu/cuda/reference"
        return _triton(a)
    return supports


def _weights_for(y: Tensor, slot_positions: Tensor, weights: Optional[Tensor]) -> Tensor:
    return torch.ones(slot_positions.shape, dtype=y.dtype, device=y.device) if weights is None else weights


unpermute_tokens.register("reference")(ref.unpermute_tokens)


@unpermute_tokens.register("cpu", native="unpermute_tokens", supports=_native)
@unpermute_tokens.register("cuda", native="unpermute_tokens", supports=_native)
def _unpermute_native(y, slot_positions, weights=None):
    return torch.ops.fastnn.unpermute_tokens(y, slot_positions, _weights_for(y, slot_positions, weights))


@unpermute_tokens.register("triton", supports=_float32_accumulation("y"))
def _unpermute_triton(y, slot_positions, weights=None):
    return torch.ops.fastnn.triton_unpermute_tokens(y, slot_positions, _weights_for(y, slot_positions, weights))


# ---------------------------------------------------------------------------------------------
# grouped_mm

@grouped_mm.register("reference")
def _grouped_reference(a, b, offsets, trans_b=False):
    return ref.grouped_mm(a, b, offsets.to(torch.int64), trans_b)


def _grouped_cuda_supports(a: Args) -> Optional[str]:
    return _grouped_torch.supports(a.a, a.b, a.trans_b) or _native(a)


@grouped_mm.register("cpu", native="grouped_mm", supports=_native)
@grouped_mm.register("cuda", native="grouped_mm", supports=_grouped_cuda_supports)
def _grouped_native(a, b, offsets, trans_b=False):
    return torch.ops.fastnn.grouped_mm(a, b, offsets.to(torch.int64), trans_b)


def _grouped_triton_supports(a: Args) -> Optional[str]:
    if a.a.dtype == torch.float64:
        return "the Triton grouped GEMM covers float32, bfloat16 and float16 (tl.dot has no float64 path)"
    if a.a.dtype == torch.bfloat16 and a.a.device.type == "cpu":
        # Seen with Triton 3.8: a bare tl.dot of two bf16 tiles returns garbage when interpreted.
        return "the Triton interpreter computes bfloat16 tl.dot wrongly; bf16 runs on a GPU or another backend"
    return _triton(a)


@grouped_mm.register("triton", supports=_grouped_triton_supports)
def _grouped_triton(a, b, offsets, trans_b=False):
    return torch.ops.fastnn.triton_grouped_mm(a, b, offsets.to(torch.int64), trans_b)


# ---------------------------------------------------------------------------------------------
# moe_mlp: the fused inference kernel of a backend, or the composition of that backend's ops

def _needs_grad(a: Args) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (a.x, a.weights, a.gate_up_proj, a.down_proj))


def _composed_supports(backend: str):
    """A backend can run the composed moe_mlp when it can run each of its ops."""
    def supports(a: Args) -> Optional[str]:
        k = a.slot_positions.shape[1]
        offsets = a.tokens_per_expert
        inter = a.x.new_empty((0, a.down_proj.shape[2]))
        return (permute_tokens.reason(backend, a.x, a.sorted_slots, k)
                or grouped_mm.reason(backend, a.x, a.gate_up_proj, offsets, True)
                or grouped_mm.reason(backend, inter, a.down_proj, offsets, True)
                or unpermute_tokens.reason(backend, a.x, a.slot_positions, a.weights))
    return supports


def _composed(backend: str, x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj, down_proj,
              activation):
    k = slot_positions.shape[1]
    offsets = torch.cumsum(tokens_per_expert, 0)
    xs = permute_tokens.call(backend, x, sorted_slots, k)
    h = grouped_mm.call(backend, xs, gate_up_proj, offsets, trans_b=True)
    y = grouped_mm.call(backend, ref.gated_activation(h, activation), down_proj, offsets, trans_b=True)
    return unpermute_tokens.call(backend, y, slot_positions, weights)


moe_mlp.register("reference")(ref.moe_mlp)


@moe_mlp.register("cpu", native="moe_mlp", supports=_composed_supports("cpu"))
def _mlp_cpu(**a):
    if _needs_grad(Args(a)):
        return _composed("cpu", **a)
    return torch.ops.fastnn.moe_mlp(**a)


@moe_mlp.register("cuda", native="permute_tokens", supports=_composed_supports("cuda"))
def _mlp_cuda(**a):
    return _composed("cuda", **a)


@moe_mlp.register("triton", supports=_composed_supports("triton"))
def _mlp_triton(**a):
    if _needs_grad(Args(a)):
        return _composed("triton", **a)
    return torch.ops.fastnn.triton_moe_mlp(**a)

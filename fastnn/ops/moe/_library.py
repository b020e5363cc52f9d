"""Everything the MoE family registers with torch.library, in one place: the fake kernels and the
autograd of the compiled ``fastnn::*`` ops (the backward is itself an op), the CUDA kernels that
are torch compositions (the gating backward, the grouped GEMM over torch._grouped_mm), and the
Triton ops ``fastnn::triton_*`` (``torch.library.triton_op`` around the launchers of
``fastnn.kernels.moe`` / ``fastnn.kernels.moe_gemm``, imported on first use) with their autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _extension
from ...backends import on_triton
from ...reference import moe as ref
from . import _grouped_torch

Tensor = torch.Tensor
STATE = {"native": False, "triton": False}  # which op families are registered


def _wdtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Autograd (shared by the compiled ops, prefix '', and the Triton ops, prefix 'triton_').

def _inverse(perm: Tensor) -> Tensor:
    """inv[perm[i]] = i for a permutation of [0, n). The ops check the permutation on CPU tensors;
    on CUDA an entry out of range is sent to a spare slot and a row no entry reaches holds -1,
    which the kernels read as "no slot" (no uninitialised memory, no out-of-bounds write)."""
    n = perm.numel()
    flat = perm.reshape(-1)
    dest = torch.where((flat >= 0) & (flat < n), flat, n)
    inv = torch.full((n + 1,), -1, dtype=flat.dtype, device=flat.device)
    inv.scatter_(0, dest, torch.arange(n, dtype=flat.dtype, device=flat.device))
    return inv[:n]


def _gating_setup(ctx, inputs, output):
    ctx.score_func, ctx.renormalize, ctx.scale = inputs[2], inputs[3], inputs[8]
    ctx.save_for_backward(inputs[0], output[1])


def _permute_setup(ctx, inputs, output):
    x, sorted_slots, top_k = inputs
    ctx.top_k, ctx.T = top_k, x.shape[0]
    ctx.save_for_backward(sorted_slots)


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_setup(ctx, inputs, output):
    ctx.trans_b = inputs[3]
    ctx.save_for_backward(*inputs[:3])


def _register_autograd(prefix: str) -> None:
    ns = torch.ops.fastnn
    gating_bw = getattr(ns, f"{prefix}topk_gating_backward")
    unpermute = getattr(ns, f"{prefix}unpermute_tokens")
    unpermute_bw = getattr(ns, f"{prefix}unpermute_tokens_backward")
    gmm_bw = getattr(ns, f"{prefix}grouped_mm_backward")

    def gating_backward(ctx, grad_w, *_):
        logits, expert_ids = ctx.saved_tensors
        if grad_w is None:
            return (None,) * 11
        grad = gating_bw(grad_w.contiguous(), logits, expert_ids, ctx.score_func, ctx.renormalize, ctx.scale)
        return (grad.to(logits.dtype),) + (None,) * 10

    def permute_backward(ctx, grad):
        (sorted_slots,) = ctx.saved_tensors
        # d x[t] = sum over t's slots of d out[row of the slot]: the unweighted combine.
        pos = _inverse(sorted_slots).view(ctx.T, ctx.top_k)
        ones = torch.ones(pos.shape, dtype=grad.dtype, device=grad.device)
        return unpermute(grad.contiguous(), pos, ones), None, None

    def unpermute_backward(ctx, grad):
        y, slot_positions, weights = ctx.saved_tensors
        # d y rows = weight * d out[token] (a weighted permute), d w = <d out[t], y[row]>.
        gy, gw = unpermute_bw(grad.contiguous(), y, slot_positions, weights, _inverse(slot_positions))
        return gy, None, (gw if ctx.needs_input_grad[2] else None)

    def grouped_backward(ctx, grad):
        a, b, offsets = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga, gb = gmm_bw(grad.contiguous(), a, b, offsets, ctx.trans_b, need_a, need_b)
        return (ga if need_a else None), (gb if need_b else None), None, None

    for name, fn, setup in (("topk_gating", gating_backward, _gating_setup),
                            ("permute_tokens", permute_backward, _permute_setup),
                            ("unpermute_tokens", unpermute_backward, _unpermute_setup),
                            ("grouped_mm", grouped_backward, _grouped_setup)):
        torch.library.register_autograd(f"fastnn::{prefix}{name}", fn, setup_context=setup)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: the shapes of every op's outputs, with no data.

def _gating_fake(logits, top_k, score_func="softmax", renormalize=True, selection_bias=None, num_groups=1,
                 topk_groups=1, group_score="max", routed_scaling_factor=1.0, capacity_factor=0.0, drop_policy="drop"):
    T, E = logits.shape
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (logits.new_empty((T, top_k), dtype=_wdtype(logits)), logits.new_empty((T, top_k), **i64),
            logits.new_empty((E,), **i64), logits.new_empty((T * top_k,), **i64), logits.new_empty((T, top_k), **i64))


def _gating_backward_fake(grad_weights, logits, expert_ids, score_func, renormalize, routed_scaling_factor):
    return torch.empty_like(logits, dtype=_wdtype(logits))


def _grouped_backward_fake(grad, a, b, offsets, trans_b, need_a, need_b):
    return (torch.empty_like(a) if need_a else a.new_empty((0,)),
            torch.empty_like(b) if need_b else b.new_empty((0,)))


_FAKES = {
    "topk_gating": _gating_fake, "topk_gating_backward": _gating_backward_fake,
    "permute_tokens": lambda x, sorted_slots, top_k: x.new_empty((sorted_slots.shape[0], x.shape[1])),
    "unpermute_tokens": lambda y, slot_positions, weights: y.new_empty((slot_positions.shape[0], y.shape[1])),
    "unpermute_tokens_backward": lambda grad_out, y, pos, weights, slots: (torch.empty_like(y),
                                                                           torch.empty_like(weights)),
    "grouped_mm": lambda a, b, offsets, trans_b=False: a.new_empty((a.shape[0], b.shape[1] if trans_b else b.shape[2])),
    "grouped_mm_backward": _grouped_backward_fake,
    "moe_mlp": lambda x, *args: torch.empty_like(x),
}


def _gating_backward_cuda(grad_weights, logits, expert_ids, score_func, renormalize, routed_scaling_factor):
    """The gating backward on CUDA: a few elementwise ops and reductions over [T, E], as fast composed
    as a kernel would be. An expert id out of [-1, E) counts as dropped, so that a bad id given to
    the public op cannot index out of bounds (checking it would synchronise)."""
    E = logits.shape[1]
    ids = torch.where((expert_ids >= -1) & (expert_ids < E), expert_ids, -1)
    return ref.topk_gating_backward(grad_weights, logits, ids, score_func, renormalize, routed_scaling_factor)


@_extension.on_load
def _register_native(module) -> None:
    """Fakes, CUDA compositions and autograd of the compiled ops, once the library is loaded."""
    if not hasattr(torch.ops.fastnn, "topk_gating"):
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastnn::{name}", fake)
    if module.built_with_cuda():
        torch.library.impl("fastnn::topk_gating_backward", "CUDA")(_gating_backward_cuda)
        torch.library.impl("fastnn::grouped_mm", "CUDA")(_grouped_torch.grouped_mm)
        torch.library.impl("fastnn::grouped_mm_backward", "CUDA")(_grouped_torch.grouped_mm_backward)
    _register_autograd("")

    def no_backward(ctx, grad):
        raise RuntimeError("fastnn::moe_mlp is the inference path of the experts; with gradients the moe_mlp op "
                           "runs the composed differentiable ops")

    torch.library.register_autograd("fastnn::moe_mlp", no_backward)
    STATE["native"] = True


# ---------------------------------------------------------------------------------------------
# The Triton ops: the launchers, imported on first use (importing fastnn does not import Triton).

def _routing():
    from ...kernels import moe
    return moe


def _gemm():
    from ...kernels import moe_gemm
    return moe_gemm


def _register_triton() -> None:
    if not hasattr(torch.library, "triton_op"):
        return
    from torch.library import triton_op

    @triton_op("fastnn::triton_topk_gating", mutates_args=())
    def triton_topk_gating(logits: Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
                           selection_bias: Optional[Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
                           group_score: str = "max", routed_scaling_factor: float = 1.0,
                           capacity_factor: float = 0.0,
                           drop_policy: str = "drop") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if ref.expert_capacity(logits.shape[0], logits.shape[1], top_k, capacity_factor):
            raise ValueError("fastnn: argument 'triton_topk_gating: capacity_factor': expected no binding capacity "
                             "(the Triton gating kernel has none; capacity routing runs on the cpu, cuda and "
                             f"reference backends), got {capacity_factor}")
        return _routing().topk_gating(logits, top_k, score_func, renormalize, selection_bias, num_groups,
                                      topk_groups, group_score, routed_scaling_factor, capacity_factor, drop_policy)

    @torch.library.custom_op("fastnn::triton_topk_gating_backward", mutates_args=())
    def triton_topk_gating_backward(grad_weights: Tensor, logits: Tensor, expert_ids: Tensor, score_func: str,
                                    renormalize: bool, routed_scaling_factor: float) -> Tensor:
        # The Triton family's gating backward is the composed closed form (see _gating_backward_cuda).
        return _gating_backward_cuda(grad_weights, logits, expert_ids, score_func, renormalize,
                                     routed_scaling_factor).float()

    triton_topk_gating_backward.register_fake(
        lambda grad_weights, logits, *args: torch.empty(logits.shape, dtype=torch.float32, device=logits.device))

    @triton_op("fastnn::triton_permute_tokens", mutates_args=())
    def triton_permute_tokens(x: Tensor, sorted_slots: Tensor, top_k: int) -> Tensor:
        return _routing().permute_tokens(x, sorted_slots, top_k)

    @triton_op("fastnn::triton_unpermute_tokens", mutates_args=())
    def triton_unpermute_tokens(y: Tensor, slot_positions: Tensor, weights: Tensor) -> Tensor:
        return _routing().unpermute_tokens(y, slot_positions, weights)

    @triton_op("fastnn::triton_unpermute_tokens_backward", mutates_args=())
    def triton_unpermute_tokens_backward(grad_out: Tensor, y: Tensor, slot_positions: Tensor, weights: Tensor,
                                         sorted_slots: Tensor) -> tuple[Tensor, Tensor]:
        return _routing().unpermute_tokens_backward(grad_out, y, slot_positions, weights, sorted_slots)

    @triton_op("fastnn::triton_grouped_mm", mutates_args=())
    def triton_grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
        return _gemm().grouped_mm(a, b, offsets, trans_b)

    @triton_op("fastnn::triton_grouped_mm_backward", mutates_args=())
    def triton_grouped_mm_backward(grad: Tensor, a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool,
                                   need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
        return _gemm().grouped_mm_backward(grad, a, b, offsets, trans_b, need_a, need_b)

    @triton_op("fastnn::triton_moe_mlp", mutates_args=())
    def triton_moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor,
                       weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor, activation: str = "silu") -> Tensor:
        return _gemm().moe_mlp(x, sorted_slots, tokens_per_expert, slot_positions, weights, gate_up_proj,
                               down_proj, activation)

    _register_autograd("triton_")
    STATE["triton"] = True


on_triton(_register_triton)

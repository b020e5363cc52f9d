"""The Triton MoE ops, ``fastnn::triton_*``: launchers of the kernels in ``fastnn.kernels.moe`` inside
``torch.library.triton_op`` (through ``wrap_triton``), so that torch.compile traces into them and
their fake kernels come for free. Imported by fastnn/ops/moe.py only when triton is installed;
autograd is registered there, with these backward ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..kernels import moe as K
from ..reference import moe as ref

Tensor = torch.Tensor


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton_op("fastnn::triton_topk_gating", mutates_args=())
def triton_topk_gating(logits: Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
                       selection_bias: Optional[Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
                       group_score: str = "max", routed_scaling_factor: float = 1.0, capacity_factor: float = 0.0,
                       drop_policy: str = "drop") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if capacity_factor > 0:
        raise ValueError("fastnn: argument 'capacity_factor': the Triton gating kernel has no capacity limit; "
                         "capacity routing runs on the cpu, cuda and reference backends")
    logits = logits.contiguous()
    T, E = logits.shape
    wdtype = torch.float32
    weights = torch.empty((T, top_k), dtype=wdtype, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    counts = torch.zeros((E,), dtype=torch.int64, device=logits.device)
    sorted_slots = torch.empty((T * top_k,), dtype=torch.int64, device=logits.device)
    positions = torch.empty((T * top_k,), dtype=torch.int64, device=logits.device)
    E_PAD = _pow2(E)
    if T > 0:
        # Registers hold BLOCK_T x E_PAD scores (and BLOCK_T x k x E_PAD for the weights' gather).
        budget = max(1, 4096 // (E_PAD * _pow2(top_k)))
        block_t = min(64, 1 << (budget.bit_length() - 1))
        bias = selection_bias.contiguous() if selection_bias is not None else logits
        wrap_triton(K._gating_kernel)[(triton.cdiv(T, block_t),)](
            logits, bias, weights, ids, counts, T, E, float(routed_scaling_factor),
            K=top_k, K_PAD=_pow2(top_k), E_PAD=E_PAD, BLOCK_T=block_t, SCORE=K.SCORE_CODES[score_func],
            RENORM=bool(renormalize),
            HAS_BIAS=selection_bias is not None, GROUPS=num_groups, TOPK_GROUPS=topk_groups,
            TOP2_SUM=group_score == "top2_sum")
        wrap_triton(K._layout_kernel)[(E + 1,)](ids, counts, sorted_slots, positions, T * top_k, E,
                                                E_PAD=E_PAD, BLOCK=1024)
    return weights, ids, counts, sorted_slots, positions.view(T, top_k)


@torch.library.custom_op("fastnn::triton_topk_gating_backward", mutates_args=())
def triton_topk_gating_backward(grad_weights: Tensor, logits: Tensor, expert_ids: Tensor, score_func: str,
                                renormalize: bool, routed_scaling_factor: float) -> Tensor:
    # A few elementwise ops and reductions over [T, E]: the composed closed form is as fast as a
    # kernel would be, so the Triton family's gating backward is the reference formula.
    return ref.topk_gating_backward(grad_weights, logits, expert_ids, score_func, renormalize,
                                    routed_scaling_factor).float()


@triton_topk_gating_backward.register_fake
def _(grad_weights, logits, expert_ids, score_func, renormalize, routed_scaling_factor):
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)


def _row_blocks(H: int) -> tuple[int, int]:
    block_h = min(_pow2(H), 256)
    return max(1, 4096 // block_h), block_h


@triton_op("fastnn::triton_permute_tokens", mutates_args=())
def triton_permute_tokens(x: Tensor, sorted_slots: Tensor, top_k: int) -> Tensor:
    x = x.contiguous()
    N, H = sorted_slots.shape[0], x.shape[1]
    out = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N > 0 and H > 0:
        br, bh = _row_blocks(H)
        wrap_triton(K._permute_kernel)[(triton.cdiv(N, br), triton.cdiv(H, bh))](
            x, sorted_slots.contiguous(), out, N, H, top_k, BLOCK_R=br, BLOCK_H=bh)
    return out


@triton_op("fastnn::triton_unpermute_tokens", mutates_args=())
def triton_unpermute_tokens(y: Tensor, slot_positions: Tensor, weights: Tensor) -> Tensor:
    y = y.contiguous()
    T, k = slot_positions.shape
    H = y.shape[1]
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if T > 0 and H > 0:
        br, bh = _row_blocks(H)
        wrap_triton(K._combine_kernel)[(triton.cdiv(T, br), triton.cdiv(H, bh))](
            y, slot_positions.contiguous(), weights.contiguous(), out, T, H, K=k, BLOCK_T=br, BLOCK_H=bh)
    return out


@triton_op("fastnn::triton_unpermute_tokens_backward", mutates_args=())
def triton_unpermute_tokens_backward(grad_out: Tensor, y: Tensor, slot_positions: Tensor, weights: Tensor,
                                     sorted_slots: Tensor) -> tuple[Tensor, Tensor]:
    g = grad_out.contiguous()
    y = y.contiguous()
    T, k = slot_positions.shape
    N, H = y.shape
    gy = torch.empty_like(y)
    gw = torch.empty((T, k), dtype=weights.dtype, device=y.device)
    if N > 0 and H > 0:
        br, bh = _row_blocks(H)
        wrap_triton(K._weighted_rows_kernel)[(triton.cdiv(N, br), triton.cdiv(H, bh))](
            g, sorted_slots.contiguous(), weights.contiguous(), gy, N, H, k, BLOCK_R=br, BLOCK_H=bh)
        wrap_triton(K._row_dot_kernel)[(triton.cdiv(N, 32),)](
            g, y, slot_positions.contiguous(), gw, N, H, k, BLOCK_S=32, BLOCK_H=min(_pow2(H), 128))
    elif N > 0:
        gw.zero_()
    return gy, gw


def _m_bucket(M: int) -> int:
    """Autotuning key for the row count: the power of two at or above it (one tuned choice per
    bucket, cached by triton.autotune)."""
    return _pow2(M)


ACT_CODES = {"silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}


def _launch_grouped(a: Tensor, b: Tensor, offsets: Tensor, out: Tensor, K_: int, N: int,
                    stride_bk: int, stride_bn: int, *, gather: Optional[Tensor] = None, top_k: int = 1,
                    act: int = 0) -> None:
    """Grouped GEMM into ``out`` [M, N]; M = out's rows (with ``gather``, a's rows are gathered)."""
    M = out.shape[0]
    E = b.shape[0]
    if M == 0 or N == 0:
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) + E + 1, triton.cdiv(N, meta["BLOCK_N"]))

    wrap_triton(K._grouped_mm_kernel)[grid](
        a, b, offsets, out, gather if gather is not None else offsets, M, N, K_, E, _m_bucket(M), b.stride(0),
        stride_bk, stride_bn, top_k, G_PAD=_pow2(E + 1), IEEE=a.dtype == torch.float32, GATHER=gather is not None,
        ACT=act)


@triton_op("fastnn::triton_grouped_mm", mutates_args=())
def triton_grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
    a = a.contiguous()
    M, Kd = a.shape
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    # [E, K, N]: (k, n) strides (1, 2); [E, N, K]: (2, 1).
    s_k, s_n = (b.stride(2), b.stride(1)) if trans_b else (b.stride(1), b.stride(2))
    _launch_grouped(a, b, offsets.contiguous(), out, Kd, N, s_k, s_n)
    return out


@triton_op("fastnn::triton_grouped_mm_backward", mutates_args=())
def triton_grouped_mm_backward(grad: Tensor, a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, need_a: bool,
                               need_b: bool) -> tuple[Tensor, Tensor]:
    g = grad.contiguous()
    a = a.contiguous()
    offsets = offsets.contiguous()
    M, Kd = a.shape
    E = b.shape[0]
    N = g.shape[1]
    s_k, s_n = (b.stride(2), b.stride(1)) if trans_b else (b.stride(1), b.stride(2))
    ga = a.new_empty((0,))
    gb = b.new_empty((0,))
    if need_a:  # dA = dY @ B_e^T: the same kernel with B_e's two strides swapped
        ga = torch.empty((M, Kd), dtype=a.dtype, device=a.device)
        _launch_grouped(g, b, offsets, ga, N, Kd, s_n, s_k)
    if need_b:  # dB_e = A_e^T dY_e, written in b's layout
        gb = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        o_k, o_n = (gb.stride(2), gb.stride(1)) if trans_b else (gb.stride(1), gb.stride(2))
        if E > 0 and Kd > 0 and N > 0:
            def grid(meta):
                return (E, triton.cdiv(Kd, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))

            wrap_triton(K._grouped_wgrad_kernel)[grid](
                a, g, offsets, gb, M, N, Kd, E, _m_bucket(M), gb.stride(0), o_k, o_n, IEEE=a.dtype == torch.float32)
        else:
            gb.zero_()
    return ga, gb


@triton_op("fastnn::triton_moe_mlp", mutates_args=())
def triton_moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor,
                   weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor, activation: str = "silu") -> Tensor:
    """The experts' inference forward in three launches: gather + gate/up GEMM + gated activation,
    the down GEMM, and the weighted combine (kept separate: fusing it into the GEMM epilogue needs
    atomics, which would make the summation order, and so the result, nondeterministic)."""
    x = x.contiguous()
    T, H = x.shape
    k = slot_positions.shape[1]
    inter = down_proj.shape[2]
    offsets = torch.cumsum(tokens_per_expert, 0)
    h = torch.empty((T * k, inter), dtype=x.dtype, device=x.device)
    # gate_up_proj [E, 2I, H]: element (k, n) of B_e at n * stride(1) + k * stride(2)
    _launch_grouped(x, gate_up_proj, offsets, h, H, inter, gate_up_proj.stride(2), gate_up_proj.stride(1),
                    gather=sorted_slots.contiguous(), top_k=k, act=ACT_CODES[activation])
    y = torch.empty((T * k, H), dtype=x.dtype, device=x.device)
    _launch_grouped(h, down_proj, offsets, y, inter, H, down_proj.stride(2), down_proj.stride(1))
    return triton_unpermute_tokens(y, slot_positions, weights)

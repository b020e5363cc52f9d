"""Triton grouped GEMM of the MoE ops and its launchers (installed as ``fastnn.kernels.moe_gemm``).

* ``_grouped_mm_kernel``: a grouped GEMM (optionally with the token gather in its prologue and the
  gated activation in its epilogue, for the experts' first projection) whose grid is a static
  upper bound on the number of (expert, row tile) pairs, ceil(M / BLOCK_M) + E + 1; each program
  finds its expert from the device-side offsets, and programs past the last tile exit. The rows
  past the last expert form one more group written with zeros, so the output needs no memset.
  The weight layout ([E, K, N] or [E, N, K]) is carried by strides.
* ``_grouped_wgrad_kernel``: dB_e = A_e^T dY_e.

Offsets are clamped into [0, M] on the device and gathered rows range-checked, so offsets that
are not non-decreasing (which the ops reject on CPU tensors; on a GPU that check would
synchronise) give a wrong answer, never an out-of-bounds access. The launchers run on the
inputs' device and are the bodies of the ``fastnn::triton_*`` ops (fastnn/ops/moe/_library.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .moe import on_device, pow2, unpermute_tokens

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
Tensor = torch.Tensor

# The gated activation's nonlinearity, as constexpr codes (0: none).
ACT_CODES = {"silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
SILU, GELU, GELU_TANH, RELU = (ACT_CODES[n] for n in ("silu", "gelu", "gelu_tanh", "relu"))


def _gemm_configs():
    if INTERPRET:  # the interpreter runs every config: one small one
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                 (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)]
    ]


@triton.jit
def _locate_tile(off_ptr, tile, M, E, BLOCK_M: tl.constexpr, G_PAD: tl.constexpr):
    """Group (expert e < E, or E for the rows past the last expert), first row and row end of row
    tile ``tile`` of the per-group tiling; a group > E for tiles past the last one. Vectorised over
    the groups (G_PAD >= E + 1 lanes), so it costs the same for 8 or 256 experts."""
    g = tl.arange(0, G_PAD)
    ends = tl.minimum(tl.maximum(tl.load(off_ptr + g, mask=g < E, other=M).to(tl.int64), 0), M)
    starts = tl.load(off_ptr + g - 1, mask=(g > 0) & (g <= E), other=0).to(tl.int64)
    starts = tl.minimum(tl.maximum(tl.where(g > E, M, starts), 0), M)
    n_tiles = (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(n_tiles, axis=0)
    group = tl.sum((cum <= tile).to(tl.int32), axis=0)
    this = g == group
    tiles_before = tl.sum(tl.where(this, cum - n_tiles, 0), axis=0)
    g_start = tl.sum(tl.where(this, starts, 0), axis=0) + (tile - tiles_before) * BLOCK_M
    g_end = tl.sum(tl.where(this, ends, 0), axis=0)
    return group, g_start, g_end


@triton.jit
def _activate(x, ACT: tl.constexpr):
    """The gated activation's nonlinearity (ACT_CODES)."""
    if ACT == SILU:
        return x / (1.0 + tl.exp(-x))
    elif ACT == GELU:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == GELU_TANH:
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * y)) - 1.0))  # tanh through exp
    else:
        return tl.maximum(x, 0.0)


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "M_BUCKET", "E", "GATHER", "ACT"])
@triton.jit
def _grouped_mm_kernel(a_ptr, b_ptr, off_ptr, out_ptr, idx_ptr, M, N, K, E, M_BUCKET, A_ROWS,
                       stride_be, stride_bk, stride_bn, TOP_K, G_PAD: tl.constexpr,
                       IEEE: tl.constexpr, GATHER: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r] = a[r] @ B_e, or with GATHER a[idx[r] // TOP_K] (the token gather fused into the
    prologue), and with ACT > 0 act(a @ B_e[:, :N]) * (a @ B_e[:, N:2N]) (the gated activation fused
    into the epilogue: the [gate | up] halves of a Hugging Face gate_up_proj)."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, r0, r_end = _locate_tile(off_ptr, tile, M, E, BLOCK_M, G_PAD)
    if group <= E:
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = rows < r_end
        cm = cols < N
        if GATHER:
            s = tl.load(idx_ptr + rows, mask=rm, other=0)
            src = s // TOP_K
            am = rm & (s >= 0) & (src < A_ROWS)
        else:
            src = rows
            am = rm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:
            b_base = b_ptr + group.to(tl.int64) * stride_be
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < K
                a = tl.load(a_ptr + src[:, None] * K + ks[None, :], mask=am[:, None] & km[None, :], other=0.0)
                b_ptrs = b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn
                bmask = km[:, None] & cm[None, :]
                b = tl.load(b_ptrs, mask=bmask, other=0.0)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
                if ACT > 0:
                    bu = tl.load(b_ptrs + N * stride_bn, mask=bmask, other=0.0)
                    if IEEE:
                        acc_up = tl.dot(a, bu, acc_up, input_precision="ieee")
                    else:
                        acc_up = tl.dot(a, bu, acc_up)
        if ACT > 0:
            # Rounded to the output dtype first, as the unfused path stores h before activating.
            g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            u = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc = _activate(g, ACT) * u
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])


def _wgrad_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_M": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bk, bn, bm, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]
    ]


@triton.autotune(configs=_wgrad_configs(), key=["N", "K", "M_BUCKET", "E"])
@triton.jit
def _grouped_wgrad_kernel(a_ptr, g_ptr, off_ptr, out_ptr, M, N, K, E, M_BUCKET,
                          stride_oe, stride_ok, stride_on,
                          IEEE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """dB_e[k, n] = sum over the rows r of group e of a[r, k] * g[r, n]; empty groups get zeros."""
    e = tl.program_id(0)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.minimum(tl.maximum(tl.where(e > 0, tl.load(off_ptr + tl.maximum(e - 1, 0)), 0).to(tl.int64), 0), M)
    end = tl.minimum(tl.maximum(tl.load(off_ptr + e).to(tl.int64), start), M)
    km = ks < K
    nm = ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        at = tl.load(a_ptr + rows[None, :] * K + ks[:, None], mask=km[:, None] & rm[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * N + ns[None, :], mask=rm[:, None] & nm[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(at, g, acc, input_precision="ieee")
        else:
            acc = tl.dot(at, g, acc)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + ns[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=km[:, None] & nm[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers: the bodies of the fastnn::triton_* ops.

def _m_bucket(M: int) -> int:
    """Autotuning key for the row count: the power of two at or above it (one tuned choice per
    bucket, cached by triton.autotune)."""
    return pow2(M)


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

    with on_device(a):
        wrap_triton(_grouped_mm_kernel)[grid](
            a, b, offsets, out, gather if gather is not None else offsets, M, N, K_, E, _m_bucket(M), a.shape[0],
            b.stride(0), stride_bk, stride_bn, top_k, G_PAD=pow2(E + 1), IEEE=a.dtype == torch.float32,
            GATHER=gather is not None, ACT=act)


def _b_strides(b: Tensor, trans_b: bool) -> tuple[int, int]:
    """(k, n) strides of B_e: [E, K, N] has them at dims (1, 2); [E, N, K] (trans_b) at (2, 1)."""
    return (b.stride(2), b.stride(1)) if trans_b else (b.stride(1), b.stride(2))


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
    a = a.contiguous()
    M, Kd = a.shape
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    s_k, s_n = _b_strides(b, trans_b)
    _launch_grouped(a, b, offsets.contiguous(), out, Kd, N, s_k, s_n)
    return out


def grouped_mm_backward(grad: Tensor, a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, need_a: bool,
                        need_b: bool) -> tuple[Tensor, Tensor]:
    g = grad.contiguous()
    a = a.contiguous()
    offsets = offsets.contiguous()
    M, Kd = a.shape
    E = b.shape[0]
    N = g.shape[1]
    s_k, s_n = _b_strides(b, trans_b)
    ga = a.new_empty((0,))
    gb = b.new_empty((0,))
    if need_a:  # dA = dY @ B_e^T: the same kernel with B_e's two strides swapped
        ga = torch.empty((M, Kd), dtype=a.dtype, device=a.device)
        _launch_grouped(g, b, offsets, ga, N, Kd, s_n, s_k)
    if need_b:  # dB_e = A_e^T dY_e, written in b's layout
        gb = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        o_k, o_n = _b_strides(gb, trans_b)
        if E > 0 and Kd > 0 and N > 0:
            def grid(meta):
                return (E, triton.cdiv(Kd, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))

            with on_device(a):
                wrap_triton(_grouped_wgrad_kernel)[grid](
                    a, g, offsets, gb, M, N, Kd, E, _m_bucket(M), gb.stride(0), o_k, o_n,
                    IEEE=a.dtype == torch.float32)
        else:
            gb.zero_()
    return ga, gb


def moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor,
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
    return unpermute_tokens(y, slot_positions, weights)

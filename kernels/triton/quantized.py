"""Triton weight-only int8 GEMMs of the quantized ops and their launchers (installed as
``fastnn.kernels.quantized``): the GPU path of ``int8_linear`` and ``int8_moe_mlp`` with
``weight_only=True``.

* ``_wo_grouped_kernel``: out[r, n] = (a[r] . w_q[e, n]) * scale[e, n] over the rows r of group e,
  the int8 weights (the nn.Linear layout, one row per output channel) widened to fp32 as they are
  loaded and the per-channel scale applied once in the epilogue. The grouping is that of the MoE
  family's grouped GEMM (``fastnn.kernels.moe_gemm._locate_tile``): a static grid bound on the
  (expert, row tile) pairs, each program finding its expert from the device-side offsets; the rows
  past the last expert are written with zeros. With GATHER the token gather of the permutation is
  fused into the prologue, with ACT the gated activation act(gate) * up into the epilogue (gate
  rows n and up rows I + n of a Hugging Face gate_up_proj). A Linear is the one-group case.

Products accumulate in fp32 with ``input_precision="ieee"`` (no TF32 rounding of the
activations), as the reference computes them. Offsets are clamped into range on the device and
gathered rows range-checked, so bad routing metadata gives a wrong answer, never an
out-of-bounds access (the ops check it on CPU tensors; on a GPU that check would synchronise).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .moe import on_device, pow2, unpermute_tokens
from .moe_gemm import ACT_CODES, _activate, _locate_tile

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
Tensor = torch.Tensor


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), small row tiles first: when decoding, an expert gets a
# few tokens and the kernel reads weights. The interpreter runs every config: one small one.
_TILES = [(16, 16, 16, 1, 1)] if INTERPRET else [(16, 64, 128, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                                                 (64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 4)]
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
           for m, n, k, w, st in _TILES]


@triton.jit
def _tile(off_ptr, idx_ptr, M, E, A_ROWS, TOP_K, G_PAD: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's row tile: its group, rows, row mask, and the rows of ``a`` it reads (with
    GATHER, slot s reads token s // TOP_K; a slot out of range reads nothing)."""
    group, r0, r_end = _locate_tile(off_ptr, tl.program_id(0), M, E, BLOCK_M, G_PAD)
    rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
    live = rows < r_end
    src = rows
    read = live
    if GATHER:
        slot = tl.load(idx_ptr + rows, mask=live, other=0)
        src = slot // TOP_K
        read = live & (slot >= 0) & (src < A_ROWS)
    return group, rows, live, src, read


@triton.autotune(configs=CONFIGS, key=["N", "K", "M_BUCKET", "E", "GATHER", "ACT"])
@triton.jit
def _wo_grouped_kernel(a_ptr, w_ptr, s_ptr, off_ptr, out_ptr, idx_ptr, M, N, K, E, M_BUCKET, A_ROWS, TOP_K,
                       stride_we, stride_se, G_PAD: tl.constexpr, GATHER: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    group, rows, rm, src, am = _tile(off_ptr, idx_ptr, M, E, A_ROWS, TOP_K, G_PAD, GATHER, BLOCK_M)
    if group <= E:
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:  # the group past the last expert keeps its zeros
            w_base = w_ptr + group.to(tl.int64) * stride_we
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < K
                a = tl.load(a_ptr + src[:, None] * K + ks[None, :], mask=am[:, None] & km[None, :], other=0.0)
                w_ptrs = w_base + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N] of the [N, K] rows
                wmask = km[:, None] & cm[None, :]
                w = tl.load(w_ptrs, mask=wmask, other=0).to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision="ieee")
                if ACT > 0:
                    wu = tl.load(w_ptrs + N * K, mask=wmask, other=0).to(tl.float32)
                    acc_up = tl.dot(a, wu, acc_up, input_precision="ieee")
            s_base = s_ptr + group.to(tl.int64) * stride_se
            acc = acc * tl.load(s_base + cols, mask=cm, other=0.0)[None, :]
            if ACT > 0:
                up = acc_up * tl.load(s_base + N + cols, mask=cm, other=0.0)[None, :]
                acc = _activate(acc, ACT) * up
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


def _grouped(a: Tensor, w_q: Tensor, scale: Tensor, offsets: Tensor, M: int, N: int, *,
             gather: Optional[Tensor] = None, top_k: int = 1, act: int = 0) -> Tensor:
    """[M, N] fp32: rows of ``a`` (gathered through ``gather`` // top_k when given) times the int8
    weights ``w_q`` [E, N (2N with act), K] of their group, scaled by ``scale`` [E, N (2N)]."""
    out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    E, K = w_q.shape[0], w_q.shape[2]
    if M == 0 or N == 0:
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) + E + 1, triton.cdiv(N, meta["BLOCK_N"]))

    with on_device(a):
        wrap_triton(_wo_grouped_kernel)[grid](
            a, w_q, scale, offsets, out, gather if gather is not None else offsets, M, N, K, E, pow2(M), a.shape[0],
            top_k, w_q.stride(0), scale.stride(0), G_PAD=pow2(E + 1), GATHER=gather is not None, ACT=act)
    return out


def int8_linear(input: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Weight-only ``int8_linear``: ``input [..., K]`` fp32, ``w_q [N, K]`` int8, ``w_scale [N]``."""
    lead, K, N = input.shape[:-1], input.shape[-1], w_q.shape[0]
    M = lead.numel()
    x = input.reshape(M, K).contiguous()
    offsets = torch.full((1,), M, dtype=torch.int64, device=x.device)
    out = _grouped(x, w_q.contiguous().unsqueeze(0), w_scale.contiguous().unsqueeze(0), offsets, M, N)
    if bias is not None:
        out += bias
    return out.reshape(*lead, N)


def int8_moe_mlp(x: Tensor, sorted_slots: Tensor, tokens_per_expert: Tensor, slot_positions: Tensor,
                 weights: Tensor, gate_up_q: Tensor, gate_up_scale: Tensor, down_q: Tensor, down_scale: Tensor,
                 activation: str) -> Tensor:
    """Weight-only ``int8_moe_mlp``: the gathered gate/up product with the gated activation fused,
    the down product, then the MoE family's weighted combine."""
    T, H = x.shape
    k = slot_positions.shape[1]
    offsets = torch.cumsum(tokens_per_expert, 0)
    h = _grouped(x.contiguous(), gate_up_q.contiguous(), gate_up_scale.contiguous(), offsets, T * k,
                 gate_up_q.shape[1] // 2, gather=sorted_slots.contiguous(), top_k=k, act=ACT_CODES[activation])
    y = _grouped(h, down_q.contiguous(), down_scale.contiguous(), offsets, T * k, H)
    return unpermute_tokens(y, slot_positions, weights)

"""Triton kernels of the MoE ops (installed as ``fastnn.kernels.moe``).

* Gating in two launches, with no host synchronisation: ``_gating_kernel`` scores, selects and
  weighs BLOCK_T tokens per program (iterated argmax, which breaks ties toward the lower expert
  index as the reference does) and histograms the choices with atomics; ``_layout_kernel`` then
  gives every slot its row in the expert-sorted order, one program per expert (plus one for
  dropped slots) scanning the slots in order, so rows within an expert keep slot order.
* ``_permute_kernel`` / ``_combine_kernel``: row gather, and the weighted combine back to token
  order (float32 accumulation); ``_weighted_rows_kernel`` / ``_row_dot_kernel`` for its backward.
* ``_grouped_mm_kernel``: a grouped GEMM (optionally with the token gather in its prologue and the
  gated activation in its epilogue, for the experts' first projection) whose grid is a static
  upper bound on the number of (expert, row tile) pairs, ceil(M / BLOCK_M) + E + 1; each program
  finds its expert from the device-side offsets, and programs past the last tile exit. The rows
  past the last expert form one more group written with zeros, so the output needs no memset.
  The weight layout ([E, K, N] or [E, N, K]) is carried by strides. ``_grouped_wgrad_kernel``: dB_e = A_e^T dY_e.

These are plain @triton.jit kernels; ``fastnn/ops/_moe_triton.py`` launches them inside
``torch.library.triton_op`` (through ``wrap_triton``) so that torch.compile can trace them.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Score functions and group scores, as constexpr codes.
SOFTMAX, TOPK_SOFTMAX, SIGMOID = 0, 1, 2
SCORE_CODES = {"softmax": SOFTMAX, "topk_softmax": TOPK_SOFTMAX, "sigmoid": SIGMOID}


@triton.jit
def _gating_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, counts_ptr, T, E, scale,
                   K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   SCORE: tl.constexpr,
                   RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                   TOP2_SUM: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    rmask = rows < T
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
    x = tl.where(rmask[:, None], x, 0.0)  # rows past T: finite values, so no -inf - -inf below
    x = tl.where(cmask[None, :], x, float("-inf"))
    ninf = float("-inf")
    if SCORE == 0:
        mx = tl.max(x, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(x - mx[:, None]), 0.0)
        scores = ex / tl.sum(ex, axis=1)[:, None]
    elif SCORE == 2:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        scores = x
    sel = scores
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sel = tl.where(sel != sel, ninf, sel)  # NaN ranks last
    sel = tl.where(cmask[None, :], sel, ninf)
    # Any NaN in a row makes its softmax weights NaN (as torch.softmax); remembered per row.
    row_nan = tl.max(tl.where((x != x) & m2, 1, 0), axis=1) > 0
    if GROUPS > 1:
        GSZ: tl.constexpr = E_PAD // GROUPS
        g3 = tl.reshape(sel, (BLOCK_T, GROUPS, GSZ))
        best = tl.max(g3, axis=2)
        if TOP2_SUM:
            if GSZ == 1:
                gscore = best
            else:
                gidx = tl.arange(0, GSZ)[None, None, :]
                first = tl.argmax(g3, axis=2)
                second = tl.max(tl.where(gidx == first[:, :, None], ninf, g3), axis=2)
                gscore = best + second
        else:
            gscore = best
        gscore = tl.where(gscore != gscore, ninf, gscore)
        gcols = tl.arange(0, GROUPS)[None, :]
        keep = tl.zeros((BLOCK_T, GROUPS), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            g = tl.argmax(gscore, axis=1)
            keep = tl.where(gcols == g[:, None], 1, keep)
            gscore = tl.where(gcols == g[:, None], ninf, gscore)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, :, None], (BLOCK_T, GROUPS, GSZ)), (BLOCK_T, E_PAD))
        elig = keep_e > 0
    else:
        elig = cmask[None, :] & (rows[:, None] >= 0)
    # Top-k by iterated max; among equal scores the lowest index wins, and only eligible experts
    # compete (so an eligible expert with a -inf/NaN score still beats an ineligible one).
    ksel = tl.arange(0, K_PAD)[None, :]  # tl.arange needs a power of two: columns >= K are padding
    ids = tl.full((BLOCK_T, K_PAD), E_PAD, dtype=tl.int32)  # padding matches no expert
    picked = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for j in tl.static_range(K):
        cand = tl.where((picked == 0) & elig, sel, ninf)
        best = tl.max(cand, axis=1)
        # lowest eligible, unpicked index holding the best value (also when best is -inf)
        hit = (picked == 0) & elig & (cand == best[:, None])
        e = tl.min(tl.where(hit, cols[None, :], E_PAD), axis=1)
        ids = tl.where(ksel == j, e[:, None], ids)
        picked = tl.where(cols[None, :] == e[:, None], 1, picked)
    # Weights of the chosen experts.
    onehot = cols[None, None, :] == ids[:, :, None]  # [BLOCK_T, K, E_PAD]
    if SCORE == 1:
        chosen = tl.sum(tl.where(onehot, x[:, None, :], 0.0), axis=2)
        chosen = tl.where(ksel < K, chosen, float("-inf"))
        cm = tl.max(chosen, axis=1)
        ce = tl.exp(chosen - cm[:, None])
        w = ce / tl.sum(ce, axis=1)[:, None]
    else:
        w = tl.sum(tl.where(onehot, scores[:, None, :], 0.0), axis=2)
        if RENORM:
            denom = tl.sum(w, axis=1)
            if SCORE == 2:
                denom = denom + 1e-20
            denom = tl.where(denom == 0, 1.0, denom)
            w = w / denom[:, None]
    nan_w = row_nan & (SCORE != 2)
    w = tl.where(nan_w[:, None], float("nan"), w)
    w = w * scale
    out_off = rows[:, None] * K + ksel
    omask = rmask[:, None] & (ksel < K)
    tl.store(weights_ptr + out_off, w.to(weights_ptr.dtype.element_ty), mask=omask)
    tl.store(ids_ptr + out_off, ids.to(tl.int64), mask=omask)
    tl.atomic_add(counts_ptr + ids, tl.full((BLOCK_T, K_PAD), 1, tl.int64), mask=omask)


@triton.jit
def _layout_kernel(ids_ptr, counts_ptr, sorted_ptr, pos_ptr, N, E, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Program e (0..E) places the slots of expert e (e == E: dropped slots, id -1) in slot order."""
    e = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + cols, mask=cols < E, other=0)
    start = tl.sum(tl.where(cols < e, counts, 0), axis=0).to(tl.int64)
    target = tl.where(e == E, -1, e).to(tl.int64)
    offs0 = tl.arange(0, BLOCK)
    for base in range(0, N, BLOCK):
        offs = base + offs0.to(tl.int64)
        m = offs < N
        ids = tl.load(ids_ptr + offs, mask=m, other=-2)
        hit = (ids == target) & m
        h = hit.to(tl.int64)
        p = start + tl.cumsum(h, axis=0) - h
        tl.store(sorted_ptr + p, offs, mask=hit)
        tl.store(pos_ptr + offs, p, mask=hit)
        start += tl.sum(h, axis=0)


@triton.jit
def _permute_kernel(x_ptr, slots_ptr, out_ptr, N, H, TOP_K, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = rows < N
    m = rm[:, None] & (cols < H)[None, :]
    tok = tl.load(slots_ptr + rows, mask=rm, other=0) // TOP_K
    v = tl.load(x_ptr + tok[:, None] * H + cols[None, :], mask=m)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], v, mask=m)


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, T, H, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = rows < T
    m = rm[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + rows * K + j, mask=rm, other=0)
        w = tl.load(w_ptr + rows * K + j, mask=rm, other=0.0).to(tl.float32)
        v = tl.load(y_ptr + p[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += w[:, None] * v
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _weighted_rows_kernel(g_ptr, slots_ptr, w_ptr, out_ptr, N, H, TOP_K, BLOCK_R: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    """out[p] = w[slot p] * g[token of slot p]: the backward of the combine with respect to y."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = rows < N
    m = rm[:, None] & (cols < H)[None, :]
    s = tl.load(slots_ptr + rows, mask=rm, other=0)
    w = tl.load(w_ptr + s, mask=rm, other=0.0).to(tl.float32)
    v = tl.load(g_ptr + (s // TOP_K)[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], (w[:, None] * v).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _row_dot_kernel(g_ptr, y_ptr, pos_ptr, out_ptr, S, H, TOP_K, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[s] = <g[s // k], y[pos[s]]>: the backward of the combine with respect to the weights."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = slots < S
    p = tl.load(pos_ptr + slots, mask=sm, other=0)
    t = slots // TOP_K
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = sm[:, None] & (cols < H)[None, :]
        a = tl.load(g_ptr + t[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + p[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + slots, acc.to(out_ptr.dtype.element_ty), mask=sm)


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
    ends = tl.load(off_ptr + g, mask=g < E, other=M).to(tl.int64)
    starts = tl.load(off_ptr + g - 1, mask=(g > 0) & (g <= E), other=0).to(tl.int64)
    starts = tl.where(g > E, M, starts)
    n_tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(n_tiles, axis=0)
    group = tl.sum((cum <= tile).to(tl.int32), axis=0)
    this = g == group
    tiles_before = tl.sum(tl.where(this, cum - n_tiles, 0), axis=0)
    g_start = tl.sum(tl.where(this, starts, 0), axis=0) + (tile - tiles_before) * BLOCK_M
    g_end = tl.sum(tl.where(this, ends, 0), axis=0)
    return group, g_start, g_end


@triton.jit
def _activate(x, ACT: tl.constexpr):
    """The gated activation's nonlinearity: 1 silu, 2 gelu (erf), 3 gelu (tanh), 4 relu."""
    if ACT == 1:
        return x / (1.0 + tl.exp(-x))
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * y)) - 1.0))  # tanh through exp
    else:
        return tl.maximum(x, 0.0)


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "M_BUCKET", "E", "GATHER", "ACT"])
@triton.jit
def _grouped_mm_kernel(a_ptr, b_ptr, off_ptr, out_ptr, idx_ptr, M, N, K, E, M_BUCKET,
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
            src = tl.load(idx_ptr + rows, mask=rm, other=0) // TOP_K
        else:
            src = rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:
            b_base = b_ptr + group.to(tl.int64) * stride_be
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < K
                a = tl.load(a_ptr + src[:, None] * K + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
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
    start = tl.where(e > 0, tl.load(off_ptr + tl.maximum(e - 1, 0)), 0).to(tl.int64)
    end = tl.load(off_ptr + e).to(tl.int64)
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

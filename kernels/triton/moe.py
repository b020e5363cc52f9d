"""Triton kernels of the MoE routing ops and their launchers (installed as ``fastnn.kernels.moe``).

* Gating in three launches, with no host synchronisation: ``_gating_kernel`` scores, selects and
  weighs BLOCK_T tokens per program (iterated argmax, which breaks ties toward the lower expert
  index as the reference does; a NaN score ranks as -inf) and histograms the choices with atomics.
  The layout is a counting sort of the slots by expert: ``_tile_histogram_kernel`` counts each
  tile's slots per expert, ``_tile_offsets_kernel`` turns the counts into every (tile, expert)'s
  first row (a prefix sum over experts, then over tiles), and ``_scatter_kernel`` writes each slot
  to its row (first row + its rank among the tile's slots of that expert). Rows within an expert
  keep slot order, as the reference's stable sort. O(T*k*E / BLOCK_S) work, not O(T*k*E).
* ``_permute_kernel`` / ``_combine_kernel``: row gather, and the weighted combine back to token
  order (float32 accumulation); ``_weighted_rows_kernel`` / ``_row_dot_kernel`` for its backward.

Every index a kernel reads from a tensor (slots, rows) is range-checked on the device: an index
out of range reads nothing and contributes zeros, so bad input can give a wrong answer on a GPU
(the ops check index values on CPU tensors, where reading them costs nothing) but never an
out-of-bounds access. The launchers run on the inputs' device (``torch.cuda.device``) and are
called inside ``torch.library.triton_op`` (fastnn/ops/moe/_library.py), so torch.compile traces
into them through ``wrap_triton``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
Tensor = torch.Tensor

# Score functions, as constexpr codes.
SOFTMAX, TOPK_SOFTMAX, SIGMOID = 0, 1, 2
SCORE_CODES = {"softmax": SOFTMAX, "topk_softmax": TOPK_SOFTMAX, "sigmoid": SIGMOID}
BLOCK_S = 128  # slots per tile of the layout's counting sort


def on_device(t: Tensor):
    """Launches inside run on ``t``'s GPU, whatever the current device (a no-op for CPU tensors,
    which the Triton interpreter runs)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _pick_lowest_best(vals, avail, idx, NONE: tl.constexpr):
    """Per row, the lowest index among the available entries holding the row's best available
    value (-inf included): a distinct pick every call while any entry is available."""
    cand = tl.where(avail, vals, float("-inf"))
    best = tl.max(cand, axis=1)
    return tl.min(tl.where(avail & (cand == best[:, None]), idx, NONE), axis=1)


@triton.jit
def _gating_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, counts_ptr, T, E, scale,
                   K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   SCORE: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr,
                   TOPK_GROUPS: tl.constexpr, TOP2_SUM: tl.constexpr):
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
    if SCORE == SOFTMAX:
        mx = tl.max(x, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(x - mx[:, None]), 0.0)
        scores = ex / tl.sum(ex, axis=1)[:, None]
    elif SCORE == SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        scores = x
    sel = scores
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sel = tl.where(sel != sel, ninf, sel)  # NaN ranks as -inf
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
        # A taken mask makes every pick a distinct group, also when the groups' scores are all
        # -inf (a row of NaN or -inf logits): then the lowest-index groups, as the reference.
        for _ in tl.static_range(TOPK_GROUPS):
            g = _pick_lowest_best(gscore, keep == 0, gcols, GROUPS)
            keep = tl.where(gcols == g[:, None], 1, keep)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, :, None], (BLOCK_T, GROUPS, GSZ)), (BLOCK_T, E_PAD))
        elig = (keep_e > 0) & cmask[None, :]
    else:
        elig = cmask[None, :] & (rows[:, None] >= 0)
    # Top-k by iterated max; among equal scores the lowest index wins, and only eligible experts
    # compete (so an eligible expert with a -inf/NaN score still beats an ineligible one).
    ksel = tl.arange(0, K_PAD)[None, :]  # tl.arange needs a power of two: columns >= K are padding
    ids = tl.full((BLOCK_T, K_PAD), E_PAD, dtype=tl.int32)  # padding matches no expert
    picked = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for j in tl.static_range(K):
        e = _pick_lowest_best(sel, (picked == 0) & elig, cols[None, :], E_PAD)
        ids = tl.where(ksel == j, e[:, None], ids)
        picked = tl.where(cols[None, :] == e[:, None], 1, picked)
    # Weights of the chosen experts.
    onehot = cols[None, None, :] == ids[:, :, None]  # [BLOCK_T, K, E_PAD]
    if SCORE == TOPK_SOFTMAX:
        chosen = tl.sum(tl.where(onehot, x[:, None, :], 0.0), axis=2)
        chosen = tl.where(ksel < K, chosen, float("-inf"))
        cm = tl.max(chosen, axis=1)
        ce = tl.exp(chosen - cm[:, None])
        w = ce / tl.sum(ce, axis=1)[:, None]
    else:
        w = tl.sum(tl.where(onehot, scores[:, None, :], 0.0), axis=2)
        if RENORM:
            denom = tl.sum(w, axis=1)
            if SCORE == SIGMOID:
                denom = denom + 1e-20
            denom = tl.where(denom == 0, 1.0, denom)
            w = w / denom[:, None]
    nan_w = row_nan & (SCORE != SIGMOID)
    w = tl.where(nan_w[:, None], float("nan"), w)
    w = w * scale
    out_off = rows[:, None] * K + ksel
    omask = rmask[:, None] & (ksel < K) & (ids < E)
    tl.store(weights_ptr + out_off, w.to(weights_ptr.dtype.element_ty), mask=omask)
    tl.store(ids_ptr + out_off, ids.to(tl.int64), mask=omask)
    tl.atomic_add(counts_ptr + ids, tl.full((BLOCK_T, K_PAD), 1, tl.int64), mask=omask)


@triton.jit
def _bucket(ids_ptr, offs, m, E):
    """Bucket of each slot for the counting sort: its expert, E for a dropped (or invalid) id."""
    ids = tl.load(ids_ptr + offs, mask=m, other=-1)
    return tl.where((ids >= 0) & (ids < E), ids, E)


@triton.jit
def _tile_histogram_kernel(ids_ptr, hist_ptr, N, E, E1: tl.constexpr, BLOCK: tl.constexpr):
    """hist[tile, b] = slots of tile ``tile`` in bucket b (E + 1 buckets, the last for dropped)."""
    tile = tl.program_id(0)
    offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    b = _bucket(ids_ptr, offs, m, E)
    tl.atomic_add(hist_ptr + tile.to(tl.int64) * E1 + b, tl.full((BLOCK,), 1, tl.int64), mask=m)


@triton.jit
def _tile_offsets_kernel(hist_ptr, N_TILES, E1: tl.constexpr, E1_PAD: tl.constexpr, TILES: tl.constexpr):
    """In place: hist[tile, b] becomes the first row of bucket b's slots of that tile, i.e. the
    slots in lower buckets plus those of bucket b in earlier tiles. One program: a prefix sum over
    the buckets of the column totals, then running sums down the tiles, TILES at a time."""
    b = tl.arange(0, E1_PAD)
    bm = b < E1
    tr = tl.arange(0, TILES)
    total = tl.zeros((E1_PAD,), dtype=tl.int64)
    for t0 in range(0, N_TILES, TILES):
        tm = (t0 + tr) < N_TILES
        h = tl.load(hist_ptr + (t0 + tr)[:, None].to(tl.int64) * E1 + b[None, :], mask=tm[:, None] & bm[None, :],
                    other=0)
        total += tl.sum(h, axis=0)
    start = tl.cumsum(total, axis=0) - total
    run = start
    for t0 in range(0, N_TILES, TILES):
        tm = (t0 + tr) < N_TILES
        ptrs = hist_ptr + (t0 + tr)[:, None].to(tl.int64) * E1 + b[None, :]
        h = tl.load(ptrs, mask=tm[:, None] & bm[None, :], other=0)
        tl.store(ptrs, run[None, :] + tl.cumsum(h, axis=0) - h, mask=tm[:, None] & bm[None, :])
        run += tl.sum(h, axis=0)


@triton.jit
def _scatter_kernel(ids_ptr, first_ptr, sorted_ptr, pos_ptr, N, E, E1: tl.constexpr, BLOCK: tl.constexpr):
    """Each slot's row: its (tile, bucket)'s first row + the number of earlier slots of the tile in
    the same bucket (a BLOCK x BLOCK comparison, so the order within a bucket is slot order)."""
    tile = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    offs = tile.to(tl.int64) * BLOCK + i
    m = offs < N
    b = _bucket(ids_ptr, offs, m, E)
    same_before = (b[None, :] == b[:, None]) & (i[None, :] < i[:, None]) & m[None, :]
    rank = tl.sum(same_before.to(tl.int64), axis=1)
    row = tl.load(first_ptr + tile.to(tl.int64) * E1 + b, mask=m, other=0) + rank
    tl.store(sorted_ptr + row, offs, mask=m)
    tl.store(pos_ptr + offs, row, mask=m)


@triton.jit
def _permute_kernel(x_ptr, slots_ptr, out_ptr, N, T, H, TOP_K, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = rows < N
    cm = (cols < H)[None, :]
    s = tl.load(slots_ptr + rows, mask=rm, other=0)
    tok = s // TOP_K
    ok = rm & (s >= 0) & (tok < T)
    v = tl.load(x_ptr + tok[:, None] * H + cols[None, :], mask=ok[:, None] & cm, other=0.0)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], v, mask=rm[:, None] & cm)


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, T, N, H, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = rows < T
    cm = (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + rows * K + j, mask=rm, other=0)
        ok = rm & (p >= 0) & (p < N)
        w = tl.load(w_ptr + rows * K + j, mask=rm, other=0.0).to(tl.float32)
        v = tl.load(y_ptr + p[:, None] * H + cols[None, :], mask=ok[:, None] & cm, other=0.0).to(tl.float32)
        acc += w[:, None] * v
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & cm)


@triton.jit
def _weighted_rows_kernel(g_ptr, slots_ptr, w_ptr, out_ptr, N, H, TOP_K, BLOCK_R: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    """out[p] = w[slot p] * g[token of slot p]: the backward of the combine with respect to y."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = rows < N
    cm = (cols < H)[None, :]
    s = tl.load(slots_ptr + rows, mask=rm, other=0)
    ok = rm & (s >= 0) & (s < N)
    w = tl.load(w_ptr + s, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(g_ptr + (s // TOP_K)[:, None] * H + cols[None, :], mask=ok[:, None] & cm, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], (w[:, None] * v).to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & cm)


@triton.jit
def _row_dot_kernel(g_ptr, y_ptr, pos_ptr, out_ptr, S, H, TOP_K, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[s] = <g[s // k], y[pos[s]]>: the backward of the combine with respect to the weights."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = slots < S
    p = tl.load(pos_ptr + slots, mask=sm, other=0)
    ok = sm & (p >= 0) & (p < S)
    t = slots // TOP_K
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cm = (cols < H)[None, :]
        a = tl.load(g_ptr + t[:, None] * H + cols[None, :], mask=sm[:, None] & cm, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + p[:, None] * H + cols[None, :], mask=ok[:, None] & cm, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + slots, acc.to(out_ptr.dtype.element_ty), mask=sm)


# ---------------------------------------------------------------------------------------------
# Launchers: the bodies of the fastnn::triton_* ops.

def _layout(ids: Tensor, E: int, sorted_slots: Tensor, positions: Tensor) -> None:
    N = ids.numel()
    n_tiles = triton.cdiv(N, BLOCK_S)
    hist = torch.zeros((n_tiles, E + 1), dtype=torch.int64, device=ids.device)
    e1_pad = pow2(E + 1)
    with on_device(ids):
        wrap_triton(_tile_histogram_kernel)[(n_tiles,)](ids, hist, N, E, E1=E + 1, BLOCK=BLOCK_S)
        wrap_triton(_tile_offsets_kernel)[(1,)](hist, n_tiles, E1=E + 1, E1_PAD=e1_pad,
                                                TILES=max(1, min(64, 4096 // e1_pad)))
        wrap_triton(_scatter_kernel)[(n_tiles,)](ids, hist, sorted_slots, positions, N, E, E1=E + 1,
                                                 BLOCK=BLOCK_S)


def topk_gating(logits: Tensor, top_k: int, score_func: str = "softmax", renormalize: bool = True,
                selection_bias: Optional[Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
                group_score: str = "max", routed_scaling_factor: float = 1.0, capacity_factor: float = 0.0,
                drop_policy: str = "drop") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """No capacity limit here (the op's ``supports`` sends a binding capacity elsewhere)."""
    logits = logits.contiguous()
    T, E = logits.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    counts = torch.zeros((E,), dtype=torch.int64, device=logits.device)
    sorted_slots = torch.empty((T * top_k,), dtype=torch.int64, device=logits.device)
    positions = torch.empty((T * top_k,), dtype=torch.int64, device=logits.device)
    E_PAD = pow2(E)
    if T > 0:
        # Registers hold BLOCK_T x E_PAD scores (and BLOCK_T x k x E_PAD for the weights' gather).
        budget = max(1, 4096 // (E_PAD * pow2(top_k)))
        block_t = min(64, 1 << (budget.bit_length() - 1))
        bias = selection_bias.contiguous() if selection_bias is not None else logits
        with on_device(logits):
            wrap_triton(_gating_kernel)[(triton.cdiv(T, block_t),)](
                logits, bias, weights, ids, counts, T, E, float(routed_scaling_factor),
                K=top_k, K_PAD=pow2(top_k), E_PAD=E_PAD, BLOCK_T=block_t, SCORE=SCORE_CODES[score_func],
                RENORM=bool(renormalize), HAS_BIAS=selection_bias is not None, GROUPS=num_groups,
                TOPK_GROUPS=topk_groups, TOP2_SUM=group_score == "top2_sum")
        _layout(ids, E, sorted_slots, positions)
    return weights, ids, counts, sorted_slots, positions.view(T, top_k)


def row_blocks(H: int) -> tuple[int, int]:
    block_h = min(pow2(H), 256)
    return max(1, 4096 // block_h), block_h


def permute_tokens(x: Tensor, sorted_slots: Tensor, top_k: int) -> Tensor:
    x = x.contiguous()
    N, (T, H) = sorted_slots.shape[0], x.shape
    out = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N > 0 and H > 0:
        br, bh = row_blocks(H)
        with on_device(x):
            wrap_triton(_permute_kernel)[(triton.cdiv(N, br), triton.cdiv(H, bh))](
                x, sorted_slots.contiguous(), out, N, T, H, top_k, BLOCK_R=br, BLOCK_H=bh)
    return out


def unpermute_tokens(y: Tensor, slot_positions: Tensor, weights: Tensor) -> Tensor:
    y = y.contiguous()
    T, k = slot_positions.shape
    N, H = y.shape
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if T > 0 and H > 0:
        br, bh = row_blocks(H)
        with on_device(y):
            wrap_triton(_combine_kernel)[(triton.cdiv(T, br), triton.cdiv(H, bh))](
                y, slot_positions.contiguous(), weights.contiguous(), out, T, N, H, K=k, BLOCK_T=br, BLOCK_H=bh)
    return out


def unpermute_tokens_backward(grad_out: Tensor, y: Tensor, slot_positions: Tensor, weights: Tensor,
                              sorted_slots: Tensor) -> tuple[Tensor, Tensor]:
    g = grad_out.contiguous()
    y = y.contiguous()
    T, k = slot_positions.shape
    N, H = y.shape
    gy = torch.empty_like(y)
    gw = torch.zeros((T, k), dtype=weights.dtype, device=y.device)
    if N > 0 and H > 0:
        br, bh = row_blocks(H)
        with on_device(y):
            wrap_triton(_weighted_rows_kernel)[(triton.cdiv(N, br), triton.cdiv(H, bh))](
                g, sorted_slots.contiguous(), weights.contiguous(), gy, N, H, k, BLOCK_R=br, BLOCK_H=bh)
            wrap_triton(_row_dot_kernel)[(triton.cdiv(N, 32),)](
                g, y, slot_positions.contiguous(), gw, N, H, k, BLOCK_S=32, BLOCK_H=min(pow2(H), 128))
    return gy, gw

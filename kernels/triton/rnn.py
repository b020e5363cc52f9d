"""Triton fused LSTM/GRU cells: one time step, both matrix products and all the gate arithmetic in
one kernel, and the pointwise part of the backward.

Forward: a program owns a tile of BLOCK_B batch rows x BLOCK_H hidden units and keeps one fp32
accumulator per gate (LSTM i, f, g, o; GRU r, z and the two halves of n, which torch keeps apart:
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``). It runs over the input features, then the hidden
features, with ``tl.dot`` on tiles of the weights read in place (torch.nn's [G, K] layout, no
transposed copy), and ends with the gate math, writing h', c' and the workspace the backward reads
(LSTM: activated gates and c'; GRU: r, z, n, W_hn h + b_hn) - the layout of fastnn::lstm_cell.

Backward: one pointwise kernel turns the output gradients into the pre-activation gradients (and
the previous cell state's); the GEMMs that follow are torch matmuls in the launchers below.
Accumulation is fp32 for bf16/fp16 inputs, and fp32 products use IEEE precision (no TF32), so
results match the reference at fp32 tolerance.

The launchers (``lstm_cell_forward`` etc.) take the arguments of ``fastnn::lstm_cell`` (already
validated by fastnn/ops/rnn.py) in any layout: the kernels read row-major buffers, so every
operand is made contiguous and every output is allocated contiguous (an ``empty_like`` of a
transposed ``hx`` would keep its strides while the kernel writes rows). Each bias has its own flag
(either may be None without the other), and every launch runs on the tensors' device.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

Tensor = torch.Tensor
BLOCK_B, BLOCK_H, BLOCK_K, BLOCK = 16, 32, 32, 1024


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1, written to stay finite for large |x|
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _gate_products(acc, a_ptr, stride_a, w_ptr, K, row0, rows, cols, B, H, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    """acc += A[rows, :K] @ W[row0 + cols, :K]^T  (A: [B, K] row-major, W: [G, K] row-major)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + (row0 + cols[None, :]) * K + ks[:, None],
                    mask=(cols[None, :] < H) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _bias(b_ptr, off, cols, cmask, HAS: tl.constexpr):
    """One gate's bias as a [1, BLOCK_H] row in fp32 (zeros without the bias)."""
    if HAS:
        return tl.load(b_ptr + off + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.zeros_like(cols).to(tl.float32)[None, :]


@triton.jit
def _biases(b_ih_ptr, b_hh_ptr, off, cols, cmask, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr):
    """b_ih + b_hh of one gate, each only if given."""
    return _bias(b_ih_ptr, off, cols, cmask, HAS_B_IH) + _bias(b_hh_ptr, off, cols, cmask, HAS_B_HH)


@triton.jit
def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's tile: its batch rows, hidden columns, their in-bounds mask and [B, H] offsets."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < B) & (cols < H)[None, :]
    return rows, cols, mask, rows[:, None] * H + cols[None, :]


@triton.jit
def _preact(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, off, rows, cols, B, I, H,
            FROM_X: tl.constexpr, FROM_H: tl.constexpr, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr,
            PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One gate's pre-activation in fp32 (weight rows `off`..): x W_ih^T + b_ih if FROM_X, plus
    h W_hh^T + b_hh if FROM_H; the two biases are summed before they are added, as one."""
    cmask = cols < H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if FROM_X:
        acc = _gate_products(acc, x_ptr, I, w_ih_ptr, I, off, rows, cols, B, H, BLOCK_K, PRECISION)
    if FROM_H:
        acc = _gate_products(acc, h_ptr, H, w_hh_ptr, H, off, rows, cols, B, H, BLOCK_K, PRECISION)
    if FROM_X and FROM_H:
        acc += _biases(b_ih_ptr, b_hh_ptr, off, cols, cmask, HAS_B_IH, HAS_B_HH)
    elif FROM_X:
        acc += _bias(b_ih_ptr, off, cols, cmask, HAS_B_IH)
    else:
        acc += _bias(b_hh_ptr, off, cols, cmask, HAS_B_HH)
    return acc


@triton.jit
def _preacts(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, rows, cols, B, I, H, GRU: tl.constexpr,
             HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """The cell's four fp32 pre-activations. LSTM: i, f, g, o (both products and both biases each).
    GRU: r, z, then n's input half (x W_in^T + b_in) and hidden half (h W_hn^T + b_hn) apart, since
    r scales only the hidden half."""
    a = _preact(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, 0 * H, rows, cols, B, I, H,
                True, True, HAS_B_IH, HAS_B_HH, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    b = _preact(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, 1 * H, rows, cols, B, I, H,
                True, True, HAS_B_IH, HAS_B_HH, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    c = _preact(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, 2 * H, rows, cols, B, I, H,
                True, not GRU, HAS_B_IH, HAS_B_HH, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    d = _preact(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, (2 if GRU else 3) * H, rows, cols, B, I, H,
                not GRU, True, HAS_B_IH, HAS_B_HH, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    return a, b, c, d


@triton.jit
def _store4(ws, mask, H, a, b, c, d):
    """a, b, c, d into the first four H-wide column blocks of the workspace rows `ws` points at."""
    tl.store(ws, a, mask=mask)
    tl.store(ws + H, b, mask=mask)
    tl.store(ws + 2 * H, c, mask=mask)
    tl.store(ws + 3 * H, d, mask=mask)


@triton.jit
def _elements(N, H, BLOCK: tl.constexpr):
    """This program's elements of a [B, H] state: flat index, in-bounds mask, batch row, column."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < N, idx // H, idx % H


@triton.jit
def _load4(ws, mask, H):
    """The first four H-wide column blocks of the workspace rows `ws` points at."""
    a = tl.load(ws, mask=mask, other=0.0)
    b = tl.load(ws + H, mask=mask, other=0.0)
    c = tl.load(ws + 2 * H, mask=mask, other=0.0)
    d = tl.load(ws + 3 * H, mask=mask, other=0.0)
    return a, b, c, d


@triton.jit
def lstm_cell_fwd(x_ptr, h_ptr, c_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, hy_ptr, cy_ptr, ws_ptr,
                  B, I, H, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, mask, offs = _tile(B, H, BLOCK_B, BLOCK_H)
    acc_i, acc_f, acc_g, acc_o = _preacts(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, rows, cols, B, I, H,
                                          False, HAS_B_IH, HAS_B_HH, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = f * c + i * g
    h2 = o * _tanh(c2)
    tl.store(hy_ptr + offs, h2.to(hy_ptr.dtype.element_ty), mask=mask)
    tl.store(cy_ptr + offs, c2.to(cy_ptr.dtype.element_ty), mask=mask)
    ws = ws_ptr + rows[:, None] * (5 * H) + cols[None, :]
    _store4(ws, mask, H, i, f, g, o)
    tl.store(ws + 4 * H, c2, mask=mask)


@triton.jit
def gru_cell_fwd(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, hy_ptr, ws_ptr,
                 B, I, H, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, mask, offs = _tile(B, H, BLOCK_B, BLOCK_H)
    acc_r, acc_z, acc_xn, acc_hn = _preacts(x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, rows, cols, B, I, H,
                                            True, HAS_B_IH, HAS_B_HH, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = _sigmoid(acc_r)
    z = _sigmoid(acc_z)
    n = _tanh(acc_xn + r * acc_hn)
    h2 = (1.0 - z) * n + z * h
    tl.store(hy_ptr + offs, h2.to(hy_ptr.dtype.element_ty), mask=mask)
    ws = ws_ptr + rows[:, None] * (4 * H) + cols[None, :]
    _store4(ws, mask, H, r, z, n, acc_hn)


@triton.jit
def lstm_cell_bwd(ws_ptr, cx_ptr, dhy_ptr, dcy_ptr, dgates_ptr, dcx_ptr, N, H, BLOCK: tl.constexpr):
    """Pre-activation gradients [B, 4H] and the previous cell state's gradient, one element each."""
    idx, mask, b, j = _elements(N, H, BLOCK)
    ws = ws_ptr + b * (5 * H) + j
    i, f, g, o = _load4(ws, mask, H)
    c2 = tl.load(ws + 4 * H, mask=mask, other=0.0)
    c = tl.load(cx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dhy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dcy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tc = _tanh(c2)
    dct = dc + dh * o * (1.0 - tc * tc)
    d = dgates_ptr + b * (4 * H) + j
    _store4(d, mask, H, dct * g * i * (1.0 - i), dct * c * f * (1.0 - f), dct * i * (1.0 - g * g),
            dh * tc * o * (1.0 - o))
    tl.store(dcx_ptr + idx, dct * f, mask=mask)


@triton.jit
def gru_cell_bwd(ws_ptr, hx_ptr, dhy_ptr, dgi_ptr, dgh_ptr, dh_direct_ptr, N, H, BLOCK: tl.constexpr):
    """Pre-activation gradients on the input side [B, 3H] and the hidden side [B, 3H] (they differ
    in n), and the part of the previous state's gradient that bypasses W_hh (z * dh)."""
    idx, mask, b, j = _elements(N, H, BLOCK)
    ws = ws_ptr + b * (4 * H) + j
    r, z, n, hn = _load4(ws, mask, H)
    h = tl.load(hx_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dhy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dnp = dh * (1.0 - z) * (1.0 - n * n)
    dr = dnp * hn * r * (1.0 - r)
    dz = dh * (h - n) * z * (1.0 - z)
    gi = dgi_ptr + b * (3 * H) + j
    gh = dgh_ptr + b * (3 * H) + j
    tl.store(gi, dr, mask=mask)
    tl.store(gi + H, dz, mask=mask)
    tl.store(gi + 2 * H, dnp, mask=mask)
    tl.store(gh, dr, mask=mask)
    tl.store(gh + H, dz, mask=mask)
    tl.store(gh + 2 * H, dnp * r, mask=mask)
    tl.store(dh_direct_ptr + idx, dh * z, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers: the bodies of fastnn::triton_lstm_cell / triton_gru_cell and their backward ops
# (registered in fastnn/ops/rnn.py). ``wrap_triton`` lets torch.compile trace the launches.

def _on_device(t: Tensor):
    """The tensor's CUDA device as the current one for the launch (nothing to switch on the CPU,
    where the kernels run under the Triton interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: no TF32, to match the reference


def _rows(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A row-major copy (or the tensor itself when it is one); a stand-in pointer when absent
    (never read: its HAS_* flag is off)."""
    return like if t is None else t.contiguous()


def _forward(kernel, input: Tensor, hx: Tensor, cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor], ws_cols: int) -> list[Tensor]:
    B, I = input.shape
    H = w_hh.shape[1]
    outs = [torch.empty((B, H), dtype=hx.dtype, device=hx.device)]
    if cx is not None:
        outs.append(torch.empty((B, H), dtype=cx.dtype, device=cx.device))
    ws = torch.empty((B, ws_cols * H), dtype=torch.float32, device=input.device)
    if B > 0:
        x = input.contiguous()
        states = [hx.contiguous()] + ([cx.contiguous()] if cx is not None else [])
        grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
        with _on_device(input):
            wrap_triton(kernel)[grid](
                x, *states, w_ih.contiguous(), w_hh.contiguous(), _rows(b_ih, x), _rows(b_hh, x), *outs, ws,
                B, I, H, HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None, PRECISION=_precision(input.dtype),
                BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    return outs + [ws]


def lstm_cell_forward(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                      b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(hy [B, H], cy [B, H], workspace [B, 5H] fp32): fastnn::lstm_cell's outputs."""
    hy, cy, ws = _forward(lstm_cell_fwd, input, hx, cx, w_ih, w_hh, b_ih, b_hh, 5)
    return hy, cy, ws


def gru_cell_forward(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                     b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(hy [B, H], workspace [B, 4H] fp32): fastnn::gru_cell's outputs."""
    hy, ws = _forward(gru_cell_fwd, input, hx, None, w_ih, w_hh, b_ih, b_hh, 4)
    return hy, ws


def _pointwise(kernel, input: Tensor, n_out: tuple[int, ...], *operands: Tensor) -> list[Tensor]:
    """Run a backward pointwise kernel over B*H elements: fp32 outputs of n_out[k]*H columns."""
    B, H = operands[1].shape
    outs = [torch.empty((B, n * H), dtype=torch.float32, device=input.device) for n in n_out]
    if B * H > 0:
        with _on_device(input):
            wrap_triton(kernel)[(triton.cdiv(B * H, BLOCK),)](*[t.contiguous() for t in operands], *outs, B * H, H,
                                                             BLOCK=BLOCK)
    return outs


def _finish(grads: list[Optional[Tensor]], inputs: list[Optional[Tensor]], need: list[bool]) -> tuple[Tensor, ...]:
    """Cast each fp32 gradient to its input's dtype; an empty tensor where it is not wanted."""
    return tuple(g.to(x.dtype).reshape(x.shape) if (n and x is not None and g is not None) else inputs[0].new_empty((0,))
                 for g, x, n in zip(grads, inputs, need))


def lstm_cell_backward(grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor, hx: Tensor, cx: Tensor,
                       w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], hy: Tensor,
                       workspace: Tensor, output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, hx, cx, w_ih, w_hh, b_ih, b_hh), fastnn::lstm_cell_backward's convention."""
    dhy = grad_hy if grad_hy is not None else torch.zeros_like(hx)
    dcy = grad_cy if grad_cy is not None else torch.zeros_like(cx)
    dg, dcx = _pointwise(lstm_cell_bwd, input, (4, 1), workspace, cx, dhy, dcy)
    db = dg.sum(0)
    grads = [dg @ w_ih.float(), dg @ w_hh.float(), dcx, dg.t() @ input.float(), dg.t() @ hx.float(), db, db.clone()]
    return _finish(grads, [input, hx, cx, w_ih, w_hh, b_ih, b_hh], output_mask)


def gru_cell_backward(grad_hy: Optional[Tensor], input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                      b_ih: Optional[Tensor], b_hh: Optional[Tensor], hy: Tensor, workspace: Tensor,
                      output_mask: list[bool]) -> tuple[Tensor, ...]:
    """Gradients of (input, hx, w_ih, w_hh, b_ih, b_hh), fastnn::gru_cell_backward's convention."""
    dhy = grad_hy if grad_hy is not None else torch.zeros_like(hx)
    dgi, dgh, direct = _pointwise(gru_cell_bwd, input, (3, 3, 1), workspace, hx, dhy)
    grads = [dgi @ w_ih.float(), dgh @ w_hh.float() + direct, dgi.t() @ input.float(), dgh.t() @ hx.float(),
             dgi.sum(0), dgh.sum(0)]
    return _finish(grads, [input, hx, w_ih, w_hh, b_ih, b_hh], output_mask)

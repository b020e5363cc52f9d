"""Triton multi-tensor Adam/AdamW and SGD steps.

The tensors of one call are described by a table of their addresses (one row per tensor) and a
list of chunks (tensor, first element); one program updates one chunk, so a launch covers every
tensor of a dtype. Math is in float32, in torch.optim's order of operations (see
csrc/optim/math.h, which the CUDA and CPU kernels share).

These kernels take raw addresses, so they are wrapped in an opaque custom op
(``fastnn::triton_adam_step_``), not ``triton_op``: the compiler cannot trace through an address
table, and an optimizer step has nothing to fuse with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 16384  # elements per program
BLOCK = 1024   # elements per inner iteration

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)


@triton.jit
def _increment_steps(step_table, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """steps[i] += 1 (0 when found_inf is set); one program per tensor, before the update."""
    ptr = tl.load(step_table + tl.program_id(0)).to(tl.pointer_type(tl.float32))
    inc = 1.0
    if HAS_FOUND_INF:
        inc = tl.where(tl.load(found_inf_ptr) != 0, 0.0, 1.0)
    tl.store(ptr, tl.load(ptr) + inc)


@triton.jit
def _prepare_grad(g, g_ptr, offs, mask, grad_scale_ptr, clip_ptr, DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient as the update uses it: unscaled (and written back so), clipped, negated for
    maximize (csrc/optim/math.h: prepare_grad)."""
    if HAS_SCALE:
        g = g / tl.load(grad_scale_ptr)
        tl.store(g_ptr + offs, g.to(DTYPE), mask=mask)
    if HAS_CLIP:
        g = g * tl.load(clip_ptr)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _adam_chunks(table, numels, chunk_tensor, chunk_start,
                 lr_ptr, grad_scale_ptr, found_inf_ptr, clip_ptr,
                 lr, beta1, beta2, eps, weight_decay,
                 DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                 HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 HAS_CLIP: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr):
    c = tl.program_id(0)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if not skip:
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        n = tl.load(numels + t)
        p_ptr = tl.load(table + t * 6 + 0).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(table + t * 6 + 1).to(tl.pointer_type(DTYPE))
        m_ptr = tl.load(table + t * 6 + 2).to(tl.pointer_type(DTYPE))
        v_ptr = tl.load(table + t * 6 + 3).to(tl.pointer_type(DTYPE))
        x_ptr = tl.load(table + t * 6 + 4).to(tl.pointer_type(DTYPE))
        step = tl.load(tl.load(table + t * 6 + 5).to(tl.pointer_type(tl.float32)))
        lr_v = lr
        if HAS_LR_TENSOR:
            lr_v = tl.load(lr_ptr).to(tl.float32)
        bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
        step_size = lr_v / bc1
        for i in range(0, tl.minimum(CHUNK_, n - start), BLOCK_):  # the last chunk may be short
            offs = start + i + tl.arange(0, BLOCK_)
            mask = offs < n
            p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
            g = _prepare_grad(g, g_ptr, offs, mask, grad_scale_ptr, clip_ptr, DTYPE, HAS_SCALE, HAS_CLIP, MAXIMIZE)
            if weight_decay != 0.0:
                if DECOUPLED:
                    p = p * (1.0 - lr_v * weight_decay)
                else:
                    g = g + weight_decay * p
            m = m + (1.0 - beta1) * (g - m)
            v = v * beta2 + (1.0 - beta2) * g * g
            if AMSGRAD:
                x = tl.maximum(tl.load(x_ptr + offs, mask=mask).to(tl.float32), v)
                tl.store(x_ptr + offs, x.to(DTYPE), mask=mask)
                denom = tl.sqrt(x) / bc2_sqrt + eps
            else:
                denom = tl.sqrt(v) / bc2_sqrt + eps
            p = p - step_size * (m / denom)
            tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
            tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
            tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _sgd_chunks(table, numels, chunk_tensor, chunk_start,
                lr_ptr, grad_scale_ptr, found_inf_ptr, clip_ptr,
                lr, momentum, dampening, weight_decay,
                DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                FIRST_STEP: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr):
    c = tl.program_id(0)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if not skip:
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)
        n = tl.load(numels + t)
        p_ptr = tl.load(table + t * 3 + 0).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(table + t * 3 + 1).to(tl.pointer_type(DTYPE))
        b_ptr = tl.load(table + t * 3 + 2).to(tl.pointer_type(DTYPE))
        lr_v = lr
        if HAS_LR_TENSOR:
            lr_v = tl.load(lr_ptr).to(tl.float32)
        for i in range(0, tl.minimum(CHUNK_, n - start), BLOCK_):  # the last chunk may be short
            offs = start + i + tl.arange(0, BLOCK_)
            mask = offs < n
            p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
            g = _prepare_grad(g, g_ptr, offs, mask, grad_scale_ptr, clip_ptr, DTYPE, HAS_SCALE, HAS_CLIP, MAXIMIZE)
            if weight_decay != 0.0:
                g = g + weight_decay * p
            if MOMENTUM:
                if FIRST_STEP:
                    b = g
                else:
                    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32) * momentum + (1.0 - dampening) * g
                tl.store(b_ptr + offs, b.to(DTYPE), mask=mask)
                if NESTEROV:
                    g = g + momentum * b
                else:
                    g = b
            p = p - lr_v * g
            tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)


def _tables(rows: list[list[torch.Tensor | None]], device: torch.device):
    """Address table [n, len(row)], numels [n], and the chunk list of the tensors in ``rows``."""
    addrs, numels, chunk_t, chunk_s = [], [], [], []
    for i, row in enumerate(rows):
        addrs.append([t.data_ptr() if t is not None else 0 for t in row])
        n = row[0].numel()
        numels.append(n)
        for s in range(0, n, CHUNK):
            chunk_t.append(i)
            chunk_s.append(s)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int64).to(device, non_blocking=True)  # noqa: E731
    return as_dev(addrs), as_dev(numels), as_dev(chunk_t), as_dev(chunk_s), len(chunk_t)


def _scalar_ptrs(lr_tensor, grad_scale, found_inf, clip_coef, dummy):
    return [t if t is not None else dummy for t in (lr_tensor, grad_scale, found_inf, clip_coef)]


def _by_dtype(indices: range, params: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    out: dict[torch.dtype, list[int]] = {}
    for i in indices:
        out.setdefault(params[i].dtype, []).append(i)
    return out


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, decoupled, lr_tensor=None, grad_scale=None, found_inf=None,
               clip_coef=None) -> None:
    """The Triton kernels' launcher, with the signature of ``fastnn::adam_step_`` (tensors dense
    with one layout per parameter; the op wrapper makes copies otherwise)."""
    if not params:
        return
    device = params[0].device
    dummy = torch.zeros(1, device=device)
    ptrs = _scalar_ptrs(lr_tensor, grad_scale, found_inf, clip_coef, dummy)
    step_table = torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64).to(device, non_blocking=True)
    _increment_steps[(len(steps),)](step_table, ptrs[2], HAS_FOUND_INF=found_inf is not None)
    for dtype, idx in _by_dtype(range(len(params)), params).items():
        rows = [[params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                 steps[i]] for i in idx]
        table, numels, ct, cs, n_chunks = _tables(rows, device)
        _adam_chunks[(n_chunks,)](table, numels, ct, cs, *ptrs, float(lr), float(beta1), float(beta2), float(eps),
                                  float(weight_decay), DTYPE=_TL_DTYPE[dtype], AMSGRAD=bool(amsgrad),
                                  MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled),
                                  HAS_LR_TENSOR=lr_tensor is not None, HAS_SCALE=grad_scale is not None,
                                  HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip_coef is not None,
                                  CHUNK_=CHUNK, BLOCK_=BLOCK)


def sgd_step_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
              is_first_step, lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None) -> None:
    """The Triton kernels' launcher, with the signature of ``fastnn::sgd_step_``."""
    if not params:
        return
    device = params[0].device
    dummy = torch.zeros(1, device=device)
    ptrs = _scalar_ptrs(lr_tensor, grad_scale, found_inf, clip_coef, dummy)
    for dtype, idx in _by_dtype(range(len(params)), params).items():
        rows = [[params[i], grads[i], momentum_buffers[i] if momentum != 0 else None] for i in idx]
        table, numels, ct, cs, n_chunks = _tables(rows, device)
        _sgd_chunks[(n_chunks,)](table, numels, ct, cs, *ptrs, float(lr), float(momentum), float(dampening),
                                 float(weight_decay), DTYPE=_TL_DTYPE[dtype], MOMENTUM=momentum != 0,
                                 NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), FIRST_STEP=bool(is_first_step),
                                 HAS_LR_TENSOR=lr_tensor is not None, HAS_SCALE=grad_scale is not None,
                                 HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip_coef is not None,
                                 CHUNK_=CHUNK, BLOCK_=BLOCK)

"""Triton multi-tensor Adam/AdamW and SGD steps and the global gradient norm, and their launchers.

The tensors of one call are described by a table of their addresses (one row per tensor) and a
list of chunks (tensor, first element); one program updates one chunk, so a launch covers every
tensor of a dtype. Math is in float32, in torch.optim's order of operations (see
csrc/optim/math.h, which the CUDA and CPU kernels share); Adam's bias corrections are computed
in float64 from the step counter, as torch computes them on the host.

The tables are cached, keyed on their whole content (every address and size): a step over the same
tensors uploads nothing, so it can be captured in a CUDA graph after a warm-up step, and a changed
tensor always gets a new table.

These kernels take raw addresses, so they are wrapped in opaque custom ops
(``fastnn::triton_adam_step_`` in fastnn/ops/optim.py), not ``triton_op``: the compiler cannot
trace through an address table, and an optimizer step has nothing to fuse with. Every launch runs
on the parameters' device (``torch.cuda.device``), not the current one.
"""

from __future__ import annotations

import contextlib
import struct
from collections import OrderedDict

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
def _pow64(hi, lo, n):
    """(hi + lo) ** n in float64 (hi + lo: a float64 value split into two float32 kernel
    arguments): by squaring for the integer part of n, exp2/log2 for a fractional rest."""
    b = tl.zeros((), tl.float64) + hi + lo
    e = n.to(tl.int64)
    frac = n - e.to(tl.float32)
    r = tl.zeros((), tl.float64) + 1.0
    while e > 0:
        r = tl.where(e % 2 == 1, r * b, r)
        b = b * b
        e = e // 2
    if frac != 0.0:
        r = r * tl.exp2(frac * tl.log2(tl.zeros((), tl.float32) + hi + lo)).to(tl.float64)
    return r


@triton.jit
def _nan_max(a, b):
    """max that propagates NaN from either side, as torch.maximum (tl.maximum drops it)."""
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _skipped(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """Whether this step is skipped: found_inf is set (GradScaler saw an inf/NaN gradient)."""
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    return skip


@triton.jit
def _chunk(table, numels, chunk_tensor, chunk_start, COLS: tl.constexpr):
    """This program's chunk: its first element, the size of its tensor, and that tensor's row of
    the COLS-column address table."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    return tl.load(chunk_start + c), tl.load(numels + t), table + t * COLS


@triton.jit
def _ptr(row, col, DTYPE: tl.constexpr):
    """Column col of an address table row, as a pointer to DTYPE."""
    return tl.load(row + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _learning_rate(lr, lr_ptr, HAS_LR_TENSOR: tl.constexpr):
    """The scalar lr, or the value of the lr tensor when one is given (read on the device)."""
    lr_v = lr
    if HAS_LR_TENSOR:
        lr_v = tl.load(lr_ptr).to(tl.float32)
    return lr_v


@triton.jit
def _adam_chunks(table, numels, chunk_tensor, chunk_start,
                 lr_ptr, grad_scale_ptr, found_inf_ptr, clip_ptr,
                 lr, beta2, one_minus_beta1, one_minus_beta2, beta1_hi, beta1_lo, beta2_hi, beta2_lo, eps,
                 weight_decay,
                 DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                 HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 HAS_CLIP: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr):
    if not _skipped(found_inf_ptr, HAS_FOUND_INF):
        start, n, row = _chunk(table, numels, chunk_tensor, chunk_start, 6)
        p_ptr = _ptr(row, 0, DTYPE)
        g_ptr = _ptr(row, 1, DTYPE)
        m_ptr = _ptr(row, 2, DTYPE)
        v_ptr = _ptr(row, 3, DTYPE)
        x_ptr = _ptr(row, 4, DTYPE)
        step = tl.load(_ptr(row, 5, tl.float32))
        lr_v = _learning_rate(lr, lr_ptr, HAS_LR_TENSOR)
        bc1 = 1.0 - _pow64(beta1_hi, beta1_lo, step)
        bc2_sqrt = tl.sqrt(1.0 - _pow64(beta2_hi, beta2_lo, step)).to(tl.float32)
        step_size = (lr_v / bc1).to(tl.float32)
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
            w = one_minus_beta1  # torch's exp_avg.lerp_(grad, w), in lerp's two forms (csrc/optim/math.h)
            m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
            v = v * beta2 + one_minus_beta2 * g * g
            if AMSGRAD:
                x = _nan_max(tl.load(x_ptr + offs, mask=mask).to(tl.float32), v)
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
    if not _skipped(found_inf_ptr, HAS_FOUND_INF):
        start, n, row = _chunk(table, numels, chunk_tensor, chunk_start, 3)
        p_ptr = _ptr(row, 0, DTYPE)
        g_ptr = _ptr(row, 1, DTYPE)
        b_ptr = _ptr(row, 2, DTYPE)
        lr_v = _learning_rate(lr, lr_ptr, HAS_LR_TENSOR)
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


@triton.jit
def _norm_chunks(table, numels, chunk_tensor, chunk_start, partial, DTYPE: tl.constexpr, INF_NORM: tl.constexpr,
                 CHUNK_: tl.constexpr, BLOCK_: tl.constexpr):
    """partial[c] = sum of squares (or max of |x|, NaN if any) over chunk c, in float32."""
    start, n, row = _chunk(table, numels, chunk_tensor, chunk_start, 1)
    g_ptr = _ptr(row, 0, DTYPE)
    acc = tl.zeros([BLOCK_], tl.float32)
    for i in range(0, tl.minimum(CHUNK_, n - start), BLOCK_):
        offs = start + i + tl.arange(0, BLOCK_)
        x = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        if INF_NORM:
            acc = _nan_max(acc, tl.abs(x))
        else:
            acc += x * x
    if INF_NORM:
        r = tl.where(tl.sum((acc != acc).to(tl.int32)) > 0, float("nan"), tl.max(acc))
    else:
        r = tl.sum(acc)
    tl.store(partial + tl.program_id(0), r)


# Device tables by (what, device) -> (host content, device tensors); a few entries, least recently
# used first out. Keyed on the whole content, so a hit is always the table the launch needs.
_TABLES: "OrderedDict[tuple, tuple[list, tuple]]" = OrderedDict()
_MAX_TABLES = 32


def _cached(key: tuple, content: list, make):
    hit = _TABLES.get(key)
    if hit is not None and hit[0] == content:
        _TABLES.move_to_end(key)
        return hit[1]
    value = make()
    _TABLES[key] = (content, value)
    _TABLES.move_to_end(key)
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return value


def _tables(what: object, rows: list[list[torch.Tensor | None]], device: torch.device):
    """Address table [n, len(row)], numels [n], and the chunk list of the tensors in ``rows``."""
    addrs = [[t.data_ptr() if t is not None else 0 for t in row] for row in rows]
    numels = [row[0].numel() for row in rows]

    def make():
        chunk_t, chunk_s = [], []
        for i, n in enumerate(numels):
            for s in range(0, n, CHUNK):
                chunk_t.append(i)
                chunk_s.append(s)
        as_dev = lambda x: torch.tensor(x, dtype=torch.int64).to(device, non_blocking=True)  # noqa: E731
        return as_dev(addrs), as_dev(numels), as_dev(chunk_t), as_dev(chunk_s), len(chunk_t)

    return _cached((what, device), [addrs, numels], make)


def _on_device(device: torch.device):
    """The context that makes ``device`` current for a launch (none for CPU tensors under the
    interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _split(x: float) -> tuple[float, float]:
    """x as hi + lo, two float32 values (a float64 value carried by float32 kernel arguments)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _scalar_ptrs(lr_tensor, grad_scale, found_inf, clip_coef, device):
    """The scalar inputs as tensors on ``device`` that the kernels read through a pointer (a CPU
    one is moved, as torch's fused optimizers do), and a placeholder for those absent."""
    out = []
    for t in (lr_tensor, grad_scale, found_inf, clip_coef):
        if t is None:
            out.append(_cached(("placeholder", device), [], lambda: torch.zeros(1, device=device)))
        else:
            out.append(t if t.device == device else t.to(device, non_blocking=True))
    return out
def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _flags(lr_tensor, grad_scale, found_inf, clip_coef) -> dict:
    return dict(HAS_LR_TENSOR=lr_tensor is not None, HAS_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip_coef is not None, CHUNK_=CHUNK, BLOCK_=BLOCK)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, decoupled, lr_tensor=None, grad_scale=None, found_inf=None,
               clip_coef=None) -> None:
    """The Triton kernels' launcher, with the signature of ``fastnn::adam_step_`` (tensors dense
    with one layout per parameter; the op wrapper makes copies otherwise)."""
    if not params:
        return
    device = params[0].device
    b1, b2 = _split(float(beta1)), _split(float(beta2))
    with _on_device(device):
        ptrs = _scalar_ptrs(lr_tensor, grad_scale, found_inf, clip_coef, device)
        step_table = _tables("steps", [[s] for s in steps], device)[0]
        _increment_steps[(len(steps),)](step_table, ptrs[2], HAS_FOUND_INF=found_inf is not None)
        for dtype, idx in _by_dtype(params).items():
            rows = [[params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                     steps[i]] for i in idx]
            table, numels, ct, cs, n_chunks = _tables(("adam", dtype), rows, device)
            # 1 - beta in float64 on the host, as torch.optim computes it (in float32 it is off by
            # up to 1% for beta2 = 0.999999)
            _adam_chunks[(n_chunks,)](table, numels, ct, cs, *ptrs, float(lr), float(beta2), 1.0 - float(beta1),
                                      1.0 - float(beta2), *b1, *b2,
                                      float(eps), float(weight_decay), DTYPE=_TL_DTYPE[dtype], AMSGRAD=bool(amsgrad),
                                      MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled),
                                      **_flags(lr_tensor, grad_scale, found_inf, clip_coef))


def sgd_step_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
              is_first_step, lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None) -> None:
    """The Triton kernels' launcher, with the signature of ``fastnn::sgd_step_``."""
    if not params:
        return
    device = params[0].device
    with _on_device(device):
        ptrs = _scalar_ptrs(lr_tensor, grad_scale, found_inf, clip_coef, device)
        for dtype, idx in _by_dtype(params).items():
            rows = [[params[i], grads[i], momentum_buffers[i] if momentum != 0 else None] for i in idx]
            table, numels, ct, cs, n_chunks = _tables(("sgd", dtype), rows, device)
            _sgd_chunks[(n_chunks,)](table, numels, ct, cs, *ptrs, float(lr), float(momentum), float(dampening),
                                     float(weight_decay), DTYPE=_TL_DTYPE[dtype], MOMENTUM=momentum != 0,
                                     NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                                     FIRST_STEP=bool(is_first_step),
                                     **_flags(lr_tensor, grad_scale, found_inf, clip_coef))


def grad_norm_clip_coef(grads, max_norm, norm_type=2.0, grad_scale=None):
    """The global norm of dense ``grads`` and clip_grad_norm_'s factor, float32 scalars on their
    device: per-chunk float32 partials from the kernel, combined in float64 in a fixed order by
    torch on the device (no host synchronisation)."""
    device = grads[0].device if grads else torch.device("cpu")
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros((), device=device), torch.ones((), device=device)
    inf_norm = norm_type == float("inf")
    partials = []
    with _on_device(device):
        for dtype, idx in _by_dtype(grads).items():
            table, numels, ct, cs, n_chunks = _tables(("norm", dtype), [[grads[i]] for i in idx], device)
            partial = torch.empty(n_chunks, dtype=torch.float32, device=device)
            _norm_chunks[(n_chunks,)](table, numels, ct, cs, partial, DTYPE=_TL_DTYPE[dtype], INF_NORM=inf_norm,
                                      CHUNK_=CHUNK, BLOCK_=BLOCK)
            partials.append(partial)
        p = torch.cat(partials).double()
        total = p.max() if inf_norm else p.sum().sqrt()
        if grad_scale is not None:
            total = total / grad_scale.to(device, torch.float64)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total.float(), coef.float()

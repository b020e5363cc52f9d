"""The CUDA grouped GEMM: torch's own (``torch._grouped_mm``, CUTLASS on sm90 / sm100, bf16) behind
fastnn's op and conventions. Rows past the last group (dropped slots) and experts without tokens
get zeros, computed with masks rather than slices so that nothing reads a device value on the host.

What torch._grouped_mm requires, and how this module meets it:

* bf16 operands, K and N multiples of 8 (16-byte rows): checked by :func:`supports`.
* 16-byte aligned data pointers and strides, row-major ``a`` and a row- or column-major ``b``
  (views with odd storage offsets, a transposed ``a``): the operands are made to conform
  (:func:`_conforming` copies what does not), also ``a`` for the backward's ``a.t()``.
* The architecture: the CUTLASS kernel, which reads the offsets on the device, exists for sm90 in
  every torch that has ``_grouped_mm`` and for sm100 from torch 2.9. Elsewhere newer torch versions
  fall back to a loop that reads the offsets on the host, which would break the op's promise of no
  host synchronisation (and CUDA-graph capture), so :func:`supports` refuses those GPUs.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._extension import assume_constant

Tensor = torch.Tensor


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@assume_constant
def _arch_supported(device_index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    return major == 9 or (major == 10 and _torch_version() >= (2, 9))


def supports(a: Tensor, b: Tensor, trans_b: bool) -> Optional[str]:
    """None when torch._grouped_mm can serve these operands without a host synchronisation."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return "the CUDA grouped GEMM (torch._grouped_mm) takes bfloat16; other dtypes use triton or reference"
    if a.shape[1] % 8 or (b.shape[1] if trans_b else b.shape[2]) % 8:
        return "the CUDA grouped GEMM needs K and N multiples of 8 (16-byte rows)"
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if not _arch_supported(index):
        return (f"torch {torch.__version__}'s grouped GEMM kernel (CUTLASS, offsets read on the device) runs on "
                "sm90 (and sm100 from torch 2.9); elsewhere it would read the offsets on the host")
    return None


def _conforming(t: Tensor) -> Tensor:
    """``t`` contiguous with a 16-byte aligned data pointer (a copy when it is not)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _rows_past_groups(offsets: Tensor, M: int, device: torch.device) -> Tensor:
    return (torch.arange(M, device=device) >= offsets[-1]).unsqueeze(1)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool = False) -> Tensor:
    if b.shape[0] == 0:
        return a.new_zeros((a.shape[0], b.shape[1] if trans_b else b.shape[2]))
    a, b = _conforming(a), _conforming(b)
    out = torch._grouped_mm(a, b.transpose(-2, -1) if trans_b else b, offs=offsets.to(torch.int32).contiguous())
    return out.masked_fill(_rows_past_groups(offsets, a.shape[0], a.device), 0)


def grouped_mm_backward(grad: Tensor, a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, need_a: bool,
                        need_b: bool) -> tuple[Tensor, Tensor]:
    offs = offsets.to(torch.int32).contiguous()
    ga, gb = a.new_empty((0,)), b.new_empty((0,))
    if b.shape[0] == 0:
        return (torch.zeros_like(a) if need_a else ga), (torch.zeros_like(b) if need_b else gb)
    grad, a, b = _conforming(grad), _conforming(a), _conforming(b)
    if need_a:  # dA = dY @ B_e^T
        ga = torch._grouped_mm(grad, b if trans_b else b.transpose(-2, -1), offs=offs)
        ga = ga.masked_fill(_rows_past_groups(offsets, a.shape[0], a.device), 0)
    if need_b:  # dB_e = A_e^T dY_e, [E, K, N] (transposed back for the [E, N, K] layout)
        gk = torch._grouped_mm(a.t(), grad, offs=offs)
        counts = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1).to(torch.int64))
        gk = torch.where((counts > 0).view(-1, 1, 1), gk, torch.zeros((), dtype=gk.dtype, device=gk.device))
        gb = gk.transpose(-2, -1).contiguous() if trans_b else gk
    return ga, gb

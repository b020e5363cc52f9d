"""The CUDA grouped GEMM path (fastnn.ops.moe._grouped_torch over torch._grouped_mm) computes
fastnn's grouped_mm and its backward: checked here on torch._grouped_mm's CPU implementation, so
that the wrapper's conventions (offsets, the [E, N, K] layout, rows past the last group, experts
without tokens) are verified without a GPU. The CUDA kernel itself runs under -m gpu."""

import pytest
import torch

from fastnn import testing
from fastnn.ops.moe import _grouped_torch
from fastnn.reference import moe as ref

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")

# tokens per expert: an empty expert, all on one expert, and rows past the last group (dropped)
COUNTS = [[3, 0, 5], [0, 8, 0], [2, 2, 1]]


@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_forward_and_backward_match_reference(counts, trans_b):
    E, K, N = len(counts), 16, 24
    kept = sum(counts)
    M = kept + 2  # two dropped rows after the groups
    offsets = torch.cumsum(torch.tensor(counts), 0)
    a = torch.randn(M, K, dtype=torch.float64)
    b = torch.randn(E, N, K, dtype=torch.float64) if trans_b else torch.randn(E, K, N, dtype=torch.float64)
    grad = torch.randn(M, N, dtype=torch.float64)

    out = _grouped_torch.grouped_mm(a.float(), b.float(), offsets, trans_b)
    testing.assert_close(out, ref.grouped_mm(a, b, offsets, trans_b).float())
    assert torch.equal(out[kept:], torch.zeros_like(out[kept:]))

    ga, gb = _grouped_torch.grouped_mm_backward(grad.float(), a.float(), b.float(), offsets, trans_b, True, True)
    a_ = a.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    ref.grouped_mm(a_, b_, offsets, trans_b).backward(grad)
    testing.assert_close(ga, a_.grad.float())
    testing.assert_close(gb, b_.grad.float())
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert all(torch.equal(gb[e], torch.zeros_like(gb[e])) for e in empty)


def test_backward_skips_what_is_not_needed():
    a, b, offsets = torch.randn(6, 8), torch.randn(2, 8, 8), torch.tensor([2, 6])
    ga, gb = _grouped_torch.grouped_mm_backward(torch.randn(6, 8), a, b, offsets, False, False, True)
    assert ga.numel() == 0 and gb.shape == b.shape

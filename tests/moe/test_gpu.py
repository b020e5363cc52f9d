"""GPU-only checks of the MoE family (skipped without a CUDA device): bf16 accuracy of the whole
layer on the fast path, no host synchronisation in the forward pass, and the CUDA kernels (the
per-op parity tests of test_ops.py run the cuda and triton backends there too)."""

import pytest
import torch

import fastnn
from fastnn import backends, ops, testing
from fastnn.reference import moe as ref

pytestmark = pytest.mark.gpu


def _loop(m, x):
    from .test_layer import loop_moe  # noqa: PLC0415  (one oracle for the family)

    return loop_moe(m, x)


@pytest.mark.parametrize("routing", [dict(), dict(score_func="sigmoid", num_groups=4, topk_groups=2,
                                                   group_score="top2_sum", selection_bias=True)])
def test_layer_bf16_on_gpu_error_bounded(routing):
    torch.manual_seed(0)
    m = fastnn.MoE(256, 192, 16, 4, device="cuda", **routing)
    x = torch.randn(300, 256, device="cuda")
    exact = _loop(m.double(), x.double())
    m16 = m.to(torch.bfloat16)
    with torch.no_grad():
        got = m16(x.bfloat16())
        torch_lp = _loop(m16, x.bfloat16())
    testing.assert_error_bounded(got, exact, torch_lp, floor=1e-3, msg="MoE bf16 on GPU")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forward_has_no_host_sync(backend):
    m = fastnn.MoE(64, 32, 8, 2, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)  # warm-up: autotuning may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with backends.force(backend, ops=["topk_gating", "permute_tokens", "unpermute_tokens"]):
                m(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_large_index_arithmetic_is_64_bit():
    """T*k rows past 2^31 elements of the permuted buffer: the gather addresses rows * H beyond int32."""
    T, k, H = 2**20, 2, 1100  # 2^21 rows x 1100 columns = 2.3e9 elements > 2^31
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * T * k * H * 2:
        pytest.skip("needs about 14 GB of free GPU memory")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    r = ref.topk_gating(torch.randn(T, 8, device="cuda"), k)
    for backend in ("triton", "cuda"):
        with backends.force(backend):
            xs = ops.permute_tokens(x, r.sorted_slots, k)
        last = r.sorted_slots[-1] // k
        assert torch.equal(xs[-1], x[last]), backend
        del xs


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(40000, 256, 2), (3000, 7, 3), (1, 8, 1)], ids=str)
def test_layout_counting_sort_matches_reference(backend, shape):
    """The counting-sort layout over many tiles (skewed experts, empty ones) equals the stable sort."""
    T, E, k = shape
    # Multiples of 1/16: equal logits give exactly equal scores everywhere (the lower index wins),
    # unequal ones scores far apart, so no backend's rounding can reorder experts.
    logits = (torch.randn(T, E, device="cuda") * 16).round() / 16
    logits[: T // 3, 0] += 10
    if E > 2:
        logits[:, 1] = -1e4
    with backends.force(backend):
        got = ops.topk_gating(logits, k)
    want = ref.topk_gating(logits, k)
    for name in ("expert_ids", "tokens_per_expert", "sorted_slots", "slot_positions"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_kernels_guard_out_of_range_indices(prefix):
    """On the GPU indices are not checked on the host (that would synchronise): the kernels must read
    nothing out of range. Run the compiled and Triton ops directly with bad indices, then sync."""
    fastnn._extension.load()
    ns = torch.ops.fastnn
    r = ref.topk_gating(torch.randn(6, 4, device="cuda"), 2)
    x, y = torch.randn(6, 8, device="cuda"), torch.randn(12, 8, device="cuda")
    far = r.sorted_slots.clone()
    far[0], far[1] = 2**40, -5
    out = getattr(ns, prefix + "permute_tokens")(x, far, 2)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    pos = r.slot_positions.clone()
    pos[0, 0] = 2**40
    getattr(ns, prefix + "unpermute_tokens")(y, pos, r.weights)
    getattr(ns, prefix + "unpermute_tokens_backward")(x, y, pos, r.weights, far)
    if prefix:  # fastnn::grouped_mm on CUDA is torch._grouped_mm (bf16, its own checks)
        a, b = torch.randn(9, 16, device="cuda"), torch.randn(4, 16, 8, device="cuda")
        ns.triton_grouped_mm(a, b, torch.tensor([-1, 5, 5, 2**40], device="cuda"), False)
    torch.cuda.synchronize()


def test_torch_grouped_mm_conforms_views():
    """Misaligned views and a transposed a go through torch._grouped_mm (copied to conform)."""
    if ops.grouped_mm.reason("cuda", torch.randn(8, 16, device="cuda", dtype=torch.bfloat16),
                             torch.randn(2, 16, 16, device="cuda", dtype=torch.bfloat16),
                             torch.tensor([3, 8], device="cuda")):
        pytest.skip("the torch._grouped_mm path cannot run on this GPU / torch")
    base = torch.randn(8 * 16 + 3, device="cuda", dtype=torch.bfloat16)
    a = base[3:].view(8, 16)  # 6-byte storage offset
    at = torch.randn(16, 8, device="cuda", dtype=torch.bfloat16).t()
    b = torch.randn(2, 16, 16, device="cuda", dtype=torch.bfloat16)
    off = torch.tensor([3, 8], device="cuda")
    for inp in (a, at):
        inp = inp.detach().requires_grad_()
        with backends.force("cuda"):
            got = ops.grouped_mm(inp, b, off, trans_b=True)
        want = ref.grouped_mm(inp.double(), b.double(), off, trans_b=True)
        testing.assert_error_bounded(got, want, ref.grouped_mm(inp, b, off, trans_b=True), floor=1e-2)
        got.sum().backward()

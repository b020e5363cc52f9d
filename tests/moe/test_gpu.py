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
    from test_moe_layer import loop_moe  # noqa: PLC0415  (one oracle for the family; tests/moe is on sys.path)

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

"""fastnn.ops MoE ops (topk_gating, permute/unpermute_tokens, grouped_mm) against the reference, on every
backend: parity at odd sizes, size 1, empty batches, experts without tokens and all tokens on one
expert; gradients; opcheck; gradcheck in float64; clear errors."""

import pytest
import torch

from fastnn import backends, ops, testing
from fastnn.ops import moe as moe_ops
from fastnn.reference import moe as ref

ROUTERS = {
    "mixtral": dict(),
    "olmoe": dict(renormalize=False),
    "topk_softmax": dict(score_func="topk_softmax"),
    "deepseek_v3": dict(score_func="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                        routed_scaling_factor=2.5, bias=True),
    "deepseek_v2": dict(num_groups=2, topk_groups=1, renormalize=False, routed_scaling_factor=16.0),
    "sigmoid_plain": dict(score_func="sigmoid", renormalize=False),
    "capacity_drop": dict(capacity_factor=0.6),
    "capacity_next": dict(capacity_factor=0.6, drop_policy="next_choice"),
    "capacity_next_grouped": dict(capacity_factor=0.5, drop_policy="next_choice", num_groups=4, topk_groups=3,
                                  score_func="sigmoid", bias=True),
}
SHAPES = [(1, 8, 1), (7, 8, 2), (33, 8, 3), (0, 8, 2)]  # T, E, k: size 1, odd, empty batch


def _kwargs(cfg, E, device):
    kw = {k: v for k, v in cfg.items() if k != "bias"}
    if cfg.get("bias"):
        kw["selection_bias"] = torch.linspace(-0.2, 0.3, E, device=device)
    return kw


def _assert_gating_equal(got, want, dtype):
    for name in ("expert_ids", "tokens_per_expert", "sorted_slots", "slot_positions"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
    testing.assert_close(got.weights.cpu(), want.weights.cpu(), dtype=dtype, msg="weights")


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-E%d-k%d" % s)
def test_gating_matches_reference(backend, device_for, router, shape):
    T, E, k = shape
    logits = torch.randn(T, E, device=device_for)
    kw = _kwargs(ROUTERS[router], E, device_for)
    testing.backend_or_skip(ops.topk_gating, backend, logits, k, **kw)
    before = logits.clone()
    with backends.force(backend):
        got = ops.topk_gating(logits, k, **kw)
    want = ref.topk_gating(logits, k, **kw)
    _assert_gating_equal(got, want, torch.float32)
    assert torch.equal(logits, before), "topk_gating modified its input"
    # Invariants of the layout, whatever the router: counts add up, the permutation is one.
    kept = (got.expert_ids >= 0).sum()
    assert int(got.tokens_per_expert.sum()) == int(kept)
    assert torch.equal(got.sorted_slots.sort().values.cpu(), torch.arange(T * k))
    assert torch.equal(got.sorted_slots[got.slot_positions.flatten()].cpu(), torch.arange(T * k))


def test_gating_edge_routings(backend, device_for):
    E, k = 8, 2
    # All tokens to experts 3 and 5; the other experts get none.
    logits = torch.full((17, E), -5.0, device=device_for)
    logits[:, 3], logits[:, 5] = 4.0, 3.0
    testing.backend_or_skip(ops.topk_gating, backend, logits, k)
    with backends.force(backend):
        out = ops.topk_gating(logits, k)
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 17, 0, 17, 0, 0]
    assert (out.expert_ids[:, 0] == 3).all() and (out.expert_ids[:, 1] == 5).all()
    # Ties go to the lower expert index, in every backend.
    with backends.force(backend):
        tie = ops.topk_gating(torch.zeros(5, E, device=device_for), 3)
    assert tie.expert_ids.tolist() == [[0, 1, 2]] * 5
    testing.assert_close(tie.weights.cpu(), torch.full((5, 3), 1 / 3))
    # Capacity 1 with every token on the same favourite: the first token keeps it, next_choice
    # moves the others along their preference order until experts run out.
    logits = torch.arange(E, 0, -1, dtype=torch.float32, device=device_for).repeat(4, 1)
    if ops.topk_gating.reason(backend, logits, 1, capacity_factor=1.0) is not None:
        return  # this backend has no capacity routing (the Op falls back to one that has)
    with backends.force(backend):
        drop = ops.topk_gating(logits, 1, capacity_factor=E / 4)
        nxt = ops.topk_gating(logits, 1, capacity_factor=E / 4, drop_policy="next_choice")
    assert drop.expert_ids.flatten().tolist() == [0, -1, -1, -1]
    assert nxt.expert_ids.flatten().tolist() == [0, 1, 2, 3]
    assert drop.weights[1:].abs().sum() == 0  # dropped slots weigh nothing


def test_gating_nan_logits_are_visible(backend, device_for):
    """A token with a NaN logit gets NaN weights (softmax of its row); other tokens are unaffected."""
    logits = torch.randn(6, 8, device=device_for)
    logits[2, 4] = float("nan")
    testing.backend_or_skip(ops.topk_gating, backend, logits, 2)
    with backends.force(backend):
        out = ops.topk_gating(logits, 2)
    assert out.weights[2].isnan().all()
    clean = ref.topk_gating(logits[[0, 1, 3, 4, 5]], 2)
    testing.assert_close(out.weights[[0, 1, 3, 4, 5]].cpu(), clean.weights.cpu())
    assert (out.expert_ids[2] != 4).all()  # NaN ranks last


@pytest.mark.parametrize("router", ["mixtral", "olmoe", "topk_softmax", "deepseek_v3", "sigmoid_plain",
                                    "capacity_next"])
def test_gating_gradient_matches_reference(backend, device_for, router):
    T, E, k = 11, 8, 3
    logits = torch.randn(T, E, device=device_for, dtype=torch.float64 if backend != "triton" else torch.float32)
    kw = _kwargs(ROUTERS[router], E, device_for)
    testing.backend_or_skip(ops.topk_gating, backend, logits, k, **kw)
    g = torch.randn(T, k, device=device_for, dtype=logits.dtype)
    x = logits.clone().requires_grad_()
    with backends.force(backend):
        out = ops.topk_gating(x, k, **kw)
    (got,) = torch.autograd.grad((out.weights * g).sum(), x)
    y = logits.double().clone().requires_grad_()
    want_out = ref.topk_gating(y, k, **{n: (v.double() if torch.is_tensor(v) else v) for n, v in kw.items()})
    (want,) = torch.autograd.grad((want_out.weights * g.double()).sum(), y)
    testing.assert_close(got.double().cpu(), want.cpu(), dtype=logits.dtype)
    # The closed-form backward op agrees with autograd through the reference.
    closed = ref.topk_gating_backward(g.double(), logits.double(), want_out.expert_ids, kw.get("score_func", "softmax"),
                                      kw.get("renormalize", True), kw.get("routed_scaling_factor", 1.0))
    testing.assert_close(closed, want)


def test_gating_gradcheck_cpu():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for cfg in (dict(), dict(score_func="sigmoid"), dict(score_func="topk_softmax"), dict(renormalize=False)):
        for backend in ("reference", "cpu"):
            if ops.topk_gating.reason(backend, logits, 2, **cfg) is not None:
                continue
            with backends.force(backend):
                assert torch.autograd.gradcheck(lambda t, c=cfg: ops.topk_gating(t, 2, **c).weights, (logits,))


def _routing(T, E, k, device, skew=False):
    logits = torch.randn(T, E, device=device)
    if skew:
        logits[:, 0] += 10  # every token's first choice is expert 0
    return ref.topk_gating(logits, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 1), (9, 4, 2), (0, 4, 2)], ids=lambda s: "T%d-E%d-k%d" % s)
def test_permute_unpermute_match_reference(backend, device_for, dtype, shape):
    T, E, k = shape
    H = 5
    r = _routing(T, E, k, device_for)
    x = torch.randn(T, H, device=device_for, dtype=dtype)
    y = torch.randn(T * k, H, device=device_for, dtype=dtype)
    testing.backend_or_skip(ops.permute_tokens, backend, x, r.sorted_slots, k)
    testing.backend_or_skip(ops.unpermute_tokens, backend, y, r.slot_positions, r.weights)
    with backends.force(backend):
        xs = ops.permute_tokens(x, r.sorted_slots, k)
        comb = ops.unpermute_tokens(y, r.slot_positions, r.weights)
        summed = ops.unpermute_tokens(y, r.slot_positions)
    assert torch.equal(xs, ref.permute_tokens(x, r.sorted_slots, k))
    testing.assert_close(comb, ref.unpermute_tokens(y, r.slot_positions, r.weights))
    testing.assert_close(summed, ref.unpermute_tokens(y, r.slot_positions))


def test_permute_unpermute_gradients(backend, device_for):
    T, E, k, H = 7, 4, 2, 3
    r = _routing(T, E, k, device_for)
    dt = torch.float64 if backend != "triton" else torch.float32
    x = torch.randn(T, H, device=device_for, dtype=dt, requires_grad=True)
    y = torch.randn(T * k, H, device=device_for, dtype=dt, requires_grad=True)
    w = r.weights.to(dt).clone().requires_grad_()
    testing.backend_or_skip(ops.unpermute_tokens, backend, y, r.slot_positions, w)
    with backends.force(backend):
        a = ops.permute_tokens(x, r.sorted_slots, k)
        b = ops.unpermute_tokens(y, r.slot_positions, w)
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    got = torch.autograd.grad([a, b], [x, y, w], [ga, gb])
    want = torch.autograd.grad([ref.permute_tokens(x, r.sorted_slots, k), ref.unpermute_tokens(y, r.slot_positions, w)],
                               [x, y, w], [ga, gb])
    for g1, g2 in zip(got, want):
        testing.assert_close(g1, g2)
    if dt == torch.float64:
        with backends.force(backend):
            assert torch.autograd.gradcheck(lambda x_, y_, w_: (ops.permute_tokens(x_, r.sorted_slots, k),
                                                                ops.unpermute_tokens(y_, r.slot_positions, w_)),
                                            (x, y, w))


def _offsets(counts, device):
    return torch.cumsum(torch.tensor(counts, device=device), 0)


GROUPS = {"uneven": [3, 0, 5, 1], "one_expert": [0, 9, 0, 0], "all_empty": [0, 0, 0, 0], "size1": [1, 0, 0, 0],
          "tail_rows": [2, 2, 0, 1]}  # tail_rows: M exceeds offsets[-1] (dropped slots at the end)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("groups", list(GROUPS))
def test_grouped_mm_matches_reference(backend, device_for, trans_b, groups):
    counts = GROUPS[groups]
    M = sum(counts) + (3 if groups == "tail_rows" else 0)
    K, N, E = 5, 7, len(counts)
    a = torch.randn(M, K, device=device_for)
    b = torch.randn(E, N, K, device=device_for) if trans_b else torch.randn(E, K, N, device=device_for)
    off = _offsets(counts, device_for)
    testing.backend_or_skip(ops.grouped_mm, backend, a, b, off, trans_b)
    with backends.force(backend):
        out = ops.grouped_mm(a, b, off, trans_b)
    want = ref.grouped_mm(a.double(), b.double(), off, trans_b)
    testing.assert_close(out.double(), want, dtype=torch.float32)
    if groups == "tail_rows":
        assert (out[sum(counts):] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_grouped_mm_low_precision_error_bounded(backend, device_for, dtype):
    counts = [20, 0, 13, 31]
    a = torch.randn(sum(counts), 64, device=device_for)
    b = torch.randn(4, 48, 64, device=device_for) / 8
    off = _offsets(counts, device_for)
    testing.backend_or_skip(ops.grouped_mm, backend, a.to(dtype), b.to(dtype), off, True)
    with backends.force(backend):
        out = ops.grouped_mm(a.to(dtype), b.to(dtype), off, True)
    exact = ref.grouped_mm(a.to(dtype).double(), b.to(dtype).double(), off, True)
    # PyTorch in that precision: one matmul per group.
    starts = [0] + off.tolist()[:-1]
    torch_lp = torch.cat([a.to(dtype)[s:e] @ b.to(dtype)[i].t() for i, (s, e) in enumerate(zip(starts, off.tolist()))])
    testing.assert_error_bounded(out, exact, torch_lp, floor=1e-3, msg=f"grouped_mm {dtype}")


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_mm_gradients(backend, device_for, trans_b):
    counts = [3, 0, 4, 2]
    M, K, N, E = sum(counts) + 1, 4, 6, len(counts)
    dt = torch.float64 if backend != "triton" else torch.float32
    a = torch.randn(M, K, device=device_for, dtype=dt, requires_grad=True)
    shape = (E, N, K) if trans_b else (E, K, N)
    b = torch.randn(shape, device=device_for, dtype=dt, requires_grad=True)
    off = _offsets(counts, device_for)
    testing.backend_or_skip(ops.grouped_mm, backend, a, b, off, trans_b)
    with backends.force(backend):
        out = ops.grouped_mm(a, b, off, trans_b)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [a, b], g)
    want = torch.autograd.grad(ref.grouped_mm(a, b, off, trans_b), [a, b], g)
    for x, y in zip(got, want):
        testing.assert_close(x, y)
    assert got[1][1].abs().sum() == 0  # the expert without rows gets no gradient
    if dt == torch.float64:
        with backends.force(backend):
            assert torch.autograd.gradcheck(lambda a_, b_: ops.grouped_mm(a_, b_, off, trans_b), (a, b))
    with backends.force(backend):  # a frozen weight: only dA is computed
        (ga,) = torch.autograd.grad(ops.grouped_mm(a, b.detach(), off, trans_b), [a], g)
    testing.assert_close(ga, want[0])


def _native_ops():
    if not moe_ops.STATE["native"]:
        pytest.skip("the compiled library has no MoE ops")
    return torch.ops.fastnn


def _triton_ops():
    if not moe_ops.STATE["triton"]:
        pytest.skip("triton is not installed")
    return torch.ops.fastnn


@pytest.mark.parametrize("family", ["native", "triton"])
def test_opcheck(family):
    ns = _native_ops() if family == "native" else _triton_ops()
    p = "" if family == "native" else "triton_"
    dt = torch.float64 if family == "native" else torch.float32
    if family == "triton" and not torch.cuda.is_available():
        # Under the interpreter a triton_op's fake-tensor run launches the interpreter on fake
        # storage, which cannot work; the fake-tensor and AOT tests of these ops run on a GPU.
        def check(op, args):
            testing.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
    else:
        check = testing.opcheck
    logits = torch.randn(6, 8, dtype=dt, requires_grad=True)
    check(getattr(ns, p + "topk_gating"), (logits, 2, "softmax", True, None, 1, 1, "max", 1.0, 0.0, "drop"))
    check(getattr(ns, p + "topk_gating"),
                    (logits, 2, "sigmoid", True, torch.randn(8, dtype=dt), 4, 2, "top2_sum", 2.0, 0.0, "drop"))
    r = ref.topk_gating(logits.detach(), 2)
    x = torch.randn(6, 4, dtype=dt, requires_grad=True)
    y = torch.randn(12, 4, dtype=dt, requires_grad=True)
    w = r.weights.to(dt).requires_grad_()
    check(getattr(ns, p + "permute_tokens"), (x, r.sorted_slots, 2))
    check(getattr(ns, p + "unpermute_tokens"), (y, r.slot_positions, w))
    a = torch.randn(12, 4, dtype=dt, requires_grad=True)
    b = torch.randn(8, 5, 4, dtype=dt, requires_grad=True)
    check(getattr(ns, p + "grouped_mm"), (a, b, torch.cumsum(r.tokens_per_expert, 0), True))


def test_native_capacity_opcheck():
    ns = _native_ops()
    logits = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    testing.opcheck(ns.topk_gating, (logits, 2, "softmax", True, None, 1, 1, "max", 1.0, 0.5, "next_choice"))


BAD_GATING = [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(score_func="tanh"), "score_func"),
    (dict(num_groups=3), "num_groups"),
    (dict(num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_groups=4, topk_groups=1, top_k=3), "top_k"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(drop_policy="reroute"), "drop_policy"),
    (dict(selection_bias=torch.zeros(7)), "selection_bias"),
    (dict(group_score="mean"), "group_score"),
]


@pytest.mark.parametrize("bad", BAD_GATING, ids=lambda b: b[1] + "-" + "-".join(map(str, b[0].values()))[:20])
def test_gating_bad_arguments(backend, device_for, bad):
    kw, arg = bad
    kw = dict(kw)
    top_k = kw.pop("top_k", 2)
    logits = torch.randn(4, 8, device=device_for)
    if "selection_bias" in kw:
        kw["selection_bias"] = kw["selection_bias"].to(device_for)
    if ops.topk_gating.reason(backend, logits, 2) is not None:
        pytest.skip(f"{backend}: {ops.topk_gating.reason(backend, logits, 2)}")
    with backends.force(backend), pytest.raises(ValueError, match=f"{arg}'"):
        ops.topk_gating(logits, top_k, **kw)


def test_bad_tensor_arguments(backend, device_for):
    r = _routing(4, 4, 2, device_for)
    x = torch.randn(4, 3, device=device_for)
    if ops.grouped_mm.reason(backend, x, torch.randn(4, 3, 3, device=device_for), r.tokens_per_expert) is not None:
        pytest.skip(f"{backend} cannot run here")
    with backends.force(backend):
        with pytest.raises(ValueError, match="logits'"):
            ops.topk_gating(torch.randint(0, 3, (4, 4), device=device_for), 2)
        with pytest.raises(ValueError, match="sorted_slots'"):
            ops.permute_tokens(x, r.sorted_slots[:-1], 2)
        with pytest.raises(ValueError, match="sorted_slots'"):
            ops.permute_tokens(x, r.sorted_slots.int(), 2)
        with pytest.raises(ValueError, match="weights'"):
            ops.unpermute_tokens(torch.randn(8, 3, device=device_for), r.slot_positions, r.weights[:, :1])
        with pytest.raises(ValueError, match=": b'"):  # mismatched dtypes
            ops.grouped_mm(torch.randn(8, 3, device=device_for), torch.randn(4, 3, 5, device=device_for).double(),
                           torch.cumsum(r.tokens_per_expert, 0))
        with pytest.raises(ValueError, match=": b'"):  # mismatched K
            ops.grouped_mm(torch.randn(8, 3, device=device_for), torch.randn(4, 4, 5, device=device_for),
                           torch.cumsum(r.tokens_per_expert, 0))
        with pytest.raises(ValueError, match="offsets'"):
            ops.grouped_mm(torch.randn(8, 3, device=device_for), torch.randn(4, 3, 5, device=device_for),
                           torch.cumsum(r.tokens_per_expert, 0)[:3])


def test_cpu_rejects_bad_offsets():
    if ops.grouped_mm.reason("cpu", torch.randn(1, 1), torch.randn(1, 1, 1), torch.ones(1, dtype=torch.long)):
        pytest.skip("no compiled CPU kernels")
    with backends.force("cpu"), pytest.raises(ValueError, match="offsets'"):
        ops.grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 4), torch.tensor([4, 2]))


def test_losses_match_hugging_face():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    T, E, k = 13, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    r = ref.topk_gating(logits, k)
    ours = ops.load_balancing_loss(logits, r.tokens_per_expert)
    theirs = load_balancing_loss_func((logits,), E, k)
    # Hugging Face computes in float32 whatever the logits' dtype.
    testing.assert_close(ours, theirs.to(ours.dtype), dtype=torch.float32)
    (g1,) = torch.autograd.grad(ours, logits)
    (g2,) = torch.autograd.grad(theirs, logits)
    testing.assert_close(g1, g2.to(g1.dtype), dtype=torch.float32)
    z = ops.router_z_loss(logits)
    testing.assert_close(z, torch.logsumexp(logits, -1).pow(2).mean())
    assert torch.autograd.gradcheck(ops.router_z_loss, (logits,))
    assert torch.autograd.gradcheck(lambda t: ops.load_balancing_loss(t, r.tokens_per_expert, "sigmoid"), (logits,))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("routing", [dict(), dict(capacity_factor=0.5), dict(skew=True)],
                         ids=["plain", "dropped", "skew"])
@pytest.mark.parametrize("T", [0, 1, 70])
def test_moe_mlp_matches_reference(backend, device_for, activation, routing, T):
    """The fused inference op (CPU) against the composed reference: tiles spanning experts, a
    dropped slot's row, experts without tokens, an empty batch."""
    E, k, H, I = 4, 2, 6, 5
    logits = torch.randn(T, E, device=device_for)
    if routing.get("skew"):
        logits[:, 1] += 20
    r = ref.topk_gating(logits, k, capacity_factor=routing.get("capacity_factor", 0.0))
    x = torch.randn(T, H, device=device_for)
    w1 = torch.randn(E, 2 * I, H, device=device_for)
    w2 = torch.randn(E, H, I, device=device_for)
    args = (x, r.sorted_slots, r.tokens_per_expert, r.slot_positions, r.weights, w1, w2, activation)
    testing.backend_or_skip(ops.moe.moe_mlp, backend, *args)
    got = ops.moe.moe_mlp.call(backend, *args)
    testing.assert_close(got, ref.moe_mlp(*args))


def test_moe_mlp_with_gradients_composes_the_backends_ops(backend, device_for):
    """With gradients, every backend's moe_mlp runs that backend's differentiable ops (the fused
    kernels have no backward), so fastnn.backends alone chooses the path."""
    E, k, H, I = 3, 2, 4, 3
    r = ref.topk_gating(torch.randn(5, E, device=device_for), k)
    x = torch.randn(5, H, device=device_for, requires_grad=True)
    w1 = torch.randn(E, 2 * I, H, device=device_for, requires_grad=True)
    w2 = torch.randn(E, H, I, device=device_for, requires_grad=True)
    args = (x, r.sorted_slots, r.tokens_per_expert, r.slot_positions, r.weights, w1, w2, "silu")
    testing.backend_or_skip(ops.moe.moe_mlp, backend, *args)
    got = ops.moe.moe_mlp.call(backend, *args)
    want = ref.moe_mlp(*args)
    testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), [x, w1, w2]), torch.autograd.grad(want.sum(), [x, w1, w2])):
        testing.assert_close(a, b)

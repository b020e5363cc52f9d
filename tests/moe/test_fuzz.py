"""Property-based fuzzing of the MoE ops (hypothesis, the global profile of tests/conftest.py): every
available backend agrees with the reference, forward and backward, or raises a clear Python error.

Shapes include 0, 1 and odd sizes, empty experts and all tokens on one expert; logits take NaN,
+-inf and huge values; inputs come transposed, sliced or expanded; index tensors are valid,
duplicated or out of range. Logits are small integers (plus special values) so that ties are exact
ties on every backend (then the lower expert index wins everywhere) rather than rounding accidents.
Probes with bad indices run in a subprocess, where a crash fails the test instead of the session.
"""

import textwrap

import pytest
import torch

from fastnn import backends, ops, testing
from fastnn.ops import moe as moe_ops
from fastnn.reference import moe as ref

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given = hypothesis.given

pytestmark = pytest.mark.fuzz
CPU_BACKENDS = ("reference", "cpu", "triton")
ERRORS = (ValueError, IndexError, TypeError, RuntimeError, backends.BackendError)
SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]


def _available(op, *args, **kwargs):
    return [b for b in CPU_BACKENDS if op.reason(b, *args, **kwargs) is None]


def _layout_of(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` [R, C] in another memory layout."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":
        return torch.cat([t, t], dim=1)[:, : t.shape[1]]
    return t


@st.composite
def gating_case(draw):
    E = draw(st.sampled_from([1, 2, 3, 4, 8]))
    T = draw(st.sampled_from([0, 1, 2, 5, 9]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if E % g == 0]))
    topk_groups = draw(st.integers(1, groups))
    k = draw(st.integers(1, topk_groups * (E // groups)))
    vals = draw(st.lists(st.integers(-6, 6), min_size=T * E, max_size=T * E))
    logits = torch.tensor(vals, dtype=torch.float32).view(T, E)
    if T and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            logits[draw(st.integers(0, T - 1)), draw(st.integers(0, E - 1))] = draw(st.sampled_from(SPECIAL))
    if T and draw(st.booleans()):
        logits[draw(st.integers(0, T - 1))] = 5.0  # a tie across a whole row
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    kw = dict(score_func=draw(st.sampled_from(ref.SCORE_FUNCS)), renormalize=draw(st.booleans()),
              num_groups=groups, topk_groups=topk_groups, group_score=draw(st.sampled_from(ref.GROUP_SCORES)),
              capacity_factor=draw(st.sampled_from([0.0, 0.5, 1.0, float("inf")])),
              drop_policy=draw(st.sampled_from(ref.DROP_POLICIES)))
    return _layout_of(logits.to(dtype), draw(st.sampled_from(["contiguous", "transposed", "sliced"]))), k, kw


@given(gating_case())
def test_topk_gating_matches_reference(case):
    logits, k, kw = case
    want = ref.topk_gating(logits, k, **kw)
    for backend in _available(ops.topk_gating, logits, k, **kw):
        with backends.force(backend):
            got = ops.topk_gating(logits, k, **kw)
        for name in ("expert_ids", "tokens_per_expert", "sorted_slots", "slot_positions"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (backend, name)
        assert torch.equal(got.weights.isnan(), want.weights.isnan()), backend
        testing.assert_close(got.weights.nan_to_num().to(want.weights.dtype), want.weights.nan_to_num(),
                             dtype=torch.float32, msg=backend)


@given(gating_case())
def test_topk_gating_backward_matches_reference(case):
    logits, k, kw = case
    if logits.dtype == torch.bfloat16 or not torch.isfinite(logits).all():
        return  # gradients through NaN/inf logits are NaN on every path; bf16 grads are rounding-bound
    x = logits.detach().clone().requires_grad_()
    want_w = ref.topk_gating(x, k, **kw).weights
    g = torch.randn(want_w.shape, dtype=want_w.dtype)
    (want,) = torch.autograd.grad(want_w, x, g) if want_w.numel() else (torch.zeros_like(x),)
    for backend in _available(ops.topk_gating, logits, k, **kw):
        x = logits.detach().clone().requires_grad_()
        with backends.force(backend):
            w = ops.topk_gating(x, k, **kw).weights
        (got,) = torch.autograd.grad(w, x, g.to(w.dtype)) if w.numel() else (torch.zeros_like(x),)
        testing.assert_close(got.to(want.dtype), want, dtype=torch.float32, msg=backend)


@st.composite
def routing_case(draw):
    T = draw(st.sampled_from([0, 1, 3, 6]))
    k = draw(st.integers(1, 3))
    H = draw(st.sampled_from([1, 3, 8]))
    E = draw(st.integers(1, 4))
    ids = torch.tensor(draw(st.lists(st.integers(0, E - 1), min_size=T * k, max_size=T * k)), dtype=torch.long)
    if draw(st.booleans()):
        ids = torch.zeros_like(ids)  # every token on one expert
    g = ref._layout(ids.view(T, k), E)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = _layout_of(torch.randn(T, H, dtype=dtype), draw(st.sampled_from(["contiguous", "transposed", "sliced"])))
    if T == 1 and draw(st.booleans()):
        x = torch.randn(1, 1, dtype=dtype).expand(1, H)
    weights = torch.rand(T, k, dtype=dtype) if draw(st.booleans()) else None
    return x, k, E, g, weights


@given(routing_case())
def test_permute_unpermute_match_reference_with_gradients(case):
    x, k, E, (counts, slots, pos), weights = case
    T, H = x.shape

    def run(fn):
        xx = x.detach().clone().requires_grad_()
        ww = weights.detach().clone().requires_grad_() if weights is not None else None
        xs = fn("permute", xx, slots, k)
        out = fn("unpermute", xs * 2 + 1, pos, ww)
        grads = torch.autograd.grad(out.square().sum(), [xx] + ([ww] if ww is not None else []), allow_unused=True) \
            if out.numel() else []
        return [xs, out] + [g for g in grads if g is not None]

    want = run(lambda which, *a: ref.permute_tokens(*a) if which == "permute" else ref.unpermute_tokens(*a))
    for backend in _available(ops.unpermute_tokens, x, pos, weights):
        with backends.force(backend):
            got = run(lambda which, *a: ops.permute_tokens(*a) if which == "permute" else ops.unpermute_tokens(*a))
        for a, b in zip(got, want):
            testing.assert_close(a, b, msg=backend)


@given(routing_case(), st.sampled_from(["equal", "transposed_b", "sliced_a"]))
def test_grouped_mm_matches_reference_with_gradients(case, layout):
    x, k, E, (counts, slots, pos), _ = case
    a = torch.randn(slots.shape[0], x.shape[1], dtype=x.dtype)
    if layout == "sliced_a":
        a = torch.cat([a, a], dim=1)[:, : x.shape[1]]
    trans_b = layout == "transposed_b"
    b = torch.randn(E, 5, x.shape[1], dtype=x.dtype) if trans_b else torch.randn(E, x.shape[1], 5, dtype=x.dtype)
    offsets = torch.cumsum(counts, 0)
    if counts.numel() and torch.rand(()) < 0.3:
        offsets[-1] -= min(int(offsets[-1]), 1)  # a dropped row past the last group
        offsets = torch.minimum(offsets, offsets[-1])

    def run(fn):
        aa, bb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        out = fn(aa, bb, offsets, trans_b)
        return [out] + list(torch.autograd.grad(out.square().sum(), [aa, bb])) if out.numel() else [out]

    want = run(ref.grouped_mm)
    for backend in _available(ops.grouped_mm, a, b, offsets, trans_b):
        with backends.force(backend):
            got = run(ops.grouped_mm)
        for g, w in zip(got, want):
            testing.assert_close(g, w, msg=backend)


# ---------------------------------------------------------------------------------------------
# Bad index tensors, in a subprocess: every backend raises fastnn's error, none crashes.

def bad_index_property(max_examples: int) -> None:
    """Run in a subprocess by test_bad_indices_raise_clear_errors (a crash must not kill pytest)."""
    @hypothesis.settings(max_examples=max_examples, deadline=None, derandomize=True)
    @given(routing_case(), st.sampled_from(["duplicate", "negative", "huge", "offsets", "counts"]),
           st.sampled_from(CPU_BACKENDS))
    def probe(case, corruption, backend):
        x, k, E, (counts, slots, pos), weights = case
        T, H = x.shape
        if T * k < 2 and corruption == "duplicate":
            return
        slots, pos, counts = slots.clone(), pos.clone(), counts.clone()
        if corruption == "duplicate":
            slots[0] = slots[1]
            pos.view(-1)[0] = pos.view(-1)[1]
        elif corruption == "negative" and T:
            slots[-1], pos.view(-1)[-1] = -1, -3
        elif corruption == "huge" and T:
            slots[0], pos.view(-1)[0] = 2**62, 2**40
        elif corruption == "offsets":
            counts[0] = -1 if E > 1 or T == 0 else T * k + 1
        else:
            counts[-1] += T * k + 1
        w = weights if weights is not None else torch.ones(T, k, dtype=x.dtype)
        y = torch.randn(T * k, H, dtype=x.dtype)
        mlp = lambda: moe_ops.moe_mlp(x, slots, counts, pos, w, torch.randn(E, 4, H, dtype=x.dtype),  # noqa: E731
                                      torch.randn(E, H, 2, dtype=x.dtype))
        if corruption in ("offsets", "counts"):
            probes = [lambda: ops.grouped_mm(y, torch.randn(E, H, 2, dtype=x.dtype), torch.cumsum(counts, 0)), mlp]
        else:
            probes = [lambda: ops.permute_tokens(x, slots, k), lambda: ops.unpermute_tokens(y, pos, w), mlp]
        for p in probes:
            try:
                with torch.no_grad(), backends.force(backend):
                    p()
            except ERRORS as e:
                assert "fastnn" in str(e), f"{type(e).__name__}: {e}"

    probe()


def test_bad_indices_raise_clear_errors():
    n = hypothesis.settings.default.max_examples
    proc = testing.run_isolated(textwrap.dedent(f"""
        from tests.moe.test_fuzz import bad_index_property
        bad_index_property({n})
    """))
    assert proc.returncode >= 0, f"crashed with signal {-proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]

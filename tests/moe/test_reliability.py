"""Bad input to the MoE ops: a clear error naming the argument on every backend, never a crash or a
silent wrong answer; infinite capacity; the NaN semantics of topk_gating on every backend. Probes
that used to crash the interpreter run in a subprocess (fastnn.testing.run_isolated)."""

import textwrap

import pytest
import torch

import fastnn
from fastnn import backends, ops, testing
from fastnn.ops import moe as moe_ops
from fastnn.reference import moe as ref

PY_BACKENDS = ("reference", "cpu", "triton")  # the backends that run on CPU tensors here


def _isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter; fail on a crash (negative return code) or an error."""
    proc = testing.run_isolated(textwrap.dedent(code))
    assert proc.returncode >= 0, f"crashed with signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


_PROBE_LOOP = """
for p in probes:
    try:
        p()
        print("no error")
    except ValueError as e:
        assert "fastnn: argument" in str(e), e
        print("ok")
"""


def _probes_raise(setup: str, n: int) -> None:
    """``setup`` defines ``probes``, n callables that must each raise fastnn's ValueError (in a
    subprocess: any of them used to crash the interpreter)."""
    out = _isolated(textwrap.dedent(setup) + _PROBE_LOOP)
    assert "no error" not in out and out.count("ok") == n, out


def _raises_clear(fn, *words):
    with pytest.raises((ValueError, IndexError, TypeError, backends.BackendError)) as info:
        fn()
    msg = str(info.value)
    assert "fastnn" in msg and all(w in msg for w in words), msg


def _skip_unavailable(op, backend, *args, **kwargs):
    why = op.reason(backend, *args, **kwargs)
    if why is not None:
        pytest.skip(f"{op.name} on {backend}: {why}")


# ---------------------------------------------------------------------------------------------
# Duplicated / out-of-range slots (used to be a SIGSEGV in the CPU backward)

def _routing(T=6, E=4, k=2):
    return ref.topk_gating(torch.randn(T, E), k)


@pytest.mark.parametrize("backend", PY_BACKENDS)
def test_duplicated_slots_are_rejected_on_every_backend(backend):
    r = _routing()
    pos = r.slot_positions.clone()
    pos[0, 0] = pos[1, 0]  # in range, not a permutation
    slots = r.sorted_slots.clone()
    slots[0] = slots[1]
    y, x = torch.randn(12, 8), torch.randn(6, 8)
    _skip_unavailable(ops.unpermute_tokens, backend, y, pos, r.weights)
    with backends.force(backend):
        _raises_clear(lambda: ops.unpermute_tokens(y, pos, r.weights), "slot_positions", "permutation")
        _raises_clear(lambda: ops.permute_tokens(x, slots, 2), "sorted_slots", "permutation")
        _raises_clear(lambda: ops.permute_tokens(x, slots.clamp(max=5) + 7, 2), "sorted_slots", "[0, 12)")


def test_duplicated_slot_backward_does_not_crash():
    _probes_raise("""
        import torch, fastnn
        from fastnn import backends, ops
        from fastnn.reference import moe as ref
        r = ref.topk_gating(torch.randn(6, 4), 2)
        pos = r.slot_positions.clone(); pos[0, 0] = pos[1, 0]
        slots = r.sorted_slots.clone(); slots[0] = slots[1]
        y = torch.randn(12, 8, requires_grad=True)

        def probe(backend, fn):
            with backends.force(backend):
                fn().sum().backward()

        probes = [lambda b=b, fn=fn: probe(b, fn) for b in ("cpu", "reference")
                  for fn in (lambda: ops.unpermute_tokens(y, pos, r.weights),
                             lambda: ops.permute_tokens(y[:6], slots, 2))]
    """, 4)


def _weights_from_ids(logits, ids, score_func, renormalize, scale):
    """The gating weights as a function of the logits for fixed expert ids, duplicates and -1
    (dropped) included: w_j = scale * a[e_j] / sum_j a[e_j] over the kept slots j."""
    kept = ids >= 0
    if score_func == "topk_softmax":
        chosen = logits.gather(1, ids.clamp(min=0)).masked_fill(~kept, float("-inf"))
        return scale * torch.where(kept, torch.softmax(chosen, dim=-1), 0.0)
    a = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    s = torch.where(kept, a.gather(1, ids.clamp(min=0)), 0.0)
    return scale * (s / s.sum(dim=-1, keepdim=True) if renormalize else s)


@pytest.mark.parametrize("score_func,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                                    ("sigmoid", False), ("topk_softmax", True)])
def test_gating_backward_with_duplicate_expert_ids_is_the_exact_gradient(score_func, renormalize):
    """topk_gating never routes a token to one expert twice, but its public backward op takes any
    ids: a duplicated id is a slot like any other, and every implementation (the compiled CPU op,
    the composition the CUDA and Triton ops run, the reference) gives autograd's gradient."""
    from fastnn.ops.moe._library import _gating_backward_cuda

    torch.manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64)
    ids = torch.tensor([[1, 1, 3], [0, 2, 2], [4, 4, 4], [2, -1, 2]])
    g = torch.randn(4, 3, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(_weights_from_ids(x, ids, score_func, renormalize, 1.5), x, g)
    args = (g, logits, ids, score_func, renormalize, 1.5)
    got = {"reference": ref.topk_gating_backward(*args), "cuda composition": _gating_backward_cuda(*args)}
    if fastnn.build_info()["extension"]:
        fastnn._extension.load()
        got["cpu"] = torch.ops.fastnn.topk_gating_backward(*args)
    for name, grad in got.items():
        testing.assert_close(grad, want, msg=name)


def test_compiled_backward_ops_check_their_indices():
    """torch.ops.fastnn.*_backward are public: a bad index is an error, not a segfault."""
    _probes_raise("""
        import torch, fastnn
        from fastnn.reference import moe as ref
        fastnn._extension.load()
        ns = torch.ops.fastnn
        r = ref.topk_gating(torch.randn(6, 4), 2)
        y, g = torch.randn(12, 8), torch.randn(6, 8)
        dup = r.sorted_slots.clone(); dup[0] = dup[1]
        far = r.sorted_slots.clone(); far[3] = 10**9
        bad_ids = r.expert_ids.clone(); bad_ids[2, 1] = 10**9
        probes = [
            lambda: ns.unpermute_tokens_backward(g, y, r.slot_positions, r.weights, dup),
            lambda: ns.unpermute_tokens_backward(g, y, r.slot_positions, r.weights, far),
            lambda: ns.unpermute_tokens_backward(g, y, r.slot_positions * 1000, r.weights, r.sorted_slots),
            lambda: ns.topk_gating_backward(torch.randn(6, 2), torch.randn(6, 4), bad_ids, "softmax", True, 1.0),
            lambda: ns.topk_gating_backward(torch.randn(6, 2), torch.randn(6, 4), bad_ids - 10**9 - 5, "softmax",
                                            True, 1.0),
            lambda: ns.grouped_mm_backward(torch.randn(3, 3), torch.randn(5, 4), torch.randn(2, 4, 3),
                                           torch.tensor([2, 5]), False, True, True),
        ]
    """, 6)


# ---------------------------------------------------------------------------------------------
# Index arguments of grouped_mm / moe_mlp (used to crash the Triton interpreter or pass silently)

BAD_OFFSETS = [[-1, 5, 5, 9], [3, 2, 9, 9], [0, 0, 0, 10], [9, 9, 9, 9 + 1]]


@pytest.mark.parametrize("backend", PY_BACKENDS)
@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=str)
def test_grouped_mm_rejects_bad_offsets(backend, offsets):
    a, b = torch.randn(9, 8), torch.randn(4, 8, 8)
    off = torch.tensor(offsets)
    _skip_unavailable(ops.grouped_mm, backend, a, b, off)
    with backends.force(backend):
        _raises_clear(lambda: ops.grouped_mm(a, b, off), "offsets", "non-decreasing")


def _mlp_args(T=5, H=8, inter=4, E=3, k=2):
    r = ref.topk_gating(torch.randn(T, E), k)
    return dict(x=torch.randn(T, H), sorted_slots=r.sorted_slots, tokens_per_expert=r.tokens_per_expert,
                slot_positions=r.slot_positions, weights=r.weights.float(),
                gate_up_proj=torch.randn(E, 2 * inter, H), down_proj=torch.randn(E, H, inter), activation="silu")


def _mlp_bad_inputs():
    a = _mlp_args()
    slots = a["sorted_slots"].clone()
    slots[2] = 1000
    return {
        "sorted_slots": dict(a, sorted_slots=slots),
        "tokens_per_expert": dict(a, tokens_per_expert=a["tokens_per_expert"] + 7),
        "weights": dict(a, weights=torch.ones(1, 1)),
        "slot_positions": dict(a, slot_positions=torch.ones(1, 1, dtype=torch.long)),
    }


@pytest.mark.parametrize("backend", PY_BACKENDS)
@pytest.mark.parametrize("arg", list(_mlp_bad_inputs()))
def test_moe_mlp_rejects_bad_routing(backend, arg):
    kw = _mlp_bad_inputs()[arg]
    good = _mlp_args()
    _skip_unavailable(moe_ops.moe_mlp, backend, **good)
    with torch.no_grad(), backends.force(backend):
        _raises_clear(lambda: moe_ops.moe_mlp(**kw), arg)


def test_compiled_moe_mlp_checks_weights_and_positions():
    """torch.ops.fastnn.moe_mlp directly (no Python checks): weights [1, 1] was an out-of-bounds read."""
    _probes_raise("""
        import torch, fastnn
        from fastnn.reference import moe as ref
        fastnn._extension.load()
        r = ref.topk_gating(torch.randn(5, 3), 2)
        x, w1, w2 = torch.randn(5, 8), torch.randn(3, 8, 8), torch.randn(3, 8, 4)
        base = [x, r.sorted_slots, r.tokens_per_expert, r.slot_positions, r.weights, w1, w2, "silu"]
        far = r.sorted_slots.clone(); far[0] = 10**6
        probes = []
        for i, bad in ((4, torch.ones(1, 1)), (3, torch.ones(1, 1, dtype=torch.long)), (1, far)):
            args = list(base); args[i] = bad
            probes.append(lambda args=args: torch.ops.fastnn.moe_mlp(*args))
    """, 3)


# ---------------------------------------------------------------------------------------------
# capacity_factor=inf means no capacity limit (it used to drop 94% of the slots on the CPU)

@pytest.mark.parametrize("backend", PY_BACKENDS)
@pytest.mark.parametrize("factor", [float("inf"), 1e19, 1e308])
def test_infinite_capacity_is_no_limit(backend, factor):
    logits = torch.randn(33, 8)
    _skip_unavailable(ops.topk_gating, backend, logits, 2, capacity_factor=factor)
    with backends.force(backend):
        got = ops.topk_gating(logits, 2, capacity_factor=factor)
    want = ref.topk_gating(logits, 2)
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert int(got.tokens_per_expert.sum()) == 66
    testing.assert_close(got.weights, want.weights)


def test_expert_capacity_saturates():
    assert ref.expert_capacity(10, 4, 2, float("inf")) == 0
    assert ref.expert_capacity(10, 4, 2, 1e308) == 0
    assert ref.expert_capacity(10, 4, 2, 0.5) == 3
    assert ref.expert_capacity(10, 1, 2, 1.0) == 0  # capacity T*k: nothing can be dropped
    _raises_clear(lambda: ops.topk_gating(torch.randn(3, 4), 1, capacity_factor=float("nan")), "capacity_factor")


# ---------------------------------------------------------------------------------------------
# NaN semantics: one answer on every backend (reference/moe.py's conventions)

def _nan_logits(E=8):
    torch.manual_seed(1)
    x = torch.randn(9, E)
    x[1, 3] = float("nan")          # one NaN
    x[2, :] = float("nan")          # a whole row
    x[3, :] = float("-inf")         # all -inf
    x[4, 0] = float("inf")          # +inf
    x[5, 5] = float("-inf")
    return x


ROUTERS = {"softmax": dict(), "topk_softmax": dict(score_func="topk_softmax"),
           "sigmoid": dict(score_func="sigmoid"), "sigmoid_raw": dict(score_func="sigmoid", renormalize=False),
           "grouped": dict(num_groups=4, topk_groups=2), "grouped_top2": dict(num_groups=4, topk_groups=2,
                                                                              group_score="top2_sum",
                                                                              score_func="sigmoid")}


@pytest.mark.parametrize("backend", PY_BACKENDS)
@pytest.mark.parametrize("router", list(ROUTERS))
def test_nan_and_inf_logits_route_alike_on_every_backend(backend, router):
    x = _nan_logits()
    kw = ROUTERS[router]
    _skip_unavailable(ops.topk_gating, backend, x, 3, **kw)
    with backends.force(backend):
        got = ops.topk_gating(x, 3, **kw)
    want = ref.topk_gating(x, 3, **kw)
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert torch.equal(got.sorted_slots, want.sorted_slots)
    assert torch.equal(got.tokens_per_expert, want.tokens_per_expert)
    assert torch.equal(got.weights.isnan(), want.weights.isnan()), (got.weights, want.weights)
    testing.assert_close(got.weights.nan_to_num(), want.weights.nan_to_num())
    if kw.get("score_func", "softmax") != "sigmoid":
        assert got.weights[1].isnan().all() and got.weights[2].isnan().all()


def test_triton_grouped_routing_of_an_all_nan_row_stays_in_bounds():
    """Group selection by repeated argmax used to pick group 0 again for a row of NaN group scores and
    store expert id E (counts[E] written past the end)."""
    x = torch.full((5, 16), float("nan"))
    _skip_unavailable(ops.topk_gating, "triton", x, 6, num_groups=4, topk_groups=2)
    with backends.force("triton"):
        got = ops.topk_gating(x, 6, num_groups=4, topk_groups=2)  # needs experts of two distinct groups
    assert int(got.expert_ids.max()) < 16 and int(got.tokens_per_expert.sum()) == 30
    assert got.expert_ids[0].tolist() == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# The layout's counting sort over several tiles, with skewed and empty experts

@pytest.mark.parametrize("shape", [(300, 5, 3), (129, 1, 1), (700, 16, 4)], ids=str)
def test_layout_counting_sort_matches_reference(shape):
    T, E, k = shape
    logits = torch.randn(T, E)
    logits[: T // 2, 0] += 10  # half the tokens on expert 0
    if E > 2:
        logits[:, 1] = -1e4  # an expert without tokens
    _skip_unavailable(ops.topk_gating, "triton", logits, k)
    with backends.force("triton"):
        got = ops.topk_gating(logits, k)
    want = ref.topk_gating(logits, k)
    for name in ("expert_ids", "tokens_per_expert", "sorted_slots", "slot_positions"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


# ---------------------------------------------------------------------------------------------
# torch._grouped_mm path: inputs made to conform, architecture gated on the torch version

def test_grouped_torch_inputs_conform():
    from fastnn.ops.moe import _grouped_torch as gt

    base = torch.randn(70, 16, dtype=torch.bfloat16)
    view = base.view(-1)[3:3 + 64 * 16].view(64, 16)  # storage offset of 6 bytes: misaligned
    assert view.data_ptr() % 16
    fixed = gt._conforming(view)
    assert fixed.is_contiguous() and fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    t = torch.randn(16, 64, dtype=torch.bfloat16).t()  # a transposed a
    assert gt._conforming(t).is_contiguous()
    ok = torch.randn(64, 16, dtype=torch.bfloat16)
    assert gt._conforming(ok) is ok


@pytest.mark.parametrize("cap,version,want", [((9, 0), "2.8.0", True), ((10, 0), "2.8.0", False),
                                              ((10, 0), "2.11.0", True), ((8, 0), "2.11.0", False),
                                              ((12, 0), "2.11.0", False)])
def test_grouped_torch_arch_gate(monkeypatch, cap, version, want):
    from fastnn.ops.moe import _grouped_torch as gt

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(torch, "__version__", version)
    assert gt._arch_supported(0) is want


# ---------------------------------------------------------------------------------------------
# Triton launches run on the tensors' device

def test_on_device_is_a_no_op_for_cpu_tensors():
    kernels = pytest.importorskip("fastnn.kernels.moe")
    with kernels.on_device(torch.zeros(1)):
        pass


@pytest.mark.gpu
def test_triton_ops_run_on_the_inputs_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (inputs on cuda:1 while cuda:0 is current)")
    torch.cuda.set_device(0)
    logits = torch.randn(64, 8, device="cuda:1")
    x = torch.randn(64, 32, device="cuda:1", dtype=torch.bfloat16)
    with backends.force("triton"):
        g = ops.topk_gating(logits, 2)
        xs = ops.permute_tokens(x, g.sorted_slots, 2)
        out = ops.unpermute_tokens(xs, g.slot_positions, g.weights.bfloat16())
    want = ref.topk_gating(logits.cpu(), 2)
    assert torch.equal(g.sorted_slots.cpu(), want.sorted_slots)
    testing.assert_close(out.float().cpu(), (x.float() * want.weights.sum(1, keepdim=True).cuda(1)).cpu(),
                         dtype=torch.bfloat16)


def test_every_triton_launch_is_on_the_inputs_device():
    """A launch outside ``with on_device(...)`` runs on the current GPU, not the tensors' (checked on
    the source, since no second GPU is needed to see it)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "kernels" / "triton"
    launches = 0
    for path in (root / "moe.py", root / "moe_gemm.py"):
        tree = ast.parse(path.read_text())

        def walk(node, guarded):
            nonlocal launches
            if isinstance(node, ast.With):
                guarded = guarded or any(isinstance(i.context_expr, ast.Call) and
                                         getattr(i.context_expr.func, "id", "") == "on_device" for i in node.items)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "wrap_triton":
                launches += 1
                assert guarded, f"{path.name}:{node.lineno}: Triton launch outside 'with on_device(...)'"
            for child in ast.iter_child_nodes(node):
                walk(child, guarded)

        walk(tree, False)
    assert launches >= 9

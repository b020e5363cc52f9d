"""Property-based tests of the optimizer ops and optimizers (hypothesis, the global profile).

* adam_step_ / sgd_step_ / grad_norm_clip_coef on every backend available here against the
  reference: odd and empty shapes, every dtype, non-contiguous params and gradients, NaN/inf/huge
  gradients, every option and scaling input.
* Bad inputs (wrong shapes, dtypes, devices, lengths, expanded written tensors): a clear Python
  error from fastnn on every backend, or agreement; run in a subprocess, where a crash fails.
* Random sequences of state changes between steps (state cleared or replaced, a parameter swapped,
  amsgrad/momentum switched, lr set negative) against torch.optim.
"""

import math
import textwrap

import pytest
import torch

import fastnn
from fastnn import backends, testing
from fastnn.reference import optim as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

pytestmark = pytest.mark.fuzz

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "sliced"]


def _backends(op, *args, **kwargs):
    return [b for b in op.available(*args, **kwargs) if b != "reference"]


def _shape(draw):
    dims = draw(st.integers(0, 3))
    return tuple(draw(st.sampled_from([0, 1, 2, 3, 5, 7])) for _ in range(dims))


def _tensor(draw, shape, dtype, layout, *, positive=False, special=False):
    """A tensor of ``shape`` with the drawn layout (a view of a larger or transposed buffer)."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        dims = tuple(reversed(range(len(shape))))
        view = lambda t: t.permute(dims)  # noqa: E731
        full = tuple(reversed(shape))
    elif layout == "sliced" and len(shape) >= 1:
        view = lambda t: t[..., ::2]  # noqa: E731
        full = shape[:-1] + (2 * shape[-1],)
    else:
        view = lambda t: t  # noqa: E731
        full = shape
    base = torch.randn(full, generator=g, dtype=torch.float64)
    if positive:
        base = base.abs() * 0.1
    out = view(base.to(dtype))
    if special and out.numel():
        out[(0,) * out.dim()] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 0.0]))
    return out


def _close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    testing.assert_close(actual.double(), expected.double(), dtype=actual.dtype)


@st.composite
def adam_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shapes = [_shape(draw) for _ in range(draw(st.integers(1, 3)))]
    amsgrad = draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    special = draw(st.booleans())
    lists = [
        [_tensor(draw, s, dtype, layout) for s in shapes],
        [_tensor(draw, s, dtype, draw(st.sampled_from(LAYOUTS)), special=special) for s in shapes],
        [_tensor(draw, s, dtype, "contiguous") * 0.1 for s in shapes],
        [_tensor(draw, s, dtype, "contiguous", positive=True) for s in shapes],
        [_tensor(draw, s, dtype, "contiguous", positive=True) for s in shapes] if amsgrad else [],
        [torch.tensor(float(draw(st.integers(0, 5000)))) for _ in shapes],
    ]
    kw = dict(lr=draw(st.sampled_from([1e-3, 0.1, -0.01, 0.0])), beta1=draw(st.sampled_from([0.0, 0.9, 0.5])),
              beta2=draw(st.sampled_from([0.999, 0.9, 0.0])), eps=draw(st.sampled_from([1e-8, 0.0, 1e-3])),
              weight_decay=draw(st.sampled_from([0.0, 0.1])), amsgrad=amsgrad, maximize=draw(st.booleans()),
              decoupled=draw(st.booleans()))
    kw.update(_scaling(draw))
    return lists, kw


def _scaling(draw):
    out = {}
    if draw(st.booleans()):
        out["grad_scale"] = torch.tensor(draw(st.sampled_from([1.0, 0.5, 1024.0])))
    if draw(st.booleans()):
        out["found_inf"] = torch.tensor(draw(st.sampled_from([0.0, 1.0])))
    if draw(st.booleans()):
        out["clip_coef"] = torch.tensor(draw(st.sampled_from([1.0, 0.25, float("nan")])))
    if draw(st.booleans()):
        out["lr_tensor"] = torch.tensor(draw(st.sampled_from([1e-3, 0.05])), dtype=draw(st.sampled_from(
            [torch.float32, torch.float64])))
    return out


def _copy(t):
    """A copy with the same strides (clone() makes a sliced view contiguous)."""
    c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    return c.copy_(t)


def _clone(lists):
    return [[_copy(t) for t in lst] for lst in lists]


def _every_backend_matches_reference(op, reference, lists, kw):
    expected = _clone(lists)
    reference(*expected, **kw)
    for backend in _backends(op, *lists, **kw):
        got = _clone(lists)
        op.call(backend, *got, **kw)
        for lst_g, lst_e in zip(got, expected):
            for g, e in zip(lst_g, lst_e):
                _close(g, e)


@given(adam_case())
def test_adam_step_every_backend_matches_reference(case):
    _every_backend_matches_reference(fastnn.ops.adam_step_, ref.adam_step_, *case)


@st.composite
def sgd_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shapes = [_shape(draw) for _ in range(draw(st.integers(1, 3)))]
    momentum = draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    lists = [
        [_tensor(draw, s, dtype, draw(st.sampled_from(LAYOUTS))) for s in shapes],
        [_tensor(draw, s, dtype, draw(st.sampled_from(LAYOUTS)), special=draw(st.booleans())) for s in shapes],
        [_tensor(draw, s, dtype, draw(st.sampled_from(LAYOUTS))) for s in shapes] if momentum else [],
    ]
    kw = dict(lr=draw(st.sampled_from([0.05, -0.01])), momentum=momentum,
              dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
              weight_decay=draw(st.sampled_from([0.0, 0.01])), nesterov=nesterov, maximize=draw(st.booleans()),
              is_first_step=draw(st.booleans()))
    kw.update(_scaling(draw))
    return lists, kw


@given(sgd_case())
def test_sgd_step_every_backend_matches_reference(case):
    _every_backend_matches_reference(fastnn.ops.sgd_step_, ref.sgd_step_, *case)


@given(st.data())
def test_grad_norm_every_backend_matches_reference(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    grads = [_tensor(draw, _shape(draw), dtype, draw(st.sampled_from(LAYOUTS)), special=draw(st.booleans()))
             for _ in range(draw(st.integers(0, 3)))]
    norm_type = draw(st.sampled_from([2.0, math.inf]))
    scale = torch.tensor(4.0) if draw(st.booleans()) else None
    en, ec = ref.grad_norm_clip_coef(grads, 0.5, norm_type, scale)
    for backend in _backends(fastnn.ops.grad_norm_clip_coef, grads, 0.5, norm_type, scale):
        n, c = fastnn.ops.grad_norm_clip_coef.call(backend, grads, 0.5, norm_type, scale)
        torch.testing.assert_close(n, en, rtol=1e-4, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(c, ec, rtol=1e-4, atol=1e-6, equal_nan=True)


# Bad inputs: every backend raises fastnn's error (or agrees with the reference), in a subprocess.
BAD_PROBES = textwrap.dedent("""
    import itertools, torch, fastnn
    from fastnn import backends
    op = fastnn.ops.adam_step_
    def lists(n=4, **over):
        d = dict(params=[torch.randn(n)], grads=[torch.randn(n)], exp_avgs=[torch.zeros(n)],
                 exp_avg_sqs=[torch.zeros(n)], max_exp_avg_sqs=[], steps=[torch.tensor(0.0)])
        d.update(over)
        return list(d.values())
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled=False)
    probes = [
        (lists(grads=[torch.randn(40)]), {}),
        (lists(grads=[torch.randn(2)]), {}),
        (lists(exp_avgs=[torch.zeros(40)]), {}),
        (lists(exp_avg_sqs=[torch.zeros(1)]), {}),
        (lists(exp_avgs=[torch.zeros(1).expand(4)]), {}),
        (lists(grads=[torch.randn(1).expand(4)]), dict(grad_scale=torch.tensor(2.0))),
        (lists(params=[torch.randn(1).expand(4)]), {}),
        (lists(steps=[torch.tensor([0.0, 1.0])]), {}),
        (lists(steps=[]), {}),
        (lists(max_exp_avg_sqs=[torch.zeros(3)]), dict(amsgrad=True)),
        (lists(grads=[torch.randn(4, dtype=torch.float64)]), {}),
        (lists(), dict(grad_scale=torch.ones(3))),
        (lists(), dict(lr_tensor=torch.ones(2))),
        (lists(), dict(found_inf=torch.tensor(1, dtype=torch.int32))),
        (lists(), dict(beta1=1.5)),
    ]
    for args, over in probes:
        kwargs = dict(kw, **over)
        for backend in ("reference", "cpu", "triton"):
            if op.reason(backend, *args, **kwargs) is not None:
                continue
            try:
                op.call(backend, *args, **kwargs)
            except (ValueError, TypeError, IndexError, RuntimeError) as e:
                assert "fastnn" in str(e), (backend, over, str(e))
            else:
                raise AssertionError(f"{backend}: no error for {[getattr(a[0], 'shape', a) for a in args if a]} {over}")
    print("ok")
""")


def test_bad_inputs_raise_clearly_on_every_backend():
    proc = testing.run_isolated(BAD_PROBES)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "ok" in proc.stdout


# Random state changes between steps, against torch.optim.
ACTIONS = ["clear", "replace_exp_avg", "replace_step", "swap_param", "amsgrad_on", "negative_lr", "none"]
SGD_ACTIONS = ["clear", "replace_buffer", "swap_param", "momentum_on", "momentum_off", "negative_lr", "none"]


def _apply(action, opt, i):
    group = opt.param_groups[0]
    params = group["params"]
    p = params[i % len(params)]
    st_ = opt.state.get(p, {})
    if action == "clear":
        opt.state.clear()
    elif action == "replace_exp_avg" and "exp_avg" in st_:
        st_["exp_avg"] = torch.full_like(p, 0.25)
    elif action == "replace_step" and "step" in st_:
        st_["step"] = torch.tensor(float(10 + i))
    elif action == "replace_buffer" and st_.get("momentum_buffer") is not None:
        st_["momentum_buffer"] = torch.full_like(p, -0.5)
    elif action == "swap_param":
        params[i % len(params)] = torch.nn.Parameter(torch.full_like(p, 0.5 + i))
    elif action == "amsgrad_on" and not group["amsgrad"]:
        group["amsgrad"] = True
        for q in params:  # what fastnn does itself; torch.optim.Adam would raise KeyError
            if opt.state.get(q) and "max_exp_avg_sq" not in opt.state[q]:
                opt.state[q]["max_exp_avg_sq"] = torch.zeros_like(q)
    elif action == "momentum_on":
        group["momentum"] = 0.9
    elif action == "momentum_off":
        group["momentum"] = 0.0
    elif action == "negative_lr":
        group["lr"] = -0.01


@given(st.sampled_from(["adamw", "sgd"]), st.lists(st.integers(0, 6), min_size=1, max_size=6),
       st.sampled_from(["cpu", "reference", "triton"]))
def test_state_changes_between_steps_match_torch(kind, actions, backend):
    p0 = torch.zeros(1)
    if fastnn.ops.sgd_step_.reason(backend, [p0], [p0], [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                   nesterov=False, maximize=False, is_first_step=False) is not None:
        return
    names = ACTIONS if kind == "adamw" else SGD_ACTIONS
    pair = (torch.optim.AdamW, fastnn.optim.AdamW) if kind == "adamw" else (torch.optim.SGD, fastnn.optim.SGD)
    opts = dict(lr=0.05) if kind == "adamw" else dict(lr=0.05, momentum=0.5)
    results = []
    for cls in pair:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((4, 3), (5,), (1,))]
        opt = cls(params, **opts)
        for i, a in enumerate(actions):
            for q in opt.param_groups[0]["params"]:
                g = torch.Generator().manual_seed(i)
                q.grad = torch.randn(q.shape, generator=g)
            _apply(names[a], opt, i)
            with backends.force(backend) if cls.__module__.startswith("fastnn") else torch.no_grad():
                opt.step()
        results.append([q.detach().clone() for q in opt.param_groups[0]["params"]])
    for got, want in zip(results[1], results[0]):
        testing.assert_close(got, want)
